"""`compile` (harness/compiling.py) changes nothing but float rounding: every model's compiled encoder
gives the eager forward and gradients to 1e-5 relative, dropout included, and a short compiled
training run ends at the eager run's test metrics. Slow: inductor compiles each model's graph
(tens of seconds per model on 2 cores)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import models
from harness.compiling import EAGER, INDUCTOR, compile_encoder, missing_toolchain
from harness.config import make_config
from harness.data.catalogue import load
from harness.data.samples import eval_windows, gather
from harness.train import Trainer

CPU = torch.device("cpu")
MAX_LEN = 20
needs_toolchain = pytest.mark.skipif(missing_toolchain(CPU) is not None, reason="no C++ compiler for inductor")


@pytest.fixture(scope="module")
def data():
    return load("ml-latest-small")


@pytest.fixture(scope="module")
def batch(data):
    """32 real test windows with a spread of lengths (1 to 20), trimmed to the longest."""
    windows = eval_windows(data, "test", MAX_LEN)
    order = np.argsort(windows.lengths, kind="stable")
    pick = order[np.linspace(0, len(order) - 1, 32).astype(int)]
    return gather(data, windows.subset(pick), None)


def _build(name: str, n_items: int) -> models.SequentialRecommender:
    torch.manual_seed(0)
    return models.build(name, n_items, MAX_LEN, {"hidden_size": 16}, device=CPU)


def _train_step(model, batch, seed: int):
    """Hidden states and parameter gradients of one training-mode step (dropout on)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    timestamps = batch.timestamps if model.uses_timestamps else None
    hidden = model.last_hidden(batch.items, timestamps, batch.lengths)
    model.loss(hidden, batch.targets).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return hidden.detach(), grads


@pytest.mark.slow
@needs_toolchain
@pytest.mark.parametrize("name", ["sasrec", "tisasrec", "mamba4rec", "ssd4rec", "tim4rec"])
def test_compiled_encoder_matches_eager_forward_and_gradients(name, data, batch):
    eager, compiled = _build(name, data.n_items), _build(name, data.n_items)
    assert compile_encoder(compiled, True, CPU) == INDUCTOR
    hidden, grads = _train_step(eager, batch, seed=1)
    hidden_c, grads_c = _train_step(compiled, batch, seed=1)
    # the same seed must give the same dropout masks: another seed visibly changes the output, so
    # agreement below is not dropout being off
    other, _ = _train_step(eager, batch, seed=2)
    assert (other - hidden).abs().max() > 1e-3 * hidden.abs().max()
    torch.testing.assert_close(hidden_c, hidden, rtol=1e-5, atol=1e-6 * float(hidden.abs().max()))
    # atol at 1e-6 of the model's largest gradient entry: a gradient that is a sum of cancelling
    # terms (an SSD layer's D, ~1e-7 against terms ~1e-3) keeps the absolute rounding error of its
    # terms, which is large relative to itself; every other entry is held to 1e-5 relative
    scale = max(float(g.abs().max()) for g in grads.values())
    assert grads_c.keys() == grads.keys()
    for key in grads:
        torch.testing.assert_close(grads_c[key], grads[key], rtol=1e-5, atol=1e-6 * scale, msg=key)


@pytest.mark.slow
@needs_toolchain
def test_compiled_training_ends_at_the_eager_test_metrics(data):
    # SSD4Rec* (the SSD scan, the most arithmetic to fuse) with random batches: nearly every batch
    # spans the full width, so the run compiles a handful of graphs, not one per bucket width
    def fit(compile_setting):
        config = make_config(
            {
                "dataset": "ml-latest-small",
                "model": "ssd4rec",
                "max_len": MAX_LEN,
                "epochs": 2,
                "batch_size": 512,
                "compile": compile_setting,
                "model_params": {"hidden_size": 16},
            }
        )
        trainer = Trainer(config, data=data, progress=None)
        assert trainer.tags()["compile"] == (INDUCTOR if compile_setting else EAGER)
        return trainer.fit()

    eager, compiled = fit(False), fit(True)
    # two epochs of Adam carry the per-step rounding differences (~1e-7 relative) into the weights;
    # the losses agree to 1e-5 and the metrics to 1e-4 absolute (610 users: one user's rank moving
    # from a tie-close score would shift a metric by ~1e-3, and none does)
    losses = [[row["train_loss"] for row in result.history] for result in (eager, compiled)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    for key, value in eager.test.items():
        assert abs(compiled.test[key] - value) <= 1e-4, key


def test_auto_compiles_on_cuda_only_and_a_missing_compiler_leaves_eager(monkeypatch, caplog):
    model = _build("sasrec", 50)
    method = model.encode
    assert compile_encoder(model, "auto", CPU) == EAGER
    assert compile_encoder(model, False, torch.device("cuda")) == EAGER
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with caplog.at_level(logging.WARNING, logger="harness.compiling"):
        assert compile_encoder(model, True, CPU) == EAGER
    assert "no C++ compiler" in caplog.text and "running eager" in caplog.text
    assert model.encode == method  # nothing was wrapped


def test_compile_is_a_setting_and_not_part_of_a_run_identity():
    from harness.config import identity_key

    eager = make_config({"compile": False})
    compiled = make_config({"compile": True})
    assert compiled.compile is True and make_config().compile == "auto"
    assert identity_key(eager) == identity_key(compiled)
    with pytest.raises(Exception, match="compile"):
        make_config({"compile": "sometimes"})


def test_rounding_tim4rec_trimmed_width_changes_no_real_position(data, batch):
    # the width a compiled TiM4Rec meets inside encode is rounded up to a multiple of 8; its item
    # path is causal, so the extra trailing padding must leave every real position's state alone
    # each window's first 13 positions: a real history 13 long at most
    items, stamps, lengths = batch.items[:, :13], batch.timestamps[:, :13], batch.lengths.clamp(max=13)
    model = _build("tim4rec", data.n_items).eval()
    padded = torch.nn.functional.pad(items, (0, MAX_LEN - items.size(1)))
    assert model._real_width(padded) == 13  # the batch is one the rounding changes
    with torch.no_grad():
        exact = model.last_hidden(items, stamps, lengths)
        model.width_multiple = 8
        assert model._real_width(padded) == 16
        rounded = model.last_hidden(items, stamps, lengths)
    torch.testing.assert_close(rounded, exact, rtol=1e-5, atol=1e-6 * float(exact.abs().max()))
