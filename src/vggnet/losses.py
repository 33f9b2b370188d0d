"""Perceptual losses on a frozen VGG: feature (content) and Gram-matrix (style) distances.

The public home of :class:`PerceptualLoss` and :func:`gram_matrix`; they live in ``vggnet.transfer.losses``
with the other uses of a trained VGG beyond its own classes.
"""

from vggnet.transfer.losses import PerceptualLoss, gram_matrix

__all__ = ["PerceptualLoss", "gram_matrix"]
