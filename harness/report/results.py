"""Results tables: runs grouped by protocol, rows per model and hidden size, seeds summarised,
per-user paired significance against a reference model (harness.stats).

Rules (docs/design.md#statistics):
- runs with different protocol_id are never in one table (`group_runs`); the groups and the protocol
  keys that separate them are listed by `protocol_differences`;
- a table cell is the mean and standard deviation over seeds of the run-level test metric;
- significance uses the per-user ranks artifact of every run: ranks -> per-user metric
  (harness.metrics.per_user_metric), users aligned by id (a comparison is refused if the user sets
  differ). The default test (`--test seeds`, harness.stats.seed_user_test) has seeds and users in
  its null and needs 2+ seeds on both sides: a row with one seed is not tested (no star). Beside it
  every comparison has the per-user test of the trained networks (harness.stats.paired_test_over_seeds,
  each user's value averaged over a row's seeds first, never pooling seeds with users). p-values are
  Holm-adjusted over the comparisons of the table, each test over its own comparisons
  (Benjamini-Hochberg for the exploratory all-pairs table).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from decimal import Decimal

import numpy as np

from harness import stats
from harness.metrics import METRICS, metric_key, parse_metric, per_user_metric
from harness.report import tables as tb
from harness.store import contract as tc
from harness.store.reader import Run, Store, seed_sort_key

#: the registry's models in the order tables list them; other names follow alphabetically
MODEL_ORDER = ("sasrec", "tisasrec", "mamba4rec", "ssd4rec", "tim4rec")
DEFAULT_METRICS = tuple(f"{m}@{k}" for m in METRICS for k in (10, 20, 50))
#: parameters that never make a row another configuration: where it ran (tc.EXECUTION_SETTINGS, also
#: outside a run's identity), the table's axes (seed is the replicate, model and hidden size the row,
#: dataset the group; tie_order is part of the protocol, and runs stored before it existed have no
#: such parameter), and what a row may mix: evaluation batch size and kernel backend (same numbers),
#: the epoch budget (early stopping decides) and the parameter count (follows from the rest)
NOT_CONFIGURATION = tc.EXECUTION_SETTINGS | {
    "seed",
    "model",
    "dataset",
    "model.hidden_size",
    "hidden_size",
    "tie_order",
    "eval_batch_size",
    "kernel_backend",
    "epochs",
    "n_parameters",
}


def model_sort_key(model: str):
    """The registry's order; a study's named variant ('tim4rec-causal') right after its model."""
    registered = model if model in MODEL_ORDER else model.partition("-")[0]
    return (MODEL_ORDER.index(registered), model) if registered in MODEL_ORDER else (len(MODEL_ORDER), model)


def model_name(run: Run) -> str:
    """The name a run's model goes by in a report: its study's name for it when the study names a
    variant of a registered model (`tim4rec-causal: {model: tim4rec, ...}`), so that a variant is
    never shown, or tested against, as the registered model itself; else the registry name."""
    return run.tags.get(tc.MODEL) or run.model


@dataclasses.dataclass
class Row:
    model: str
    hidden: int | None
    variant: str
    runs: list[Run]  # one per seed, sorted by seed

    @property
    def seeds(self) -> list[str]:
        return [r.seed for r in self.runs]

    @property
    def label(self) -> str:
        hidden = f" h={self.hidden}" if self.hidden is not None else ""
        variant = f" [{self.variant}]" if self.variant else ""
        return f"{self.model}{hidden}{variant}"

    def sort_key(self):
        return (model_sort_key(self.model), self.hidden if self.hidden is not None else -1, self.variant)


@dataclasses.dataclass
class Group:
    protocol_id: str
    comparability: dict[str, str]  # the protocol.* tags the group's runs share
    rows: list[Row]

    @property
    def dataset(self) -> str:
        return self.comparability.get("dataset", "")

    @property
    def slug(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-._" else "-" for c in self.dataset) or "unknown"
        train = self.comparability.get("train_protocol", "")
        return f"{safe}_{train}_{self.protocol_id}" if train else f"{safe}_{self.protocol_id}"

    @property
    def title(self) -> str:
        p = self.comparability
        return (
            f"{self.dataset} ({p.get('train_protocol', '?')} training, max_len {p.get('max_len', '?')}, "
            f"mask_seen {p.get('mask_seen', '?')}, protocol {self.protocol_id})"
        )

    @property
    def runs(self) -> list[Run]:
        return [r for row in self.rows for r in row.runs]


def test_metric_names(metrics: Sequence[str] | None) -> list[str]:
    """Normalise 'hit@10' / 'ndcg_at_10' to 'hit@10'; ValueError for unknown names."""
    out = []
    for text in metrics or DEFAULT_METRICS:
        metric, k = parse_metric(text)
        name = f"{metric}@{k}"
        if name not in out:
            out.append(name)
    return out


def mlflow_key(metric: str) -> str:
    name, k = parse_metric(metric)
    return metric_key(name, k, "test")


def select_result_runs(runs: Sequence[Run], which: str) -> tuple[list[Run], str, list[str]]:
    """Finished final (or train) runs with test metrics. which: auto | final | train; auto takes
    final runs when there are any, train runs otherwise."""
    notes = []

    def usable(kind):
        chosen = [r for r in runs if r.kind == kind and any(k.startswith("test_") for k in r.metrics)]
        finished = [r for r in chosen if r.status == "FINISHED"]
        left_out = [r for r in chosen if r.status != "FINISHED"]
        if left_out:
            notes.append(
                f"{len(left_out)} {kind} run(s) not FINISHED were left out: "
                + ", ".join(sorted(_described(r) for r in left_out))
            )
        return finished

    untested = [
        r
        for r in runs
        if r.kind in (tc.KIND_FINAL, tc.KIND_TRAIN) and not any(k.startswith("test_") for k in r.metrics)
    ]
    # an interrupted final run is rerun as a new run of the same configuration and seed (the same
    # final key): once that one has finished its test, the interrupted one is history, not a gap
    tested = {
        r.tags[tc.FINAL_KEY]
        for r in runs
        if tc.FINAL_KEY in r.tags and r.status == "FINISHED" and any(k.startswith("test_") for k in r.metrics)
    }
    replaced = [r for r in untested if r.tags.get(tc.FINAL_KEY) in tested]
    untested = [r for r in untested if r not in replaced]
    for label, members in (
        ("still training", [r for r in untested if r.status == "RUNNING" and not r.interrupted]),
        ("stopped before their test", [r for r in untested if r.status != "RUNNING" or r.interrupted]),
        ("interrupted and rerun to the end as another run", replaced),
    ):
        if members:
            names = ", ".join(sorted(_described(r) for r in members))
            notes.append(f"{len(members)} run(s) {label}, not in the tables: {names}")
    if which == "auto":
        finals = usable("final")
        if finals:
            return finals, "final", notes
        notes.append("no final (study) runs found: the tables use train runs")
        return usable("train"), "train", notes
    return usable(which), which, notes


def _described(run: Run) -> str:
    """A run's name for the notes: with its status unless running, and why it failed when recorded."""
    if run.interrupted:
        return f"{run.name} (interrupted: {run.interrupted}; rerun its command to resume it)"
    if run.status == "RUNNING":
        return run.name
    failure = run.tags.get(tc.FAILURE_TAG, "")
    if failure.startswith("KeyboardInterrupt"):  # as stores written before the wording recorded it
        failure = tc.STOPPED
    return f"{run.name} ({run.status}: {failure})" if failure else f"{run.name} ({run.status})"


