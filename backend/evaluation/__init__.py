"""Measuring quality: `retrieval` (evaluate), `metrics` (retrieval metrics), `stage1` (the stage-1 comparison),
`precision` (int8 against fp32) and `duplicates` (how NEAR_DUPLICATE_THRESHOLD was chosen)."""
