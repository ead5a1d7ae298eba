"""A run's statuses, defined once. Plain constants with no SQLAlchemy import, so a worker process (which must not load
the store) can name the final statuses the store uses."""

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
