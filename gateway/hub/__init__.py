"""The booking vendor's reference hub: a separate product that shares only the pure relay protocol, the model and
the error tree with the appliance (the import contracts in pyproject.toml check this)."""
