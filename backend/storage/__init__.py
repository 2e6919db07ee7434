"""The catalogue's database: the only package that speaks SQL. Engine and sessions (`engine`), the ORM schema
(`schema`), migrations (`migrate`), the embedded server (`embedded`), and one module per kind of row."""
