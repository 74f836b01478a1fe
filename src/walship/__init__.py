"""walship: a replicated event store for Python."""

__version__ = "0.1.0"