def group_runs(runs: Sequence[Run]) -> tuple[list[Group], list[str]]:
    """Group by protocol_id, then rows by (model, hidden, variant); duplicates of a seed keep the
    latest run."""
    notes: list[str] = []
    by_protocol: dict[str, list[Run]] = {}
    for run in runs:
        pid = run.tags.get(tc.PROTOCOL_ID)
        if not pid:
            notes.append(f"run {run.run_id} ({run.name}) has no protocol_id tag: left out of all tables")
            continue
        by_protocol.setdefault(pid, []).append(run)
    groups = []
    for pid, members in sorted(by_protocol.items()):
        protocols = {tuple(sorted(r.comparability.items())) for r in members}
        protocol = dict(sorted(protocols)[0])
        if len(protocols) > 1:
            notes.append(f"protocol {pid}: runs disagree on protocol tags; the first set is shown")
        groups.append(Group(pid, protocol, _rows(members, notes)))
    # per dataset, the paper's prefix protocol first
    groups.sort(
        key=lambda g: (
            g.dataset,
            g.comparability.get("train_protocol", "") != "prefix",
            g.comparability.get("train_protocol", ""),
            g.protocol_id,
        )
    )
    return groups, notes


def _config(run: Run) -> dict[str, str]:
    return {
        k: v
        for k, v in run.params.items()
        if k not in NOT_CONFIGURATION and not k.startswith(("harness.", "study.", "trial"))
    }


