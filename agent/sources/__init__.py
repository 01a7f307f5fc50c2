"""Model sources: each turns a reference into a resolved plan of files (see base.py)."""
