"""Stage 2 over a Ray cluster (RAY_ADDRESS; docs/cluster.md): categories bin-packed into groups (`packing`),
the assignment in PostgreSQL (`backend.storage.shards`), each group held by SHARD_REPLICAS detached actors
(`shard`) that build their part of the index from the database and follow the change log themselves, and a
router in each API server (`router`) that sends a query only to the groups of its top categories. `local`
starts and stops a cluster on loopback for trying and testing (`python -m backend.cli cluster up`)."""
