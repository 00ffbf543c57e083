"""On-premise Exchange through EWS (exchangelib, run in bounded thread pools)."""
