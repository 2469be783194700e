"""Database schema, migrations, engines, and the stores that hold every statement."""
