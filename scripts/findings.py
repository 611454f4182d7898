"""docs/findings.md from its template and the committed reports: every number on the page is read
from a report's tables, so the page cannot drift from the reports it cites. Rerun after the reports
are regenerated (`scripts/reproduce_beauty.sh --report` does); `--check` exits 1 when the committed
page differs from what the reports give.

    python scripts/findings.py            # rewrite docs/findings.md
    python scripts/findings.py --check    # is docs/findings.md what the reports say?

In the template (docs/findings.md.j2), `report("low_dim_beauty")` is one committed report:
`.row(model, hidden)` a results-table row (`.pm("hit@10")` "mean ± std", `.mean(...)`, `.seeds`,
`.s_epoch`), `.vs(metric, model, hidden)` its significance-table row against the report's reference
(`.diff`, `.ci`, `.p`, `.holm`, `.verdict`; `.against_reference(metric, models)` several), `.confirmed(model)` the rows of its narrower family
(`report --confirm`, Holm over that family alone), `.pair(metric, a, b)` an all-pairs row (Benjamini-Hochberg),
`.verdicts(metric, a, b, hidden)` one pair's verdict in every family that tests it (`family_words` says them),
`.drops(metric, model)` the widths where a model falls below its hidden-64 self, `.by_chunk(model, seq_len,
column)` a benchmark column over chunk sizes (`extremes` finds its highest or lowest chunks);
`epoch_seconds(model, hidden, protocol)` is reports/bench_cpu/epochs.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path

import jinja2

from harness.report.tables import shown

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "docs" / "findings.md.j2"
PAGE = ROOT / "docs" / "findings.md"
ALPHA = 0.05  # the reports' significance level (after Holm or Benjamini-Hochberg)
GROUP = "(group)"  # the key under which a results row records its table's protocol group


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _only(rows: list[dict[str, str]], what: str, **match: str) -> dict[str, str]:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    if len(found) != 1:
        raise LookupError(f"{what}: {len(found)} rows match {match} (the template asks for one)")
    return found[0]


def signed(text: str, places: int = 4, negate: bool = False) -> str:
    """A CSV number as its table cell shows it, signed: +0.0039, \N{MINUS SIGN}0.0039 (negated when
    asked); a difference that rounds to zero has no sign"""
    value = -Decimal(text) if negate else Decimal(text)
    printed = shown(str(value), places, sign=True)
    if Decimal(printed) == 0:
        return shown("0", places)
    return printed.replace("-", "\N{MINUS SIGN}")


def interval(low: str, high: str, negate: bool = False) -> str:
    """a CI from its two CSV cells, as the page prints it; negated, the bounds swap ([-high, -low])"""
    if negate:
        low, high = high, low
    return f"[{signed(low, negate=negate)}, {signed(high, negate=negate)}]"


def metric_names(row: dict[str, str]) -> list[str]:
    """the metrics of a results row (its `<metric>_mean` columns)"""
    return [column.removesuffix("_mean") for column in row if column.endswith("_mean")]


def p_value(text: str) -> str:
    """A CSV p-value (1.327e-02) as the page prints it: 3 decimals (0.013), more where 3 would print
    the significance level itself (0.05002), or 2 significant digits below 0.001 (4.2e-04), rounded
    half away from zero from the cell's text as a reader would"""
    value = Decimal(text)
    if value >= Decimal("0.001"):
        # more decimals where 3 would print the significance level itself ("adjusted 0.050, not
        # significant" reads as a contradiction): 5.002e-02 prints 0.05002
        alpha, decimals = Decimal(str(ALPHA)), 3
        while Decimal(shown(text, decimals)) == alpha != value and decimals < 6:
            decimals += 1
        return shown(text, decimals)
    with localcontext(rounding=ROUND_HALF_UP):
        mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent):+03d}"  # 4.2e-04, as Python prints a float


