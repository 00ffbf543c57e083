"""On-premise Exchange room-calendar gateway."""

__version__ = "0.1.0"
