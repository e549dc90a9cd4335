"""`clip-index`: bulk embedding of a corpus on Ray Data, resumable by shard, into a collection (through
a running service or PostgreSQL/pgvector directly) or clip-retrieval's files. Its inference is the
service's own (`clipserve.service.inference.bulk`); docs/indexing.md says how to use it."""