@dataclass
class ResultRow:
    cells: dict[str, str]

    def mean(self, metric: str) -> str:
        return shown(self.cells[f"{metric}_mean"])

    def pm(self, metric: str) -> str:
        """mean ± standard deviation over seeds; the mean alone for one seed"""
        std = self.cells[f"{metric}_std"]
        return f"{self.mean(metric)} ± {shown(std)}" if std else self.mean(metric)

    @property
    def seeds(self) -> int:
        return int(self.cells["n_seeds"])

    def value(self, metric: str) -> float:
        return float(self.cells[f"{metric}_mean"])

    @property
    def variant(self) -> str:
        return self.cells["variant"]

    @property
    def model(self) -> str:
        return self.cells["model"]

    @property
    def s_epoch(self) -> str:
        return shown(self.cells["seconds_per_epoch"], 1)


@dataclass
class Comparison:
    cells: dict[str, str]

    @property
    def model(self) -> str:
        return self.cells["model"]

    @property
    def tested(self) -> bool:
        return self.cells["testable"] == "true"

    @property
    def seeds(self) -> str:
        return f"{self.cells['n_seeds']} v {self.cells['n_seeds_reference']}"

    @property
    def hidden(self) -> int:
        return int(self.cells["hidden"])

    @property
    def difference(self) -> float:
        return float(self.cells["mean_diff"])

    @property
    def diff(self) -> str:
        return signed(self.cells["mean_diff"])

    @property
    def ci(self) -> str:
        return interval(self.cells["ci_low"], self.cells["ci_high"])

    @property
    def reverse_diff(self) -> str:
        """the reference minus the model (the table holds the model minus the reference)"""
        return signed(self.cells["mean_diff"], negate=True)

    @property
    def reverse_seeds(self) -> str:
        return f"{self.cells['n_seeds_reference']} v {self.cells['n_seeds']}"

    @property
    def reverse_ci(self) -> str:
        return interval(self.cells["ci_low"], self.cells["ci_high"], negate=True)

    @property
    def p(self) -> str:
        return p_value(self.cells["p_value"])

    @property
    def spans_zero(self) -> bool:
        """the (unadjusted) confidence interval holds no difference; False for an untested row (no interval)"""
        return self.tested and float(self.cells["ci_low"]) <= 0 <= float(self.cells["ci_high"])

    @property
    def p_raw(self) -> float:
        return float(self.cells["p_value"])

    @property
    def df(self) -> str:
        return shown(self.cells["df"], 1)

    @property
    def fewest_seeds(self) -> int:
        return min(int(self.cells["n_seeds"]), int(self.cells["n_seeds_reference"]))

    @property
    def holm(self) -> str:
        return p_value(self.cells["p_holm"])

    @property
    def significant(self) -> bool:
        # the report's own verdict (adjusted p <= alpha on the unrounded value), not the rounded cell's
        return self.tested and self.cells["significant"] == "true"

    @property
    def verdict(self) -> str:
        """the seed test's answer in words, with the numbers it rests on"""
        if not self.tested:
            return f"not tested ({self.seeds} seeds)"
        word = "significant" if self.significant else "not significant"
        return f"{word} after Holm ({self.seeds} seeds: CI {self.ci}, p {self.p}, Holm {self.holm})"


@dataclass
class Pair:
    """an all-pairs row (the report's primary metric, Benjamini-Hochberg over the table), read as
    `a` minus `b` whichever order the table holds the pair in"""

    cells: dict[str, str]
    flipped: bool

    @property
    def tested(self) -> bool:
        return self.cells["testable"] == "true"

    @property
    def seeds(self) -> str:
        a, b = self.cells["n_seeds_a"], self.cells["n_seeds_b"]
        return f"{b} v {a}" if self.flipped else f"{a} v {b}"

    @property
    def diff(self) -> str:
        return signed(self.cells["mean_diff"], negate=self.flipped)

    @property
    def difference(self) -> float:
        return -float(self.cells["mean_diff"]) if self.flipped else float(self.cells["mean_diff"])

    @property
    def significant(self) -> bool:
        return self.tested and self.cells["significant"] == "true"

    @property
    def adjusted(self) -> str:
        return p_value(self.cells["p_bh"])

    @property
    def ci(self) -> str:
        return interval(self.cells["ci_low"], self.cells["ci_high"], negate=self.flipped)

    @property
    def verdict(self) -> str:
        if not self.tested:
            return f"not tested ({self.seeds} seeds)"
        word = "significant" if self.significant else "not significant"
        return f"{word} after Benjamini-Hochberg ({self.seeds} seeds: p {p_value(self.cells['p_value'])}, adjusted {self.adjusted})"


