"""The service layer: what the API and the CLI ask of the catalogue (search, reads, jobs, keys, status),
each through a method; the SQL stays in `backend.catalogue` and friends."""
