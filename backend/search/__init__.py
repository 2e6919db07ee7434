"""Serving a query from the database's truth: the verified index copy (build, file, live index),
stage 1 with its stored rankers, the own-image look-up, filters, near-duplicates and results."""
