"""Benchmark sections: each returns plain data for the report; progress goes to stderr."""
