# Every target sets up what it needs itself; `make test` on a fresh clone is what CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= serve,train,index,dev
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)-$(subst $(comma),_,$(EXTRAS))
comma := ,
PYTEST_ARGS ?=
# The GPU environment is a venv of its own: onnxruntime-gpu replaces the CPU onnxruntime there.
GPU_VENV ?= .venv-gpu
GPU_EXTRAS ?= serve-gpu,train-gpu,dev

.PHONY: test serve bench lint redis browser venv clean venv-gpu test-gpu gpu-check container-smoke gpu-image-check \
	compose-env constraints chart-tools chart-check

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	@rm -f $(VENV)/.installed-* && touch $@

redis:
	@bash scripts/ensure-redis.sh

browser:
	@bash scripts/ensure-browser.sh

test: venv redis browser
	@PYTHON=$(PY) bash scripts/chart-tools.sh || echo "chart-tools: helm could not be installed (above): tests/deploy/test_chart.py skips"
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

serve:
	@bash scripts/serve.sh

# The passwords of docker-compose.yml in .env (generated where missing, kept where present).
compose-env:
	@bash scripts/compose-env.sh

# docker/constraints-serve.txt from an environment resolved now; run after changing a requirement.
PYTHON_IMAGE_VERSION ?= python3.11
constraints:
	$(PYTHON_IMAGE_VERSION) docker/constraints.py serve docker/constraints-serve.txt

# docker-compose.yml for real: build, run three replicas, check through the proxy, take it down.
container-smoke: venv compose-env
	@bash scripts/container-smoke.sh

# helm, kubectl and the Kubernetes schemas, pinned, into .tools/ (tests/deploy/test_chart.py renders with them).
chart-tools: venv
	@PYTHON=$(PY) bash scripts/chart-tools.sh

# The Helm chart without a cluster: lint, render, strict validation, pytest over the YAML, then its
# pods under `podman kube play` with the real images (scripts/chart-check.sh says what).
chart-check: venv
	@VENV=$(VENV) bash scripts/chart-check.sh

# docker/Dockerfile.serve-gpu built (the CUDA-provider set, GPU_SET=serve-gpu-cuda, unless told) and
# checked without a GPU: its libraries, providers, the service's refusal and its CPU start.
gpu-image-check: venv
	@bash scripts/container-gpu-check.sh

# Each benchmark prints its figures (and the machine); none asserts on time.
bench: venv redis
	$(PY) bench/export.py
	$(PY) bench/serve.py
	$(PY) bench/retrieval.py
	$(PY) bench/abuse.py
	$(PY) bench/distill_shapes.py
	$(PY) bench/index.py
	$(PY) bench/refresh.py

venv-gpu:
	$(MAKE) venv VENV=$(GPU_VENV) EXTRAS=$(GPU_EXTRAS)

test-gpu: venv-gpu redis
	$(GPU_VENV)/bin/python -m pytest -m gpu -rs $(PYTEST_ARGS)

# A first run on a GPU machine, step by step (scripts/gpu-check.sh says what it does).
gpu-check: venv-gpu
	PYTHON=$(GPU_VENV)/bin/python bash scripts/gpu-check.sh

clean:
	rm -rf $(VENV) $(GPU_VENV) .tools .pytest_cache .ruff_cache
