"""The built-in recipes: one YAML file per recipe in this folder, shipped as package data.

:func:`names` reads the folder itself, so every list of built-in recipes (``vggnet train --help``, the error for an
unknown name) follows the files instead of drifting from them. Importing this package imports nothing heavy.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["names"]


def names() -> list[str]:
    """The built-in recipe names (the ``.yaml`` files here, without the suffix), sorted."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))
