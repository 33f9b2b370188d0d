"""vggnet: the VGG network (Simonyan & Zisserman, ICLR 2015) from the paper to production.

The model-zoo names below are loaded on first use (PEP 562): ``import vggnet`` (which every ``vggnet.x`` import and
every CLI call runs) then costs milliseconds instead of importing torch, so ``vggnet --help`` answers at once.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .errors import UsageError, VggnetError

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ below loads them
    from .models import (
        VGG,
        VGGConfig,
        WeightsError,
        WeightsNotFoundError,
        count_macs,
        count_params,
        create_model,
        init_from_shallower,
        init_weights,
        list_models,
        load_checkpoint,
        load_weights,
        save_checkpoint,
    )

__version__ = "0.1.0"

# name -> the subpackage that defines it; torch is imported only when a name that needs it is first read
_LAZY = {name: ".models" for name in (
    "VGG", "VGGConfig", "WeightsError", "WeightsNotFoundError", "count_macs", "count_params", "create_model",
    "init_from_shallower", "init_weights", "list_models", "load_checkpoint", "load_weights", "save_checkpoint",
)}

__all__ = [
    "VGG", "UsageError", "VGGConfig", "VggnetError", "WeightsError", "WeightsNotFoundError", "__version__",
    "count_macs", "count_params", "create_model", "init_from_shallower", "init_weights", "list_models",
    "load_checkpoint", "load_weights", "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    """Load a model-zoo name or a subpackage on first access and cache it, so later lookups skip this hook.

    Subpackages too: ``import vggnet`` used to import ``vggnet.models``, and code that then reads
    ``vggnet.models.X`` keeps working.
    """
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The lazy names too, so ``dir(vggnet)`` and tab completion list them before first use."""
    return sorted(set(globals()) | set(__all__))
