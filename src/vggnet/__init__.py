"""vggnet: the VGG network (Simonyan & Zisserman, ICLR 2015) from the paper to production."""

from .errors import UsageError, VggnetError
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
__all__ = [
    "VGG", "UsageError", "VGGConfig", "VggnetError", "WeightsError", "WeightsNotFoundError", "__version__",
    "count_macs", "count_params", "create_model", "init_from_shallower", "init_weights", "list_models",
    "load_checkpoint", "load_weights", "save_checkpoint",
]
