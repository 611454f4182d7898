"""Hyper-parameter studies: per study, its optimisation history, parameter importances and, with
two objectives, its Pareto front (figure and table), rebuilt from the trial runs in the store."""

from __future__ import annotations

from harness.pareto import non_dominated
from harness.report import figures as fg
from harness.report import studies as st
from harness.report import tables as tb
from harness.report.document import Document
from harness.store.reader import Run


def add(doc: Document, runs: list[Run]) -> None:
    by_experiment: dict[str, list[Run]] = {}
    for run in runs:
        by_experiment.setdefault(run.experiment, []).append(run)
    found = [s for name in sorted(by_experiment) for s in st.studies_from_runs(name, by_experiment[name])]
    if not found:
        return
    doc.heading("Hyper-parameter studies")
    for study in found:
        _study(doc, study)


def _study(doc: Document, study: st.StoredStudy) -> None:
    doc.heading(f"Study {study.name}", 3)
    slug = "".join(c if c.isalnum() or c in "-._" else "-" for c in study.name).strip("-")
    best_fn = max if study.directions[0] == "maximize" else min
    best = best_fn(study.trials["objective_0"])
    doc.paragraph(
        f"{len(study.trials)} finished trials with objectives ({study.left_out} trial runs left out: "
        f"failed, pruned or without objectives). Objectives: "
        + ", ".join(
            f"objective_{i} = {n} ({d})" for i, (n, d) in enumerate(zip(study.objective_names, study.directions))
        )
        + f" (directions {study.directions_source}). Best objective_0: {best:.4f}. "
        f"Searched parameters: {', '.join(study.params) or 'none found'}."
    )
    frame = study.trials.rename(columns={"objective_0": "value"})[["number", "value"]]
    doc.figure(
        f"history_{slug}",
        fg.optimisation_history(
            frame, study.directions[0], study.objective_names[0], f"{study.name}: optimisation history"
        ),
        f"Optimisation history of study {study.name}: objective_0 ({study.objective_names[0]}) of each "
        f"finished trial and the best value so far ({study.directions[0]}).",
    )
    values, method = st.importances(study)
    if values:
        doc.figure(
            f"importance_{slug}",
            fg.param_importances(values, method, f"{study.name}: parameter importances"),
            f"Parameter importances of study {study.name} for objective_0, {method}, computed from the "
            "trial runs in the tracking store (an Optuna study rebuilt in memory).",
        )
        doc.table(
            tb.simple(
                f"importance_{slug}",
                f"Parameter importances: {study.name}",
                f"Importance of each searched parameter for objective_0 ({method}).",
                ["parameter", "importance"],
                [[k, f"{v:.6f}"] for k, v in sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))],
                align=["l", "r"],
            )
        )
    if study.n_objectives >= 2:
        doc.figure(
            f"pareto_{slug}",
            fg.pareto_plot(study.trials, study.directions, study.objective_names, f"{study.name}: Pareto front"),
            f"Pareto front of study {study.name}: objective_0 vs objective_1 of every finished trial; "
            f"directions {', '.join(study.directions[:2])} ({study.directions_source}).",
        )
        mask = non_dominated(study.trials[["objective_0", "objective_1"]].to_numpy(dtype=float), study.directions[:2])
        front = study.trials[mask].sort_values(["objective_0", "number"])
        doc.table(
            tb.simple(
                f"pareto_{slug}",
                f"Pareto-optimal trials: {study.name}",
                f"Non-dominated trials of study {study.name} (objective_0 {study.directions[0]}, objective_1 "
                f"{study.directions[1]}).",
                ["trial", "objective_0", "objective_1", *study.params],
                [
                    [
                        str(int(r["number"])),
                        f"{r['objective_0']:.6f}",
                        f"{r['objective_1']:.6f}",
                        *[str(r[p]) for p in study.params],
                    ]
                    for _, r in front.iterrows()
                ],
                align=["r"] * (3 + len(study.params)),
            )
        )
