"""One file per schema revision, applied in order by `storage.db.migrate`."""
