"""Durable state behind the Store port (gateway/ports.py): the SQLite adapter and its schema migrations."""

from gateway.store.sqlite import SqliteStore

__all__ = ["SqliteStore"]
