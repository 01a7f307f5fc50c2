"""The node's content-addressed store (see docs/store.md for the layout)."""
