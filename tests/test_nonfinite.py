"""A diverged model (NaN or infinite scores) fails its run with a clear error instead of producing
rank -1, Hit 1 and infinite NDCG/MRR; the tracker refuses non-finite ranking metrics; the report
leaves the failed run out and says why."""

import numpy as np
import pytest
import torch

from harness.config import make_config
from harness.evaluate import NonFiniteScoreError, target_ranks
from harness.metrics import per_user_metric
from harness.store.writer import NonFiniteMetricError, Tracker
from harness.train import Trainer

SMALL = {
    "dataset": "ml-latest-small",
    "max_len": 20,
    "epochs": 2,
    "batch_size": 512,
    "model_params": {"hidden_size": 16, "n_heads": 2, "n_layers": 1},
}


def test_nan_target_score_is_refused_not_ranked_first():
    scores = torch.tensor([[float("-inf"), 1.0, float("nan"), 2.0]])
    with pytest.raises(NonFiniteScoreError, match="NaN"):
        target_ranks(scores, torch.tensor([2]))
    masked = torch.tensor([[float("-inf"), 1.0, 3.0, float("-inf")]])  # -inf = masked items: allowed
    assert target_ranks(masked, torch.tensor([1])).item() == 1


def test_negative_or_nan_ranks_are_not_metrics():
    for bad in ([-1, 3], [np.nan, 3]):
        with pytest.raises(ValueError, match="finite and >= 0"):
            per_user_metric(np.array(bad), "ndcg", 10)


def test_tracker_refuses_non_finite_ranking_metrics_and_skips_unmeasured_others(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "unit")
    run_id = tracker.start_run("r", {}, {})
    with pytest.raises(NonFiniteMetricError, match="test_ndcg_at_10"):
        tracker.log_metrics(run_id, {"test_ndcg_at_10": float("nan"), "test_hit_at_10": 0.1})
    tracker.log_metrics(run_id, {"peak_memory_mb": float("nan"), "train_seconds": 1.5, "x": None})
    logged = tracker.client.get_run(run_id).data.metrics
    assert logged == {"train_seconds": 1.5}


def test_nan_scores_fail_the_run_and_the_report_lists_it(tmp_path):
    from harness.report import ReportOptions, generate_report

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "unit")
    trainer = Trainer(make_config(SMALL), tracker=tracker, progress=None)
    score = trainer.model.score

    def diverged(hidden):
        out = score(hidden)
        return torch.full_like(out, float("nan"))

    trainer.model.score = diverged
    with pytest.raises(NonFiniteScoreError, match="non-finite"):
        trainer.fit()
    (run,) = tracker.client.search_runs([tracker.experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"].startswith("NonFiniteScoreError")
    assert not [k for k in run.data.metrics if k.startswith("test_")]
    report = generate_report(ReportOptions(tracking_uri=uri, out=tmp_path / "out", name="r", runs="train"))
    (note,) = [n for n in report.notes if run.info.run_name in n]
    assert "FAILED: NonFiniteScoreError" in note and "not in the tables" in note
