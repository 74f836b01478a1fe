"""Event storage above the WAL: the memtable, immutable Parquet parts and their manifest."""
