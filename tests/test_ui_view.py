"""The MLflow UI's saved view of an experiment's tested runs (harness/store/ui_view.py): what it holds,
when it is written, and the link that opens it. What a browser makes of it: scripts/ui_check.py."""

from __future__ import annotations

import json

import pytest

from harness.store import contract as tc
from harness.store.ui_view import VIEW_NAME, runs_link, view_state, write_view

VIEW_TAG = tc.UI_VIEW_TAG_PREFIX + tc.UI_VIEW_ID


@pytest.fixture
def store(tmp_path):
    from harness.store.writer import Tracker

    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "a_study")


def _run(store, kind: str, metrics: dict[str, float], name: str = "run") -> str:
    run_id = store.start_run(name, {}, {tc.KIND: kind, tc.STUDY: "a_study"})
    if metrics:
        store.log_metrics(run_id, metrics)
    return run_id


def _stored(store) -> tuple[dict, dict]:
    envelope = json.loads(store.client.get_experiment(store.experiment_id).tags[VIEW_TAG])
    return envelope, json.loads(envelope["state"])


def test_the_view_shows_final_runs_grouped_under_their_study_objective_and_test_metrics_first():
    keys = {"test_hit_at_10", "test_ndcg_at_20", "test_ndcg_at_10", "selected_objective_0", "valid_ndcg_at_10"}
    state = view_state(tc.KIND_FINAL, keys)
    assert state["searchFilter"] == "tags.`harness.kind` = 'final'"
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "harness.study"}]
    assert state["selectedColumns"] == [
        "metrics.`selected_objective_0`",
        "metrics.`test_ndcg_at_10`",
        "metrics.`test_hit_at_10`",
        "metrics.`test_ndcg_at_20`",
    ]
    # widths hold only for ordered columns: the run name first, wide enough to read in full
    assert state["columnOrder"] == ["attributes.`Run Name`", *state["selectedColumns"]]
    assert state["columnWidths"]["attributes.`Run Name`"] >= 300
    # no search-facet or table field the UI does not know (it would drop the whole view)
    assert set(state) <= {
        "searchFilter",
        "orderByKey",
        "orderByAsc",
        "startTime",
        "lifecycleFilter",
        "modelVersionFilter",
        "datasetsFilter",
        "selectedColumns",
        "columnOrder",
        "columnWidths",
        "groupBy",
        "groupsExpanded",
    }


def test_a_study_without_finals_yet_gets_the_columns_they_will_have(store):
    _run(store, tc.KIND_STUDY, {"wall_seconds": 1.0}, name="a_study")
    _run(store, tc.KIND_TRIAL, {"objective_0": 0.1})
    assert write_view(store.client, store.experiment_id)
    envelope, state = _stored(store)
    assert envelope["name"] == VIEW_NAME
    assert state["selectedColumns"][:2] == ["metrics.`selected_objective_0`", "metrics.`test_ndcg_at_10`"]
    assert len(state["selectedColumns"]) == 1 + 9  # hit, ndcg, mrr at 10, 20, 50


def test_the_view_follows_the_finals_and_is_rewritten_only_when_it_changes(store):
    _run(store, tc.KIND_STUDY, {}, name="a_study")
    _run(store, tc.KIND_FINAL, {"selected_objective_0": 0.2, "test_ndcg_at_5": 0.1, "test_mrr_at_5": 0.1})
    assert write_view(store.client, store.experiment_id)
    first, state = _stored(store)
    assert state["selectedColumns"] == [
        "metrics.`selected_objective_0`",
        "metrics.`test_ndcg_at_5`",
        "metrics.`test_mrr_at_5`",
    ]
    assert write_view(store.client, store.experiment_id)
    assert _stored(store)[0] == first  # same view: the tag and its time stay
    store.client.set_experiment_tag(store.experiment_id, VIEW_TAG, "not a view")
    assert write_view(store.client, store.experiment_id)
    assert _stored(store)[1] == state


def test_train_runs_get_a_view_without_groups_and_other_experiments_none(store):
    from harness.store.writer import Tracker

    _run(store, tc.KIND_TRAIN, {"test_ndcg_at_10": 0.1})
    assert write_view(store.client, store.experiment_id)
    state = _stored(store)[1]
    assert state["searchFilter"] == "tags.`harness.kind` = 'train'" and state["groupBy"] is None
    bench = Tracker(store.uri, "bench")
    bench.start_run("cell", {}, {tc.KIND: tc.KIND_BENCH})
    assert not write_view(bench.client, bench.experiment_id)
    assert VIEW_TAG not in bench.client.get_experiment(bench.experiment_id).tags


def test_the_link_opens_the_model_training_side_on_the_view():
    link = runs_link("http://127.0.0.1:5000", "7")
    assert link == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=harness-tested"
    )


def test_ui_lists_the_views_of_a_store_it_cannot_write(store, monkeypatch, capsys):
    from harness.commands import ui
    from harness.store import ui_view

    _run(store, tc.KIND_FINAL, {"test_ndcg_at_10": 0.1})
    assert ui._open_on_the_runs_table(store.uri) == [("a_study", store.experiment_id)]  # writes the view

    def refused(*args, **kwargs):
        raise PermissionError("attempt to write a readonly database")

    monkeypatch.setattr(ui_view, "write_view", refused)
    assert ui._open_on_the_runs_table(store.uri) == [("a_study", store.experiment_id)]  # the view it has
    assert capsys.readouterr().out.count("note: the store's views were not brought up to date") == 1
