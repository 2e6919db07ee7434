"""How an image enters the catalogue, the one way: `writer` (decode, de-duplicate by sha256, embed, store in
one transaction per batch, one report), `pipeline` (its stages overlapped), `categories` (the policy for an
image without a category), `populate` (a dataset through the writer). `POST /upload` and job chunks
(`backend.jobs.chunks`) call the writer too."""
