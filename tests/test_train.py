"""Training protocols, determinism, resume, CLI errors (small settings on real data)."""

import numpy as np
import pytest
import torch

from harness.cli import main
from harness.config import ConfigError, make_config
from harness.data.catalogue import load
from harness.data.samples import batch_order, gather
from harness.train import Trainer, fused_adam_available

SMALL = {
    "dataset": "ml-latest-small",
    "max_len": 20,
    "epochs": 2,
    "batch_size": 512,
    "model_params": {"hidden_size": 16, "n_heads": 2, "n_layers": 1},
}


def _config(**changes):
    values = {**SMALL, **changes}
    values["model_params"] = {**SMALL["model_params"], **changes.get("model_params", {})}
    return make_config(values)


def test_prefix_and_all_positions_give_the_same_loss_for_a_causal_model():
    # dropout off and histories that fit in one window: the two protocols see the same
    # (history, next item) pairs, so the mean loss over an epoch's samples must agree
    data = load("ml-latest-small")
    config = dict(max_len=2000, model_params={"dropout": 0.0, "attn_dropout": 0.0})
    prefix = Trainer(_config(protocol="prefix", **config), data=data, progress=None)
    allpos = Trainer(_config(protocol="all_positions", **config), data=data, progress=None)
    allpos.model.load_state_dict(prefix.model.state_dict())
    users = np.arange(40)  # a subset keeps the test cheap

    def mean_loss(trainer, all_positions):
        windows = trainer.train_windows
        keep = np.isin(windows.users, users)
        windows = windows.subset(np.flatnonzero(keep))
        total, count = 0.0, 0
        with torch.no_grad():
            for index in batch_order(windows, 256, None, all_positions):
                batch = gather(data, windows.subset(index), None, all_positions)
                n = int((batch.targets != 0).sum()) if all_positions else len(index)
                total += trainer._loss(batch).item() * n
                count += n
        return total / count, count

    loss_prefix, n_prefix = mean_loss(prefix, False)
    loss_allpos, n_allpos = mean_loss(allpos, True)
    assert n_prefix == n_allpos
    assert loss_prefix == pytest.approx(loss_allpos, rel=1e-5)


def test_same_seed_same_numbers_and_other_seed_differs():
    data = load("ml-latest-small")
    a = Trainer(_config(seed=7), data=data, progress=None).fit()
    b = Trainer(_config(seed=7), data=data, progress=None).fit()
    c = Trainer(_config(seed=8), data=data, progress=None).fit()
    assert a.history[-1]["train_loss"] == b.history[-1]["train_loss"]
    assert np.array_equal(a.test_eval.ranks, b.test_eval.ranks)
    assert a.history[-1]["train_loss"] != c.history[-1]["train_loss"]


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    data = load("ml-latest-small")
    config = _config(epochs=4, protocol="all_positions")
    reference = Trainer(config, data=data, progress=None).fit()

    class Killed(Exception):
        pass

    def kill_after_two(epoch, row):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        Trainer(config, data=data, checkpoint_dir=tmp_path, progress=None).fit(kill_after_two)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    resumed = Trainer(config, data=data, checkpoint_dir=tmp_path, progress=None).fit()
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in reference.history]
    assert np.array_equal(resumed.test_eval.ranks, reference.test_eval.ranks)
    assert not list(tmp_path.glob("*.pt"))  # removed once the run completed


def test_adam_is_fused_and_a_resumed_run_keeps_the_implementation_it_started_with(tmp_path):
    data = load("ml-latest-small")
    config = _config(epochs=3)
    fresh = Trainer(config, data=data, progress=None).optimizer_implementation()
    assert fresh == ("adam (fused)" if fused_adam_available("cpu") else "adam (unfused)")

    class Killed(Exception):
        pass

    def kill_after_one(epoch, row):
        raise Killed

    # a run started before Adam was fused: its checkpoint's optimizer state says so
    started = Trainer(config, data=data, checkpoint_dir=tmp_path, progress=None)
    started.optimizer = torch.optim.Adam(started.model.parameters(), lr=config.lr)
    assert started.optimizer_implementation() == "adam (unfused)"
    with pytest.raises(Killed):
        started.fit(kill_after_one)
    resumed = Trainer(config, data=data, checkpoint_dir=tmp_path, progress=None)
    assert resumed.fit().epochs_run == 3
    assert resumed.optimizer_implementation() == "adam (unfused)"


def test_a_fused_run_resumed_where_torch_has_no_fused_adam_continues_unfused(monkeypatch):
    import harness.train as train_module

    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    assert fused_adam_available("cpu") == (version >= (2, 4))  # CPU fused Adam arrived in torch 2.4
    probe = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([probe])
    optimizer.param_groups[0]["fused"] = True  # as a checkpoint from a newer torch restores it
    monkeypatch.setattr(train_module, "fused_adam_available", lambda device_type: False)
    train_module.keep_fused_if_able(optimizer, torch.device("cpu"))
    assert not optimizer.param_groups[0]["fused"]
    probe.grad = torch.ones(3)
    optimizer.step()  # runs, unfused
    assert probe.detach().abs().sum() > 0


