"""Prometheus metrics, one registry per app (so two apps in one process do not collide).

Under `clip-serve --workers N` (service/server/workers.py) the workers write their values into
prometheus_client's multiprocess folder (`PROMETHEUS_MULTIPROC_DIR`, set by the parent before
they start) and `/metrics` from any worker reports them all, aggregated.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_latency = Histogram(
            "clipserve_request_seconds",
            "HTTP request latency",
            ["route", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # prometheus_client's variable, set by the parent of the workers: its contract, not a setting
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        # The autoscaling signal (deploy/helm/clipserve): requests being served now, from the first
        # byte in to the last byte out, decode and queue included. For a small model the queue stays
        # short while Python's per-request work fills the cores, so queue depth alone shows load
        # late; in-flight requests show it as it comes (Little's law: throughput x latency).
        self.requests_in_flight = Gauge(
            "clipserve_requests_in_flight",
            "API requests being served now (health checks and /metrics left out)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_depth = Gauge(
            "clipserve_queue_depth",
            "items waiting",
            ["model", "tower"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batch_size = Histogram(
            "clipserve_batch_size",
            "items per inference batch",
            ["model", "tower"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "clipserve_inference_seconds",
            "time in the model per batch",
            ["model", "tower"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_seconds = Histogram(
            "clipserve_preprocess_seconds",
            "decode and preprocessing time per item",
            ["model", "tower"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.encoder_calls = Counter(
            "clipserve_encoder_calls_total", "inference calls (batches)", ["model", "tower"], registry=r
        )
        self.rejected = Counter(
            "clipserve_rejected_total", "items refused or dropped", ["model", "tower", "reason"], registry=r
        )
        self.cache_requests = Counter(
            "clipserve_cache_requests_total", "cache lookups", ["kind", "result"], registry=r
        )
        self.cache_hit_ratio = Gauge(
            "clipserve_cache_hit_ratio",
            "hits / lookups since start, per kind",
            ["kind"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.cache_errors = Counter("clipserve_cache_errors_total", "Redis failures", registry=r)
        self.cache_fallback = Gauge(
            "clipserve_cache_fallback",
            "1 while the in-process cache stands in for Redis",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.class_matrix_bytes = Gauge(
            "clipserve_class_matrix_bytes",
            "bytes of class matrices kept in this process (at most --cache-matrix-bytes, but for one larger)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.labelset_builds = Gauge(
            "clipserve_labelset_builds",
            "background label-set builds in this process: running (at most --labelset-builds) or queued",
            ["state"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.store_errors = Counter(
            "clipserve_store_errors_total",
            "calls to a data store (collections, label sets) that failed because it could not be reached",
            ["store"],
            registry=r,
        )
        self.reloads = Counter("clipserve_reloads_total", "model (re)loads", ["model", "result"], registry=r)
        self.model_info = Gauge(
            "clipserve_model_loaded",
            "loaded model versions: served, or kept for the collections bound to them",
            ["model", "version", "content_hash"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_memory = Gauge(
            "clipserve_model_memory_bytes",
            "memory of each loaded model version: its graphs' bytes (kind=graphs) and the resident memory "
            "its load added (kind=rss_at_load; other work at the same time blurs it); summed over workers",
            ["model", "version", "kind"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.jobs = Gauge(
            "clipserve_reembed_jobs",
            "re-embed jobs this process runs, by state",
            ["state"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.reembedded = Counter(
            "clipserve_reembedded_items_total",
            "items re-embedded by background jobs, by result (moved, failed)",
            ["result"],
            registry=r,
        )

    def render(self) -> bytes:
        if self.multiprocess_dir:
            every_worker = CollectorRegistry()
            MultiProcessCollector(every_worker, path=self.multiprocess_dir)
            return generate_latest(every_worker)
        return generate_latest(self.registry)
