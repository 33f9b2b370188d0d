"""How a served model stands up to adversarial inputs (issue #30): accuracy under FGSM and PGD at several ε, and the
detection rate of the feature-squeezing guard (:mod:`vggnet.infer.squeeze`) that ``vggnet serve
--adversarial-guard`` runs, whose threshold this room sets and writes beside the checkpoint (``adversarial.json``).

The attacks come from the Adversarial Robustness Toolbox (the ``robustness`` extra), imported when they run.
"""

from .benchmark import DEFAULT_EPS, RobustnessSettings, markdown, parse_eps, run_robustness

__all__ = ["DEFAULT_EPS", "RobustnessSettings", "markdown", "parse_eps", "run_robustness"]