def _rows(runs: Sequence[Run], notes: list[str]) -> list[Row]:
    by_model: dict[tuple, list[Run]] = {}
    for run in runs:
        by_model.setdefault((model_name(run), run.hidden), []).append(run)
    rows = []
    for (model, hidden), members in by_model.items():
        configs = [_config(r) for r in members]
        keys = sorted({k for c in configs for k in c})
        varying = [k for k in keys if len({c.get(k, "") for c in configs}) > 1]
        by_variant: dict[str, list[Run]] = {}
        for run, config in zip(members, configs):
            variant = ", ".join(f"{k.removeprefix('model.')}={config.get(k, '')}" for k in varying)
            by_variant.setdefault(variant, []).append(run)
        for variant, variant_runs in by_variant.items():
            by_seed: dict[str, Run] = {}
            for run in sorted(variant_runs, key=lambda r: (r.start_time, r.run_id)):
                if run.seed in by_seed:
                    notes.append(
                        f"{model} h={hidden} {variant} seed {run.seed}: {len(variant_runs)} runs "
                        f"share this seed; the latest ({run.run_id}) is used"
                    )
                by_seed[run.seed] = run
            ordered = [by_seed[s] for s in sorted(by_seed, key=seed_sort_key)]
            rows.append(Row(model, hidden, variant, ordered))
    rows.sort(key=Row.sort_key)
    return rows


def protocol_differences(groups: Sequence[Group]) -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    """For every pair of groups, the protocol keys whose values differ: (slug a, slug b, [(key, a, b)])."""
    out = []
    for i, a in enumerate(groups):
        for b in groups[i + 1 :]:
            keys = sorted(set(a.comparability) | set(b.comparability))
            diff = [
                (k, a.comparability.get(k, "-"), b.comparability.get(k, "-"))
                for k in keys
                if a.comparability.get(k) != b.comparability.get(k)
            ]
            out.append((a.slug, b.slug, diff))
    return out


# ------------------------------------------------------------------------------------ summaries


@dataclasses.dataclass
class RowSummary:
    mean: float
    std: float
    n: int
    values: list[float]


def row_summary(row: Row, metric: str) -> RowSummary | None:
    """A row's metric over its seeds: mean, standard deviation and the per-seed values."""
    key = mlflow_key(metric)
    values = [r.metrics[key] for r in row.runs if key in r.metrics]
    if not values:
        return None
    s = stats.mean_std_over_seeds(values)
    return RowSummary(s.mean, s.std, s.n, values)


# ------------------------------------------------------------------------------------ per user


