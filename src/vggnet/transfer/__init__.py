"""Uses of a trained VGG beyond its own classes: features for linear models (the paper's Appendix B),
perceptual and style losses, and linear probes. Built on ``models``, ``data`` and ``evaluate``; never
imported by them. Fine-tuning itself is a training run (``engine``, the ``finetune`` recipe).
"""

from .losses import PerceptualLoss, gram_matrix
from .store import FeatureFile, FeatureFileError, FeatureFileNotFoundError, load_features, save_features

__all__ = ["FeatureFile", "FeatureFileError", "FeatureFileNotFoundError", "PerceptualLoss", "gram_matrix",
           "load_features", "save_features"]
