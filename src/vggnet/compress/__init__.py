"""Smaller and faster VGGs: filter pruning, knowledge distillation and quantization-aware training.

A room beside the main path, built on ``models`` and ``engine`` (fine-tuning a pruned net and distilling run
through the ordinary training loop) and on ``infer`` (post-training quantization to compare against). Nothing
on the main path imports it; only ``cli`` does.
"""