class PerUser:
    """Per-user metric vectors of a row's seeds, aligned by user id."""

    def __init__(self, store: Store):
        self.store = store

    def ranks(self, row: Row) -> tuple[np.ndarray | None, list[np.ndarray], str]:
        """(user ids, per-seed rank vectors, problem) for a row; problem is '' when usable."""
        series = []
        for run in row.runs:
            s = self.store.per_user_ranks(run)
            if s is None:
                return None, [], f"{row.label} seed {run.seed}: no per-user ranks artifact"
            series.append(s)
        users = series[0].index.to_numpy()
        for s in series[1:]:
            if not np.array_equal(s.index.to_numpy(), users):
                return (
                    None,
                    [],
                    (f"{row.label}: seeds were evaluated on different test users ({len(users)} vs {len(s)} users)"),
                )
        return users, [s.to_numpy() for s in series], ""

    def vectors(self, row: Row, metric: str) -> tuple[np.ndarray | None, list[np.ndarray], str]:
        users, ranks, problem = self.ranks(row)
        if users is None:
            return None, [], problem
        name, k = parse_metric(metric)
        return users, [per_user_metric(r, name, k) for r in ranks], ""


#: the per-user test beside the seed test when the report's test is "seeds"
DEFAULT_USER_TEST = "ttest"


@dataclasses.dataclass
class ComparisonRow:
    """`row` vs `reference` on one metric. `result` is the per-user test of the trained networks
    (always there); `seeds` the seed test (None when a side has one seed, or when the report asked
    for a per-user test). The stars come from the seed test when `by_seeds`, else from `result`."""

    metric: str
    row: Row
    reference: Row
    result: stats.PairedResult
    seeds: stats.SeedUserResult | None = None
    by_seeds: bool = True
    p_adjusted: float = math.nan  # of the test that sets the stars; NaN when not testable
    significant: bool = False
    p_adjusted_users: float = math.nan
    significant_users: bool = False
    p_a_beats_b: float = math.nan  # share of seed pairs where the row's metric is higher (any seed count)

    @property
    def testable(self) -> bool:
        return self.seeds is not None or not self.by_seeds

    @property
    def primary(self):
        """The result behind the stars (seed or per-user test); None when not testable."""
        return self.seeds if self.by_seeds else self.result


@dataclasses.dataclass
class Significance:
    comparisons: list[ComparisonRow]
    notes: list[str]
    reference_present: bool
    correction: str
    n_users: int | None


def _partner(row: Row, refs: list[Row]) -> Row | None:
    same = [r for r in refs if r.hidden == row.hidden]
    exact = [r for r in same if r.variant == row.variant]
    if len(exact) == 1:
        return exact[0]
    if len(same) == 1:
        return same[0]
    if len(refs) == 1:
        return refs[0]
    return None


def user_test_of(test: str) -> str:
    """The per-user test of a report: the one asked for, or the t-test beside the seed test."""
    return DEFAULT_USER_TEST if test == stats.SEED_TEST else test


def compare_pair(
    metric: str,
    row: Row,
    reference: Row,
    a: list[np.ndarray],
    b: list[np.ndarray],
    test: str,
    alpha: float,
    n_resamples: int,
) -> ComparisonRow:
    """Both tests of one cell: the per-user test always, the seed test when asked and both rows
    have 2+ seeds (one seed says nothing about training randomness)."""
    confidence = 1 - alpha
    per_user = stats.paired_test_over_seeds(
        a, b, test=user_test_of(test), confidence=confidence, n_resamples=n_resamples, seed=0
    )
    by_seeds = test == stats.SEED_TEST
    seeds = stats.seed_user_test(a, b, confidence=confidence) if by_seeds and len(a) >= 2 and len(b) >= 2 else None
    beats = stats.prob_a_beats_b([v.mean() for v in a], [v.mean() for v in b])
    return ComparisonRow(metric, row, reference, per_user, seeds, by_seeds, p_a_beats_b=beats)


def adjust(comparisons: list[ComparisonRow], method: str, alpha: float) -> None:
    """Adjust the p-values of a table's family in place: the starring test over its testable
    comparisons, the per-user test over all of them (`method`: holm or bh)."""
    correct = stats.holm if method == "holm" else stats.benjamini_hochberg
    testable = [c for c in comparisons if c.testable]
    for c, p in zip(testable, correct([c.primary.p_value for c in testable]) if testable else []):
        c.p_adjusted = float(p)
        c.significant = bool(stats.significance_marker(float(p), alpha))
    for c, p in zip(comparisons, correct([c.result.p_value for c in comparisons]) if comparisons else []):
        c.p_adjusted_users = float(p)
        c.significant_users = bool(stats.significance_marker(float(p), alpha))


