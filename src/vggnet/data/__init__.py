"""Data for training VGG: the embedded digits, ImageFolder trees, archives, transforms and loaders.

Two paths to the network. Tiny images (digits, CIFAR-10) are decoded once into a uint8 tensor and
augmented in batches by :class:`TensorLoader`; anything larger streams from an ImageFolder through
:func:`build_dataloader` with the paper's v2 transforms. Nothing here downloads unless a caller
passes ``download=True`` to :func:`download_builtin`.
"""

from .digits import DigitsDataset, digits_tensors
from .fast import TensorLoader
from .folder import (
    IMAGE_ERRORS,
    DataError,
    ImageFolderDataset,
    collate_skip_none,
    find_classes,
    load_image_folder,
    read_image,
    scan_image_folder,
)
from .loaders import build_dataloader
from .prepare import decode_subset, decode_to_cache, prepare_archive
from .split import stratified_split
from .torchvision_sets import download_builtin
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PCALighting,
    RandomIsotropicRescale,
    eval_transform,
    paper_train_transform,
    small_image_train_transform,
)

__all__ = [
    "IMAGE_ERRORS", "IMAGENET_MEAN", "IMAGENET_STD", "DataError", "DigitsDataset", "ImageFolderDataset", "PCALighting",
    "RandomIsotropicRescale", "TensorLoader", "build_dataloader", "collate_skip_none", "decode_subset",
    "decode_to_cache", "digits_tensors", "download_builtin", "eval_transform", "find_classes",
    "load_image_folder", "paper_train_transform", "prepare_archive", "read_image", "scan_image_folder",
    "small_image_train_transform", "stratified_split",
]