@dataclass
class Verdict:
    """one pair's test in one family of comparisons"""

    family: str  # e.g. "Holm in the narrower family"
    tested: bool
    significant: bool
    adjusted: str


SIGNIFICANCE_FAMILY = "Holm {} in the significance table"
NARROW_FAMILY = "Holm {} in the narrower family"
PAIRS_FAMILY = "Benjamini-Hochberg {} in the all-pairs table"


def family_words(verdicts: list[Verdict]) -> str:
    """where a pair is significant and where not, with the adjusted p-values: 'significant by Holm
    0.042 in the narrower family, not by Holm 1.000 in the significance table'"""
    tested = [v for v in verdicts if v.tested]
    if not tested:
        return "not tested"
    yes = [v.family.format(v.adjusted) for v in tested if v.significant]
    no = [v.family.format(v.adjusted) for v in tested if not v.significant]
    if yes and no:
        return f"significant by {listing(yes, 'and')}, not by {listing(no, 'or')}"
    return f"significant by {listing(yes, 'and')}" if yes else f"not significant by {listing(no, 'or')}"


def listing(items: list[str], word: str) -> str:
    """a, b and c"""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {word} {items[-1]}"


def settled(verdicts: list[Verdict]) -> bool:
    """every family that tests the pair gives the same verdict"""
    return len({v.significant for v in verdicts if v.tested}) == 1


def significant_somewhere(verdicts: list[Verdict]) -> bool:
    return any(v.tested and v.significant for v in verdicts)


