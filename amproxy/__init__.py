"""amproxy: an authenticating proxy for Graphite's Carbon plaintext protocol."""

__version__ = "0.1.0"
