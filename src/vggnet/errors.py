"""The errors a user can cause, as one family: the CLI prints them as one line and exits 2.

Anything that is not a :class:`VggnetError` (nor an ``OSError`` about a path the user named) is a bug in vggnet or
a library and keeps its traceback. The subclasses also derive from the built-in type a caller would catch
(``ValueError``), so ``except ValueError`` in user code keeps working.
"""

from __future__ import annotations

__all__ = ["UsageError", "VggnetError"]


class VggnetError(Exception):
    """Base of every error a user can cause: a bad flag, value, recipe, file or image."""


class UsageError(VggnetError, ValueError):
    """A value the user gave (flag, recipe key, file content) that vggnet cannot use; the message names it."""
