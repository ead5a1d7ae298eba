"""The run store: datasets, runs, metric points, logs, artifacts, chats and A/B votes.

Callers use `storage.repo.Store` and get frozen records (`storage.records`) back, never ORM objects or sessions.
Only SQLAlchemy, Alembic and the standard library are imported here, so the web process stays free of torch.
"""
