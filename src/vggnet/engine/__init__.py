"""The training engine: recipes, the loop, checkpoints, DDP and run artifacts.

Depends on ``vggnet.models`` and ``vggnet.data``; nothing below the CLI depends on it.
"""

from .recipe import DEFAULTS, builtin_recipes, load_recipe
from .trainer import ResumeError, train

__all__ = ["DEFAULTS", "ResumeError", "builtin_recipes", "load_recipe", "train"]
