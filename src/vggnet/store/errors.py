"""The store's errors a user can cause (a bad URL, a server that is not there, a label for no prediction)."""

from __future__ import annotations

from ..errors import VggnetError

__all__ = ["StoreError", "UnknownPrediction"]


class StoreError(VggnetError):
    """The database cannot be used: bad URL, missing driver, unreachable server, a schema newer than this vggnet."""


class UnknownPrediction(VggnetError, LookupError):
    """A label names a request id / item / model that the store has no prediction for."""