class Report:
    """One committed report's tables (reports/<name>/tables)."""

    def __init__(self, name: str, reports: Path):
        self.name = name
        tables = reports / name / "tables"
        if not tables.is_dir():
            raise LookupError(f"reports/{name} has no tables")
        self.results = [
            {**r, GROUP: p.stem.removeprefix("results_")}
            for p in sorted(tables.glob("results_*.csv"))
            for r in _read_csv(p)
        ]
        self.significance = [r for p in sorted(tables.glob("significance_*.csv")) for r in _read_csv(p)]
        self.pairs = [r for p in sorted(tables.glob("allpairs_*.csv")) for r in _read_csv(p)]
        self.confirm = [r for p in sorted(tables.glob("confirm_*.csv")) for r in _read_csv(p)]
        bench = tables / "bench.csv"
        self.bench_rows = _read_csv(bench) if bench.is_file() else []

    def row(self, model: str, hidden: int = 64, variant: str = "") -> ResultRow:
        what = f"reports/{self.name} results"
        return ResultRow(_only(self.results, what, model=model, hidden=str(hidden), variant=variant))

    def widths(self, model: str, variant: str = "") -> list[int]:
        """the hidden sizes with a row for `model`, smallest first"""
        return sorted(int(r["hidden"]) for r in self.results if r["model"] == model and r["variant"] == variant)

    def seeds_at(self, model: str, hidden: int) -> int:
        """the seeds behind a row, 0 where there is no row"""
        return self.row(model, hidden).seeds if hidden in self.widths(model) else 0

    def vs(self, metric: str, model: str, hidden: int = 64, variant: str = "") -> Comparison:
        what = f"reports/{self.name} significance"
        match = dict(metric=metric, model=model, hidden=str(hidden), variant=variant)
        return Comparison(_only(self.significance, what, **match))

    def confirmed(self, model: str, variant: str = "") -> list[Comparison]:
        """the rows of `model` in the report's narrower family (table confirm_*, `report --confirm`),
        smallest width first; their Holm is over that family alone"""
        found = [Comparison(r) for r in self.confirm if r["model"] == model and r["variant"] == variant]
        if not found:
            raise LookupError(f"reports/{self.name} has no confirm table rows for {model}")
        return sorted(found, key=lambda c: c.hidden)

    def rows(self, model: str) -> list[ResultRow]:
        """every results row of `model` (all its variants, e.g. chunk sizes)"""
        return [ResultRow(r) for r in self.results if r["model"] == model]

    def verdicts(self, metric: str, a: str, b: str, hidden: int = 64) -> list[Verdict]:
        """`a` against `b` (both at `hidden`) in every family of this report that tests the pair: the
        significance table (Holm; either may be the reference), the narrower family, the all-pairs table"""
        found = []
        for rows, family in ((self.significance, SIGNIFICANCE_FAMILY), (self.confirm, NARROW_FAMILY)):
            for r in rows:
                same = r["metric"] == metric and r["variant"] == r["reference_variant"] == ""
                if (
                    same
                    and {r["model"], r["reference_model"]} == {a, b}
                    and r["hidden"] == r["reference_hidden"] == str(hidden)
                ):
                    comparison = Comparison(r)
                    found.append(
                        Verdict(
                            family,
                            comparison.tested,
                            comparison.significant,
                            comparison.holm if comparison.tested else "",
                        )
                    )
        try:
            pair = self.pair(metric, f"{a} h={hidden}", f"{b} h={hidden}")
        except LookupError:  # the all-pairs table holds the primary metric only
            return found
        return [*found, Verdict(PAIRS_FAMILY, pair.tested, pair.significant, pair.adjusted if pair.tested else "")]

    def drops(self, metric: str, model: str, against: int = 64) -> list[int]:
        """the widths where `model` is significantly below its own `against`-wide row (all-pairs table)"""
        widths = [h for h in self.widths(model) if h != against]
        pairs = {h: self.pair(metric, f"{model} h={h}", f"{model} h={against}") for h in widths}
        return [h for h, pair in pairs.items() if pair.significant and pair.difference < 0]

    def differing_metrics(self, model: str) -> list[str]:
        """the metrics whose mean is not the same cell in every row of `model` (e.g. over chunk sizes)"""
        rows = [r for r in self.results if r["model"] == model]
        metrics = metric_names(rows[0]) if rows else []
        return [m for m in metrics if len({r[f"{m}_mean"] for r in rows}) > 1]

    def metric_count(self) -> int:
        """how many metrics the results tables hold"""
        return len(metric_names(self.results[0])) if self.results else 0

    def gaps(self, metric: str, model: str, variant: str = "") -> list[Comparison]:
        """`model` against the reference at every width where both have a row, smallest first"""
        return [
            self.vs(metric, model, h, variant)
            for h in self.widths(model, variant)
            if self.tested_against_reference(metric, model, h)
        ]

    def group_of(self, model: str, hidden: int = 64) -> str:
        """the protocol group (results table name after `results_`) of `model`'s row"""
        return self.row(model, hidden).cells[GROUP]

    def against_reference(self, metric: str, models: list[str], hidden: int = 64) -> list[Comparison]:
        """`.vs` of each model in turn"""
        return [self.vs(metric, model, hidden) for model in models]

    def tested_against_reference(self, metric: str, model: str, hidden: int = 64) -> bool:
        """whether the significance table has `model`'s row (it lacks models of another protocol group)"""
        return any(
            r["metric"] == metric and r["model"] == model and r["hidden"] == str(hidden) for r in self.significance
        )

    def pair(self, metric: str, a: str, b: str) -> Pair:
        """the all-pairs row of `a` and `b` (labels as the table has them, e.g. "ssd4rec h=16")"""
        for flipped, (first, second) in ((False, (a, b)), (True, (b, a))):
            found = [r for r in self.pairs if r["metric"] == metric and r["a"] == first and r["b"] == second]
            if found:
                return Pair(found[0], flipped)
        raise LookupError(f"reports/{self.name} all pairs: no {metric} row for {a} and {b}")

    def bench(
        self, model: str, seq_len: int, column: str, chunks: tuple[int, ...] = (), protocol: str = "prefix"
    ) -> list[float]:
        """a benchmark column over chunk sizes (all of them, or those given)"""
        values = [
            float(r[column])
            for r in self.bench_rows
            if r["model"] == model
            and r["seq_len"] == str(seq_len)
            and r["protocol"] == protocol
            and (not chunks or int(r["chunk"]) in chunks)
        ]
        if not values:
            raise LookupError(
                f"reports/{self.name} bench: no {model} {protocol} row at seq_len {seq_len} chunks {chunks}"
            )
        return values

    def by_chunk(self, model: str, seq_len: int, column: str) -> dict[int, float]:
        """a benchmark column keyed by chunk size (prefix protocol)"""
        rows = [r for r in self.bench_rows if r["model"] == model and r["seq_len"] == str(seq_len)]
        rows = [r for r in rows if r["protocol"] == "prefix"]
        chunks = [int(r["chunk"]) for r in rows]
        if not rows or len(set(chunks)) != len(chunks):
            raise LookupError(
                f"reports/{self.name} bench: {len(rows)} {model} rows at seq_len {seq_len}, chunks {chunks}"
            )
        return {int(r["chunk"]): float(r[column]) for r in rows}

    def throughput(self, model: str, protocol: str = "prefix", column: str = "train seq/s") -> float:
        """one benchmark cell's value (sequence length 50): the table must hold exactly one such cell"""
        values = self.bench(model, 50, column, protocol=protocol)
        if len(values) != 1:
            raise LookupError(f"reports/{self.name} bench: {len(values)} {model} {protocol} cells at seq_len 50")
        return values[0]

    @property
    def bench_machine(self) -> str:
        machines = sorted({r["machine"] for r in self.bench_rows})
        if len(machines) != 1:
            raise LookupError(f"reports/{self.name} bench: {len(machines)} machines, the template expects one")
        return machines[0]


