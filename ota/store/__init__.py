"""Persistence: SQLModel tables, Alembic migrations, and the store functions.

The store is the only place that commits. Hot paths (ingest) use SQLAlchemy
Core batch statements; the ORM serves the control API.
"""
