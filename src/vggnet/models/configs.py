"""The six networks of the VGG paper (Table 1) as data.

Each table lists the feature extractor left to right: an int is a 3×3 conv with
that many output channels, ``(channels, kernel)`` a conv of another kernel size
(configuration C's 1×1 convs), ``"LRN"`` a local response normalisation after
the previous conv's ReLU, and ``"M"`` a 2×2 max-pool that closes a block.
Nothing here is code on purpose: the builder in ``vgg.py`` is the only reader.
"""

from __future__ import annotations

ConfigEntry = int | str | tuple[int, int]

CONFIGS: dict[str, list[ConfigEntry]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "A-LRN": [64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C": [64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M", 512, 512, (512, 1), "M", 512, 512, (512, 1), "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}

# Model names follow torchvision (vgg11 = A, vgg13 = B, vgg16 = D, vgg19 = E); the two
# configurations torchvision lacks get explicit suffixes. Every name also has a ``_bn`` twin.
NAME_TO_CONFIG: dict[str, str] = {
    "vgg11": "A",
    "vgg11_lrn": "A-LRN",
    "vgg13": "B",
    "vgg16_c": "C",
    "vgg16": "D",
    "vgg19": "E",
}

# Exact parameter counts with 1000 classes of the paper's configurations as built here (the same as
# torchvision's for A, B, D, E). The paper does not print exact counts: its Table 2 gives millions,
# PAPER_TABLE2_MILLIONS below, and the exact counts round to those. The test suite checks both.
PAPER_PARAMS: dict[str, int] = {
    "A": 132_863_336,
    "A-LRN": 132_863_336,
    "B": 133_047_848,
    "C": 133_638_952,
    "D": 138_357_544,
    "E": 143_667_240,
}

# "Number of parameters (in millions)" as printed in the paper's Table 2.
PAPER_TABLE2_MILLIONS: dict[str, int] = {"A": 133, "A-LRN": 133, "B": 133, "C": 134, "D": 138, "E": 144}

# Krizhevsky et al.'s LRN: b = a / (k + alpha * sum(a^2)) ** beta over n = 5 channels, alpha = 1e-4.
# PyTorch divides alpha by n, so the module gets alpha * n to compute the paper's formula.
LRN = {"size": 5, "alpha": 1e-4 * 5, "beta": 0.75, "k": 2.0}

FC_WIDTH = 4096  # fc6 and fc7
FC_INPUT_GRID = 7  # fc6 sees a 7×7 map at 224×224 input

# The layers of a trained net A that the paper copies into deeper nets before training them
# (Section 3.1): the first four conv layers and the three FC layers. Same names in every config.
PAPER_WARM_START_LAYERS = ("block1_conv1", "block2_conv1", "block3_conv1", "block3_conv2", "fc6", "fc7", "fc8")
