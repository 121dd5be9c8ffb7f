"""Alembic revisions of the fleet database; fleet/migrate.py runs them (see README.md here for writing one)."""
