"""Calendar sources: one package or module per kind (ews; memory, for tests), each found by its name through
registry.py; routing.py sends each room's calls to the source that owns it."""
