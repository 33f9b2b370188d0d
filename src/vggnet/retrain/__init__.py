"""Retraining from what people reviewed (issue 31): the reviewed samples out of the prediction store, a
stratified held-out part, the champion fine-tuned on its original data plus the rest, and a gate of two paired
tests. See :mod:`vggnet.retrain.pipeline`; registering the result is the CLI's (this room imports no other room).

>>> result = retrain(Champion("digits", "1", ckpt, sha, run), RetrainSettings(store=url, data=folder, out=out))
>>> result.gate["passed"], result.gate["reason"]
"""

from __future__ import annotations

from .gate import decide, gate_table, paired_counts
from .pipeline import Champion, NotEnoughReviewed, RetrainResult, RetrainSettings, retrain, sha256_of

__all__ = ["Champion", "NotEnoughReviewed", "RetrainResult", "RetrainSettings", "decide", "gate_table",
           "paired_counts", "retrain", "sha256_of"]
