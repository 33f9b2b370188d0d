"""The model registry (MLflow Model Registry): versions of a model with lineage, champion / challenger aliases,
promotions with evidence and rollback. See :mod:`vggnet.registry.mlflow_registry`."""

from __future__ import annotations

from .mlflow_registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    VersionRow,
    challenger_of,
    champion_of,
    data_fingerprint,
    list_versions,
    open_registry,
    promote,
    register_run,
    resolve_uri,
    rollback,
)

__all__ = ["CHALLENGER", "CHAMPION", "PREVIOUS", "VersionRow", "challenger_of", "champion_of", "data_fingerprint",
           "list_versions", "open_registry", "promote", "register_run", "resolve_uri", "rollback"]
