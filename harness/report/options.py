"""What a report is asked for (`python -m harness report` options), checked before the store is
opened, and the context the sections share: the checked options, the metric names, the store's
per-user arrays and the model colours."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from harness import stats
from harness.errors import UserError
from harness.report import figures as fg
from harness.report import results as rs


class ReportError(UserError, ValueError):
    """A report that cannot be built as asked (bad option)."""


@dataclasses.dataclass
class ReportOptions:
    studies: Sequence[str] = ()
    tracking_uri: str | None = None
    out: Path = Path("reports")
    name: str | None = None
    reference: str = "tim4rec"
    test: str = stats.SEED_TEST
    alpha: float = 0.05
    metrics: Sequence[str] | None = None
    primary: str = "ndcg@10"
    # a narrower family: these models against the reference at each hidden size, on the primary
    # metric, Holm over those comparisons alone (the question a study was run for, not the whole table)
    confirm: Sequence[str] = ()
    runs: str = "auto"  # auto | final | train
    bench_experiment: str = "bench"
    n_resamples: int = 10_000
    all_pairs: bool = True
    dpi: int = 110
    log: Callable[[str], None] | None = None  # hears each long stage as it begins

    @property
    def report_name(self) -> str:
        return self.name or ("-".join(self.studies) if self.studies else "all")


@dataclasses.dataclass
class Context:
    """What every section reads: the options and what was derived from them once."""

    options: ReportOptions
    metrics: list[str]  # test metric names shown, in order
    primary: str  # the metric of the all-pairs table and of the --confirm family
    per_user: rs.PerUser
    colours: fg.ModelColours


def checked_metrics(options: ReportOptions) -> tuple[list[str], str]:
    """(metrics, primary) of valid options; ReportError names the first bad option."""
    if options.test not in (stats.SEED_TEST, *stats.TESTS):
        raise ReportError(
            f"unknown test {options.test!r}; expected one of {', '.join((stats.SEED_TEST, *stats.TESTS))}"
        )
    if not 0 < options.alpha < 1:
        raise ReportError(f"alpha must be between 0 and 1; got {options.alpha}")
    if options.runs not in ("auto", "final", "train"):
        raise ReportError(f"--runs must be auto, final or train; got {options.runs!r}")
    if isinstance(options.confirm, str) or len(set(options.confirm)) != len(options.confirm):
        raise ReportError(f"--confirm takes distinct model names; got {options.confirm!r}")
    if options.reference in options.confirm:
        raise ReportError(
            f"--confirm {options.reference}: the reference model is what the others are tested against, not one of them"
        )
    try:
        metrics, primary = rs.test_metric_names(options.metrics), rs.test_metric_names([options.primary])[0]
    except ValueError as err:
        raise ReportError(str(err)) from None
    if options.confirm and primary not in metrics:
        raise ReportError(
            f"--confirm tests the primary metric {primary}, which --metrics leaves out: add it to --metrics "
            "or name another --primary"
        )
    return metrics, primary
