"""Reports from the tracking store: significance-tested results tables per protocol group, the paper
comparison, study histories/importances/Pareto fronts and benchmark plots (`python -m harness report`).

The report reads only the MLflow tracking store (harness.store.reader), never the trainer.
"""

from harness.report.build import Report, ReportError, ReportOptions, generate_report

__all__ = ["Report", "ReportError", "ReportOptions", "generate_report"]