def test_early_stopping_restores_the_best_epoch():
    data = load("ml-latest-small")
    result = Trainer(_config(epochs=6, patience=1, lr=0.05), data=data, progress=None).fit()
    values = [row["valid_ndcg_at_10"] for row in result.history]
    assert result.best_epoch == int(np.argmax(values)) + 1
    assert result.epochs_run <= result.best_epoch + 1
    assert result.valid["valid_ndcg_at_10"] == max(values)


def test_training_is_tracked_in_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    from harness.store.contract import PER_USER_ARTIFACT
    from harness.store.writer import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "unit")
    result = Trainer(_config(), tracker=tracker, progress=None).fit()
    client = MlflowClient(tracker.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden_size"] == "16" and run.data.params["lr"] == "0.001"
    for tag in (
        "git_commit",
        "version.torch",
        "device",
        "kernel_backend",
        "protocol.split",
        "protocol.train_protocol",
        "dataset_fingerprint",
        "protocol_id",
    ):
        assert tag in run.data.tags
    assert run.data.tags["optimizer"] == ("adam (fused)" if fused_adam_available("cpu") else "adam (unfused)")
    assert "test_ndcg_at_10" in run.data.metrics and "valid_hit_at_10" in run.data.metrics
    history = client.get_metric_history(result.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    local = client.download_artifacts(result.run_id, PER_USER_ARTIFACT, str(tmp_path))
    import pandas as pd

    table = pd.read_csv(local)
    assert list(table.columns) == ["user", "user_token", "target", "rank"]
    assert len(table) == 671 and np.array_equal(table["rank"], result.test_eval.ranks)


def test_all_positions_requires_a_causal_model(monkeypatch):
    from models.sasrec import SASRec

    monkeypatch.setattr(SASRec, "is_causal", property(lambda self: False))
    with pytest.raises(ConfigError, match="not causal"):
        Trainer(_config(protocol="all_positions"), progress=None)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--set", "n_heads=3"], "divisible by n_heads"),
        (["--set", "lr=-1"], "invalid setting lr"),
        (["--set", "no_such_option=1"], "unknown option"),
        (["--dataset", "missing.inter"], "unknown dataset"),
    ],
)
def test_cli_rejects_bad_input_in_one_line(args, message, capsys):
    # in-process: what is tested is the one line and the exit code, not the process around them
    # (tests/test_bad_input.py starts one process to check what a one-line error imports)
    assert main(["train", "--no-track", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_cli_train_runs_end_to_end(tmp_path, capsys):
    argv = ["train", "--epochs", "1", "--no-progress", "--set", "max_len=20", "--set", "hidden_size=16"]
    assert main([*argv, "--set", "n_heads=2"]) == 0
    out = capsys.readouterr().out
    assert "ndcg" in out and "MLflow run" in out
    assert (tmp_path / "results" / "mlflow.db").is_file()


def test_a_plain_training_of_a_variant_goes_by_the_study_variant_name(tmp_path, capsys):
    """`train --model tim4rec --set time_encoding=causal` is the causal variant, not the paper's
    model: its run carries the name a study gives that variant (tim4rec-causal), so the report never
    shows or tests it as tim4rec."""
    from harness.report.results import group_runs, model_name
    from harness.store.reader import Store, select_experiments

    store = tmp_path / "mlflow.db"
    argv = ["train", "--model", "tim4rec", "--protocol", "all_positions", "--epochs", "1", "--no-progress"]
    argv += ["--tracking-uri", str(store), "--set", "max_len=20", "--set", "hidden_size=16"]
    assert main([*argv, "--set", "time_encoding=causal"]) == 0
    assert main([*argv[:2], "ssd4rec", *argv[3:]]) == 0  # no variant: the registry name, as before
    assert "tim4rec-causal on ml-latest-small" in capsys.readouterr().out
    reader = Store(str(store))
    runs = reader.runs(select_experiments(reader, ["train"]))
    assert sorted((run.name, model_name(run)) for run in runs) == [
        ("ssd4rec-ml-latest-small-s2020", "ssd4rec"),
        ("tim4rec-causal-ml-latest-small-s2020", "tim4rec-causal"),
    ]
    groups, _ = group_runs(runs)
    assert sorted(row.model for group in groups for row in group.rows) == ["ssd4rec", "tim4rec-causal"]


def test_a_chunk_size_on_the_cpp_ssd_scan_is_said_to_change_nothing(caplog):
    # The C++ SSD scan runs the plain recurrence: a chunk size asked for there is named as ignored, with the
    # setting that runs the chunked torch scan instead; on that backend nothing is said.
    from models.kernels import describe_backends

    if describe_backends("cpu")["ssd_scan"] != "cpp":
        pytest.skip("the C++ kernels are unavailable here (no toolchain)")
    data = load("ml-latest-small")
    options = {"model": "ssd4rec", "model_params": {"hidden_size": 16, "head_dim": 8, "chunk_size": 8}}
    with caplog.at_level("WARNING", logger="harness.train"):
        Trainer(make_config({**SMALL, **options}), data=data, progress=None)
    assert "chunk_size=8 changes nothing on the C++ SSD scan" in caplog.text
    assert "kernel_backend=cpp:ssd_scan=torch" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="harness.train"):
        Trainer(make_config({**SMALL, **options, "kernel_backend": "cpp:ssd_scan=torch"}), data=data, progress=None)
    assert "chunk_size" not in caplog.text
