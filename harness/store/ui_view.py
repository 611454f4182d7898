"""The MLflow UI's saved view of an experiment's tested runs, and the links that open it.

What the runs page of MLflow 3.17's UI shows by default cannot be set from the store: metric columns
start hidden (Source, Models and Dataset are the default columns), a parent run starts collapsed over
its children, and which of the UI's two sides opens (GenAI or model training) comes from the link's
`workflowType` or the browser's last choice, never from the experiment (its kind tag only steers
earlier 3.x UIs). What the store can hold is a saved view: an experiment tag that the runs page
lists under "Views" and that a link opens by its id (`viewStateShareKey`). The harness keeps one per
experiment: the tested runs only (a study's final runs, else `harness train` runs), a study's finals
grouped under their study, sorted by name, the objective and the test metrics as the first columns.
`harness ui` prints a link per experiment that opens the model-training side on that view.
"""

from __future__ import annotations

import json
import re
import time
from urllib.parse import urlencode

from harness.metrics import DEFAULT_TOPK, METRICS, metric_key
from harness.store import contract as tc

VIEW_NAME = "harness: tested runs"
_OBJECTIVE = re.compile(r"^(selected_)?objective_(\d+)$")  # a trial's objective, a final run's copy
_TEST = re.compile(r"^test_([a-z]+)_at_(\d+)$")
_HEADLINE_FIRST = ("ndcg", "hit", "mrr")  # NDCG@K leads: the usual objective and the paper's headline
_RUN_NAME_COLUMN = "attributes.`Run Name`"  # the UI's column id of the run name
_RUN_NAME_WIDTH = 330  # a run name in full (`tim4rec-causal-ml-latest-small-hidden_size=64-s2021`)
_METRIC_WIDTH = 120


def runs_link(base_url: str, experiment_id: str, view: bool = True) -> str:
    """The runs table of an experiment on the UI's model-training side, on the harness's view."""
    query = {"workflowType": "machine_learning"}
    if view:
        query["viewStateShareKey"] = tc.UI_VIEW_ID
    return f"{base_url}/#/experiments/{experiment_id}/runs?{urlencode(query)}"


def write_view(client, experiment_id: str) -> bool:
    """Write (or bring up to date) the harness's view of an experiment; False when it holds no
    tested runs of the harness and no study (nothing to view: MLflow's Default, bench cells)."""
    kind, metric_keys = _tested_runs(client, experiment_id)
    if kind is None:
        return False
    state = view_state(kind, metric_keys)
    key = tc.UI_VIEW_TAG_PREFIX + tc.UI_VIEW_ID
    stored = _stored_view(client.get_experiment(experiment_id).tags.get(key))
    if stored == (VIEW_NAME, state):
        return True  # unchanged: the tag keeps its time
    now = int(time.time() * 1000)
    value = {"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    client.set_experiment_tag(experiment_id, key, json.dumps(value))
    return True


def view_state(kind: str, metric_keys: set[str]) -> dict:
    """The view itself: the runs page's search facets and table state, as the UI serialises them."""
    columns = [f"metrics.`{key}`" for key in _columns(kind, metric_keys)]
    grouped = kind == tc.KIND_FINAL
    return {
        # search facets
        "searchFilter": f"tags.`{tc.KIND}` = '{kind}'",
        "orderByKey": f"tags.`{tc.RUN_NAME}`",
        "orderByAsc": True,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        # table: the UI applies widths only to the columns it is given an order for
        "selectedColumns": columns,
        "columnOrder": [_RUN_NAME_COLUMN, *columns],
        "columnWidths": {_RUN_NAME_COLUMN: _RUN_NAME_WIDTH, **dict.fromkeys(columns, _METRIC_WIDTH)},
        # a study's finals under one group row per study (mean of its runs' metrics), expanded
        "groupBy": {
            "aggregateFunction": "average",
            "groupByKeys": [{"mode": "tag", "groupByData": tc.STUDY}],
        }
        if grouped
        else None,
        "groupsExpanded": {},
    }


def _columns(kind: str, metric_keys: set[str]) -> list[str]:
    """The objective (a final run's copy of it) and the test metrics, headline first; before any
    run is tested, the names they will have at the default cut-offs."""
    objectives = sorted((int(m[2]), key) for key in metric_keys if (m := _OBJECTIVE.match(key)))
    tests = [(int(m[2]), m[1], key) for key in metric_keys if (m := _TEST.match(key)) and m[1] in METRICS]
    if not tests:
        tests = [(k, metric, metric_key(metric, k, "test")) for k in DEFAULT_TOPK for metric in METRICS]
        if kind == tc.KIND_FINAL and not objectives:
            objectives = [(0, tc.selected_objective_key(0))]
    tests.sort(key=lambda t: (t[0], _HEADLINE_FIRST.index(t[1])))
    return [key for _, key in objectives] + [key for _, _, key in tests]


def _tested_runs(client, experiment_id: str) -> tuple[str | None, set[str]]:
    """Which runs the view shows (final runs of a study, else train runs) and their metric names."""
    for kind in (tc.KIND_FINAL, tc.KIND_STUDY, tc.KIND_TRAIN):
        runs = client.search_runs([experiment_id], filter_string=f"tags.`{tc.KIND}` = '{kind}'", max_results=200)
        if runs and kind == tc.KIND_STUDY:
            return tc.KIND_FINAL, set()  # a study before its first final run
        if runs:
            keys = {key for run in runs for key in run.data.metrics}
            return kind, {key for key in keys if _OBJECTIVE.match(key) or _TEST.match(key)}
    return None, set()


def _stored_view(value: str | None) -> tuple[str, dict] | None:
    """(name, state) of the view a tag holds; None for no tag or one this code cannot read."""
    try:
        stored = json.loads(value) if value else None
        return stored["name"], json.loads(stored["state"])
    except (ValueError, TypeError, KeyError):
        return None
