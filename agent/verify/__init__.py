"""Signature verification of models: policies (``policy``), the check of a model's files
(``signature``), and the one gate every way of serving a model goes through
(:func:`require_verified`)."""

from agent.verify.gate import require_verified, verified_under

__all__ = ["require_verified", "verified_under"]
