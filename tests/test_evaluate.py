"""Full-ranking evaluation and metrics against hand-computed values."""

import math

import numpy as np
import pytest
import torch

import models
from harness.data.catalogue import load
from harness.data.samples import eval_windows
from harness.evaluate import evaluate, target_ranks
from harness.metrics import metric_key, parse_metric, per_user_metric, summarise


def test_metrics_against_hand_computed_values():
    ranks = np.array([0, 1, 4, 9, 10, 60])
    # hit@10: ranks 0, 1, 4, 9 are inside -> 4/6
    assert summarise(ranks, [10])["hit_at_10"] == pytest.approx(4 / 6)
    ndcg = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 6
    assert summarise(ranks, [10])["ndcg_at_10"] == pytest.approx(ndcg)
    mrr = (1 + 1 / 2 + 1 / 5 + 1 / 10) / 6
    assert summarise(ranks, [10])["mrr_at_10"] == pytest.approx(mrr)
    assert per_user_metric(ranks, "hit", 50).tolist() == [1, 1, 1, 1, 1, 0]
    assert metric_key("ndcg", 10, "test") == "test_ndcg_at_10"
    assert parse_metric("ndcg@20") == ("ndcg", 20) == parse_metric("ndcg_at_20")
    with pytest.raises(ValueError, match="unknown metric"):
        parse_metric("auc@10")


def test_ties_count_against_the_target():
    scores = torch.tensor([[float("-inf"), 1.0, 2.0, 2.0, 0.5]])
    # target 2 ties with item 3: pessimistic rank 1; target 4 has three items above: rank 3
    assert target_ranks(scores, torch.tensor([2])).item() == 1
    assert target_ranks(scores, torch.tensor([4])).item() == 3
    constant = torch.zeros(1, 6)
    constant[0, 0] = float("-inf")
    assert target_ranks(constant, torch.tensor([3])).item() == 4  # worst among 5 real items


@pytest.fixture
def small_model():
    data = load("ml-latest-small")  # embedded: no shared folder needed
    torch.manual_seed(0)
    model = models.build("sasrec", data.n_items, 50, {"hidden_size": 16, "n_heads": 2})
    return data, model


def test_metrics_do_not_depend_on_eval_batch_size(small_model):
    data, model = small_model
    windows = eval_windows(data, "test", 50)
    a = evaluate(model, data, windows, batch_size=4096)
    b = evaluate(model, data, windows, batch_size=777)
    assert np.array_equal(a.ranks, b.ranks)
    assert len(a.ranks) == data.n_users and a.ranks.min() >= 0 and a.ranks.max() < data.n_items


def test_rank_matches_a_direct_full_ranking(small_model):
    data, model = small_model
    windows = eval_windows(data, "valid", 50).subset(np.arange(64))
    result = evaluate(model, data, windows, batch_size=16)
    model.eval()
    for row in range(0, 64, 9):
        start, end = windows.starts[row], windows.ends[row]
        items = torch.from_numpy(data.items[start:end]).view(1, -1)
        with torch.no_grad():
            scores = model.score(model.last_hidden(items, None, torch.tensor([end - start])))[0]
        scores[0] = float("-inf")
        target = data.items[end]
        # only the padding id is masked: seen items stay rankable
        expected = int((scores > scores[target]).sum() + (scores == scores[target]).sum() - 1)
        assert result.ranks[row] == expected


def test_mask_seen_removes_history_items_but_keeps_the_target(small_model):
    data, model = small_model
    windows = eval_windows(data, "test", 50)
    plain = evaluate(model, data, windows)
    masked = evaluate(model, data, windows, mask_seen=True)
    assert np.all(masked.ranks <= plain.ranks)
    assert np.any(masked.ranks < plain.ranks)
