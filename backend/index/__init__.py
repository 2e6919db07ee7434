"""The two-stage index: stage 1 ranks categories, stage 2 searches only the top ones' FAISS lists.

`layout` (the one index-layout model), `sampling` (which vectors train it), `two_stage` / `fastscan`
(the index types), `ivf_lists` (FAISS plumbing), `rerank_file`, `build` (from the database), `cache` /
`cache_file` (the index as a verified cache of the database), `stage1` / `stage1_models` (category
ranking), `own_image` (a stored image finds itself).
"""
