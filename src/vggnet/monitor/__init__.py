"""Watching live versions: accuracy on the random review sample, user reports apart, and A/B verdicts.

Reads the prediction store (:mod:`vggnet.store`) and nothing of serving: ``vggnet monitor`` runs beside the
servers, against the same database.
"""

from __future__ import annotations

from .report import BETTER, UNKNOWN, WORSE, markdown_report, report_json, verdict_text, version_report

__all__ = ["BETTER", "UNKNOWN", "WORSE", "markdown_report", "report_json", "verdict_text", "version_report"]
