"""The two-stage index, FAISS and NumPy only (no storage, no SQLAlchemy): what a shard process needs.

`category_index` (the `CategoryIndex` protocol and its hits), `category_lists` (what the kinds share),
`two_stage` (flat, ivf) and `fastscan` (its sibling), `layout` (the one index-layout model), `sampling`
(which vectors train it), `ivf_lists` (FAISS plumbing), `rerank_file`, `probe_plan`, `byte_streams`,
`stage1_models` (the category rankers in NumPy). Serving from the database is `backend.search`.
"""
