"""The HTTP layer the local API (gateway/api.py) and the reference hub (gateway/hub/) share.

Pure HTTP over aiohttp, knowing only the model, the error tree and the relay protocol: problem details
(``problem``), Bearer keys with scopes (``auth``), the event stream (``sse``), the booking routes both serve and
what their requests carry (``routes``, ``params``, ``commands``) and the OpenAPI document built from them
(``openapi``). No store, no adapter: each application brings its own keys, events and command handler.
"""