def compare_to_reference(
    group: Group,
    metrics: Sequence[str],
    reference: str,
    per_user: PerUser,
    test: str,
    alpha: float,
    n_resamples: int = 10_000,
) -> Significance:
    """Every non-reference row vs the reference model's row of the same hidden size (or the only
    reference row), for every metric; Holm over all these comparisons (the table's family)."""
    notes: list[str] = []
    refs = [r for r in group.rows if r.model == reference]
    if not refs:
        return Significance(
            [], [f"reference model {reference!r} is absent from this group: no significance tests"], False, "holm", None
        )
    comparisons: list[ComparisonRow] = []
    n_users = set()
    for row in group.rows:
        if row.model == reference:
            continue
        partner = _partner(row, refs)
        if partner is None:
            notes.append(f"{row.label}: no {reference} row of the same hidden size to compare with")
            continue
        for metric in metrics:
            users_a, a, problem_a = per_user.vectors(row, metric)
            users_b, b, problem_b = per_user.vectors(partner, metric)
            if users_a is None or users_b is None:
                notes.append(f"{row.label} vs {partner.label}: {problem_a or problem_b}; not tested")
                break
            if not np.array_equal(users_a, users_b):
                notes.append(
                    f"{row.label} vs {partner.label}: the test user sets differ "
                    f"({len(users_a)} vs {len(users_b)} users); refusing to pair them"
                )
                break
            comparison = compare_pair(metric, row, partner, a, b, test, alpha, n_resamples)
            comparisons.append(comparison)
            n_users.add(comparison.result.n)
    adjust(comparisons, "holm", alpha)
    return Significance(comparisons, notes, True, "holm", min(n_users) if n_users else None)


def focused(group: Group, models: Sequence[str], reference: str) -> Group:
    """The group with only the rows of `models` and the reference: a pre-declared family's table."""
    return dataclasses.replace(group, rows=[r for r in group.rows if r.model in models or r.model == reference])


def compare_all_pairs(
    group: Group,
    metric: str,
    per_user: PerUser,
    test: str,
    alpha: float,
    n_resamples: int = 10_000,
) -> Significance:
    """Exploratory: every pair of rows on one metric, Benjamini-Hochberg over the pairs."""
    notes: list[str] = []
    usable = []
    for row in group.rows:
        users, vectors, problem = per_user.vectors(row, metric)
        if users is None:
            notes.append(f"{row.label}: {problem}; left out of the all-pairs table")
        else:
            usable.append((row, users, vectors))
    comparisons = []
    for i, (row_a, users_a, a) in enumerate(usable):
        for row_b, users_b, b in usable[i + 1 :]:
            if not np.array_equal(users_a, users_b):
                notes.append(f"{row_a.label} vs {row_b.label}: the test user sets differ; not paired")
                continue
            comparisons.append(compare_pair(metric, row_a, row_b, a, b, test, alpha, n_resamples))
    adjust(comparisons, "bh", alpha)
    n = min((c.result.n for c in comparisons), default=None)
    return Significance(comparisons, notes, True, "bh", n)


# ------------------------------------------------------------------------------------ intervals


def rank_marks(values: Sequence[float | None], digits: int = 4) -> list[str]:
    """'best' / 'second' / '' per value (higher is better), compared at the printed precision so
    printed ties share a mark."""
    printed = [None if v is None or not math.isfinite(v) else Decimal(tb.num(v, digits)) for v in values]
    distinct = sorted({p for p in printed if p is not None}, reverse=True)
    best = distinct[0] if distinct else None
    second = distinct[1] if len(distinct) > 1 else None
    return [
        "best" if p is not None and p == best else "second" if p is not None and p == second else "" for p in printed
    ]
