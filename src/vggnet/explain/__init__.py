"""Explaining a VGG's decisions: Grad-CAM heat maps and boxes, first-layer filters, feature maps by layer name.

Imports nothing of training or serving: it needs a model and preprocessed images, nothing else.
"""

from .gradcam import (
    CAMResult,
    cam_box,
    default_cam_layer,
    evaluating,
    grad_cam,
    grad_cam_raw,
    no_evidence,
    no_evidence_text,
    spatial_layers,
    upsample_cam,
)
from .visualize import (
    FeatureGrid,
    feature_map_grid,
    filter_grid,
    overlay_figure,
    save_feature_maps,
    save_filter_grid,
    save_overlay,
    to_display,
)

__all__ = [
    "CAMResult", "FeatureGrid", "cam_box", "default_cam_layer", "evaluating", "feature_map_grid", "filter_grid",
    "grad_cam", "grad_cam_raw", "no_evidence", "no_evidence_text", "overlay_figure", "save_feature_maps",
    "save_filter_grid", "save_overlay", "spatial_layers", "to_display", "upsample_cam",
]
