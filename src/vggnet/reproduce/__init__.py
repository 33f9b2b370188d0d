"""``vggnet reproduce``: the paper's ablations (Tables 3-6) at a scale one machine can run.

It sits above ``engine`` and ``evaluate`` (it trains, then tests) and below ``cli``: the study is data
(``study.yaml``: which configurations, which training and test scales), the training recipe is
``recipes/reproduce.yaml``, and this package only runs the plan and writes the report.
"""

from .harness import Study, load_study, model_name, run_study
from .report import conclusions, markdown_report, plot_errors

__all__ = ["Study", "conclusions", "load_study", "markdown_report", "model_name", "plot_errors", "run_study"]
