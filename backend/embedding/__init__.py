"""Image embedding: `models` (the table), `base` + families (a model and its id), `registry` (the configured
model, its id without weights), `sessions` and `export` (what runs it), `embedder` (model + session), `cache`
(the process's loaded embedders), `quantize` (int8)."""
