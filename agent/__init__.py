"""modelcache agent: pulls models into a node-local content-addressed store and serves them."""

__version__ = "0.1.0"
