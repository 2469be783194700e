"""Database schema, migrations, engine construction and named queries."""
