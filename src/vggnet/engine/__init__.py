"""The training engine: typed recipes, the loop and its hooks, checkpoints, DDP and run artifacts.

Depends on ``vggnet.models`` and ``vggnet.data``; nothing below the CLI depends on it.
"""

from .hooks import TrainHooks
from .recipe import DEFAULTS, Recipe, RecipeError, builtin_recipes, load_recipe
from .trainer import ResumeError, TrainingDiverged, train

__all__ = ["DEFAULTS", "Recipe", "RecipeError", "ResumeError", "TrainHooks", "TrainingDiverged", "builtin_recipes",
           "load_recipe", "train"]
