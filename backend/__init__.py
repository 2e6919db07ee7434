"""Image similarity search: PostgreSQL catalogue, category prototypes and a two-stage FAISS search."""