LABELS = {"hit": "HR", "ndcg": "NDCG", "mrr": "MRR"}


def label(metric: str) -> str:
    """a metric key as the page names it: ndcg@10 -> NDCG@10"""
    name, _, cutoff = metric.partition("@")
    return f"{LABELS.get(name, name)}@{cutoff}" if cutoff else LABELS.get(name, name)


def fixed(value: float, places: int = 0) -> str:
    """a computed number at `places` decimals, rounded half away from zero like the tables' cells"""
    return shown(repr(float(value)), places)


def span(values: list[float], places: int = 0) -> str:
    """lowest-highest of a list of values (the value, when they agree at that precision)"""
    low, high = fixed(min(values), places), fixed(max(values), places)
    return low if low == high else f"{low}-{high}"


def extremes(by_chunk: dict[int, float], highest: bool = True) -> list[int]:
    """the chunk sizes holding the highest (or lowest) value; several when the cells tie"""
    target = max(by_chunk.values()) if highest else min(by_chunk.values())
    return sorted(chunk for chunk, value in by_chunk.items() if value == target)


def render(reports: Path = ROOT / "reports") -> str:
    epochs = json.loads((reports / "bench_cpu" / "epochs" / "results.json").read_text())

    def epoch_seconds(model: str, hidden: int, protocol: str) -> str:
        match = dict(model=model, hidden=hidden, protocol=protocol)
        row = [r for r in epochs["rows"] if all(r[k] == v for k, v in match.items())]
        if len(row) != 1:
            raise LookupError(f"reports/bench_cpu/epochs: {len(row)} rows match {match}")
        return f"{row[0]['current_epoch_s']:.1f}"

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE.parent),
        undefined=jinja2.StrictUndefined,  # a misspelt name in the template is an error, not a blank
        keep_trailing_newline=True,
    )
    env.filters.update(span=span, fixed=fixed, label=label)
    env.globals.update(
        extremes=extremes, family_words=family_words, settled=settled, significant_somewhere=significant_somewhere
    )
    env.globals.update(report=lambda name: Report(name, reports), epoch_seconds=epoch_seconds, alpha=ALPHA)
    return env.get_template(TEMPLATE.name).render()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/findings.md differs from the reports")
    args = parser.parse_args(argv)
    try:
        page = render()
    except (LookupError, jinja2.TemplateError) as err:
        print(f"error: {TEMPLATE.relative_to(ROOT)}: {err}", file=sys.stderr)
        return 2
    if args.check:
        if PAGE.read_text() != page:
            print(f"{PAGE.relative_to(ROOT)} differs from the reports: run python scripts/findings.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
