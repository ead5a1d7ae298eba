"""Alembic migrations of the run store; a package so that an installed `storage` ships them."""
