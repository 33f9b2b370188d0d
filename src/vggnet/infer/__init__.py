"""Inference: preprocessing that travels with the model, interchangeable CPU runtimes, top-k prediction."""

from .predictor import RUNTIMES, Predictor, Preprocessing, Runtime, make_runtime, preprocess, register_runtime

__all__ = ["RUNTIMES", "Predictor", "Preprocessing", "Runtime", "make_runtime", "preprocess", "register_runtime"]
