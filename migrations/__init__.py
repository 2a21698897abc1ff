"""Alembic migrations, installed as ``api.migrations`` (``api.db.upgrade`` runs them)."""
