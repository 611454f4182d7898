"""Training: full-softmax cross-entropy over the tied item table, Adam, early stopping on a
validation metric, best checkpoint restored, test evaluated once.

Resumable: after every epoch the model, optimiser, torch RNG state, early-stopping state and the
MLflow run id are written atomically (harness.checkpoints.Checkpoint); rerunning the same
configuration continues from there and ends with the same numbers as an uninterrupted run
(shuffling is derived from (seed, epoch)).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import models
from harness import checkpoints
from harness.allocator import keep_freed_memory
from harness.compiling import compile_encoder
from harness.config import NOT_CAUSAL, SOURCE_OPTIONS, ConfigError, TrainConfig, identity_key, leaks_targets
from harness.data.catalogue import default_max_len, load_for
from harness.data.preprocess import SequenceData
from harness.data.samples import batch_order, eval_windows, gather, training_windows
from harness.evaluate import EvalResult, evaluate
from harness.metrics import metric_key, parse_metric
from harness.store.contract import CHECKPOINT_TAG, FAILURE_TAG, KIND, KIND_TRAIN, failure_text, without_late_defaults
from harness.store.contract import MODEL as MODEL_NAME_TAG
from harness.store.liveness import owner_tags
from models.kernels.backends import CPU_BACKEND

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]


def make_adam(parameters, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Adam:
    """Adam, fused where torch has the kernel: one pass over each parameter per step instead of one per
    elementwise operation (about 3.5x faster steps on a CPU, where the item table's update was ~10% of a TiSASRec
    batch of 256; the same update up to float rounding). A resumed run keeps the implementation it started with:
    its checkpoint's optimizer state carries the choice, and load_state_dict restores it (keep_fused_if_able)."""
    fused = fused_adam_available(device.type)
    return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


@functools.cache
def fused_adam_available(device_type: str) -> bool:
    """Whether this torch has a fused Adam for parameters on `device_type` (CPU: torch 2.4 on)."""
    if device_type not in ("cpu", "cuda") or (device_type == "cuda" and not torch.cuda.is_available()):
        return False
    probe = torch.nn.Parameter(torch.zeros(1, device=device_type))
    probe.grad = torch.zeros_like(probe)
    try:
        torch.optim.Adam([probe], fused=True).step()
    except RuntimeError:  # torch before 2.4 has no fused Adam on a CPU
        return False
    return True


def keep_fused_if_able(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """After load_state_dict: a run started fused and resumed where this torch has no fused Adam (another host's
    older torch) continues unfused, rather than failing at its first step."""
    if not fused_adam_available(device.type):
        for group in optimizer.param_groups:
            if group.get("fused"):
                log.warning("this torch has no fused Adam on %s: the resumed run continues unfused", device.type)
                group["fused"] = None


class RunTakenOver(Exception):
    """This process no longer owns the run it trains (its claim lapsed and another worker took the
    run over, harness/studies/claims.py): it stops at once and leaves the run's record and
    checkpoint to the new owner."""


@dataclasses.dataclass
class TrainResult:
    config: TrainConfig
    comparability: dict[str, str]  # the protocol.* tags: what makes two results comparable
    best_epoch: int
    epochs_run: int
    valid: dict[str, float]
    test: dict[str, float] | None
    test_eval: EvalResult | None
    history: list[dict[str, float]]
    seconds_per_epoch: float
    n_parameters: int
    backends: dict[str, str]
    run_id: str | None = None


@dataclasses.dataclass(frozen=True)
class EpochTiming:
    """One epoch's seconds as Trainer.time_epoch measured them, and on how much of it."""

    seconds: float
    batches_timed: int
    batches_per_epoch: int
    users_timed: int
    users: int

    def describe(self) -> str:
        return (
            f"{self.batches_timed} of {self.batches_per_epoch} training batches and the validation of "
            f"{self.users_timed:,} of {self.users:,} users timed"
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def comparability_of(config: TrainConfig, data: SequenceData, max_len: int) -> dict[str, str]:
    """Everything that makes two results comparable (the evaluation protocol, the training protocol
    among it, and the data): stored as protocol.* tags; the report refuses to mix different ones."""
    comparability = {
        "split": "leave-one-out(valid,test)",
        "eval_mode": "full-ranking",
        "mask_seen": str(config.mask_seen).lower(),
        "max_len": str(max_len),
        "loss": "softmax-ce(tied,all-items)",
        "train_protocol": config.protocol,
        "dataset": data.name,
        "dataset_fingerprint": data.fingerprint,
        "kcore": f"{config.min_user_inter}/{config.min_item_inter}",
        "tie_order": config.tie_order,
    }
    return without_late_defaults(comparability)  # so runs stored before a setting existed keep their id


def protocol_id(comparability: dict[str, str]) -> str:
    """Short hash of the whole comparability dict. The training protocol is part of it: prefix and
    all_positions results are never put in one significance table (docs/design.md#protocol)."""
    return hashlib.sha256(json.dumps(comparability, sort_keys=True).encode()).hexdigest()[:12]


def run_key(config: TrainConfig, fingerprint: str) -> str:
    return identity_key(config, fingerprint=fingerprint)


def training_loss(model, batch, protocol: str) -> torch.Tensor:
    """Full-softmax cross-entropy over the tied item table (the paper's loss): at each sequence's last
    real position (prefix), or at every real position in one pass (all_positions)."""
    timestamps = batch.timestamps if model.uses_timestamps else None
    if protocol == "prefix":
        hidden = model.last_hidden(batch.items, timestamps, batch.lengths)
        targets = batch.targets
    else:
        states = model.encode(batch.items, timestamps)
        targets = batch.targets[:, : states.size(1)]
        real = targets != 0
        hidden, targets = states[real], targets[real]
    return model.loss(hidden, targets)


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        data: SequenceData | None = None,
        tracker=None,
        checkpoint_dir: Path | None = None,
        parent_run_id: str | None = None,
        run_name: str | None = None,
        extra_tags: dict[str, str] | None = None,
        progress: bool | None = True,
        checkpoint: checkpoints.Checkpoint | None = None,
        still_owner: Callable[[], None] | None = None,
    ):
        """progress: True = rich bars and epoch lines, False = epoch lines only, None = silent.
        checkpoint: where the run's state goes (default: `checkpoint_dir`/<run key>.pt, or none).
        still_owner: raises RunTakenOver when another process has taken the run over; asked before
        every write, so that a run never has two writers."""
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        # CPU steps reuse freed pages instead of page-faulting fresh ones (harness/allocator.py)
        self.allocator = keep_freed_memory() if self.device.type == "cpu" else "cuda caching allocator"
        self.data = data or load_for(config)
        self.max_len = config.max_len or default_max_len(self.data.name)
        torch.manual_seed(config.seed)
        try:
            self.model = models.build(
                config.model,
                self.data.n_items,
                self.max_len,
                config.model_params,
                kernel_backend=config.kernel_backend,
                device=self.device,
            )
        except (models.ModelConfigError, ValueError) as err:
            raise ConfigError(str(err)) from None
        if "chunk_size" in config.model_params and self.model.backend_report().get("ssd_scan") == CPU_BACKEND:
            log.warning(
                "chunk_size=%s changes nothing on the C++ SSD scan (the plain recurrence); "
                "set kernel_backend=cpp:ssd_scan=torch to run the chunked scan",
                config.model_params["chunk_size"],
            )
        self.compile_backend = compile_encoder(self.model, config.compile, self.device)
        if leaks_targets(config.protocol, self.model):
            raise ConfigError(f"model {config.model!r} with these options {NOT_CAUSAL}; use protocol=prefix")
        self.comparability = comparability_of(config, self.data, self.max_len)
        self.valid_metric = metric_key(*parse_metric(config.valid_metric), split="valid")
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        # the name the model goes by in a report: a variant of the registered model is named as such
        # (tim4rec-causal), as a study names it; a study's own name for its cell replaces it (extra_tags)
        variant = self.model.config.variant()
        self.model_name = f"{config.model}-{variant}" if variant else config.model
        self.run_name = run_name or f"{self.model_name}-{self.data.name}-s{config.seed}"
        # KIND: train | trial | final (studies) -- the report selects runs by it
        self.extra_tags = {KIND: KIND_TRAIN, MODEL_NAME_TAG: self.model_name, **(extra_tags or {})}
        self.progress = progress
        self.set_aside: Path | None = None  # where a corrupt checkpoint of this run was moved
        if checkpoint is None and checkpoint_dir:
            checkpoint = checkpoints.Checkpoint(Path(checkpoint_dir) / f"{run_key(config, self.data.fingerprint)}.pt")
        self.checkpoint = checkpoint
        self.still_owner = still_owner or (lambda: None)
        self.optimizer = make_adam(self.model.parameters(), config.lr, config.weight_decay, self.device)
        self.train_windows = training_windows(self.data, config.protocol, self.max_len)
        self.valid_windows = eval_windows(self.data, "valid", self.max_len)
        self.test_windows = eval_windows(self.data, "test", self.max_len)

    # ------------------------------------------------------------------ bookkeeping
    def params(self) -> dict[str, object]:
        flat = self.config.model_dump(exclude={"model_params"})
        # unset file-reading options stay out, as runs logged before they existed have them
        flat = {k: v for k, v in flat.items() if not (k in SOURCE_OPTIONS and v is None)}
        flat["max_len"] = self.max_len
        model_options = self.model.config.to_dict()
        flat.update({f"model.{k}": v for k, v in model_options.items()})
        flat["n_parameters"] = self.model.n_parameters()
        return flat

    def tags(self) -> dict[str, str]:
        from harness.store.writer import git_commit, library_versions

        tags = {
            "git_commit": git_commit(),
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else platform.processor() or platform.machine(),
            "model": self.config.model,
            "dataset": self.data.name,
            "dataset_fingerprint": self.data.fingerprint,
            "protocol_id": protocol_id(self.comparability),
            **{f"protocol.{k}": v for k, v in self.comparability.items()},
            **{f"version.{k}": v for k, v in library_versions().items()},
            **{f"kernel_backend.{k}": v for k, v in self.model.backend_report().items()},
        }
        tags["cpu_allocator"] = self.allocator
        tags["optimizer"] = self.optimizer_implementation()
        tags["compile"] = self.compile_backend
        tags["kernel_backend"] = ",".join(sorted(set(self.model.backend_report().values()))) or "torch"
        tags.update(self.extra_tags)
        return tags

    def optimizer_implementation(self) -> str:
        """'adam (fused)' or 'adam (unfused)': the `optimizer` tag, and part of a resume's note."""
        return "adam (fused)" if self.optimizer.param_groups[0].get("fused") else "adam (unfused)"

    # ------------------------------------------------------------------ training
    def _autocast(self):
        if self.config.amp and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss(self, batch) -> torch.Tensor:
        return training_loss(self.model, batch, self.config.protocol)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.config.seed, epoch])
        return batch_order(
            self.train_windows,
            self.config.batch_size,
            rng,
            self.config.protocol == "all_positions",
            bucketed=self.config.batching == "bucketed",
        )

    def train_epoch(self, epoch: int, progress=None) -> float:
        """One epoch of training; the mean loss."""
        return self._train_on(self._batches(epoch), epoch, progress)

    def _train_on(self, batches: list[np.ndarray], epoch: int, progress=None) -> float:
        self.model.train()
        all_positions = self.config.protocol == "all_positions"
        width = None if self.model.trims_padding else self.max_len
        total, count = 0.0, 0
        task = progress.add_task(f"epoch {epoch}", total=len(batches)) if progress else None
        for index in batches:
            batch = gather(self.data, self.train_windows.subset(index), width, all_positions)
            batch = batch.to(self.device)
            with self._autocast():
                loss = self._loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            n = int((batch.targets != 0).sum()) if all_positions else len(index)
            total += loss.item() * n
            count += n
            if progress:
                progress.update(task, advance=1, description=f"epoch {epoch} loss {total / count:.4f}")
        if progress:
            progress.remove_task(task)
        return total / max(count, 1)

    def time_epoch(self, batches: int = 3) -> EpochTiming:
        """What one epoch (training and validation) costs on this machine, measured on a sample
        and scaled up: one warm-up batch (allocation, compilation, autotuning: not counted), then
        `batches` training batches spread over the epoch (bucketed batches differ in length) and
        the validation of one evaluation batch of users. The model is trained by those steps: a
        trainer used for timing is thrown away."""
        order = self._batches(1)
        per_epoch, timed = len(order), max(1, min(batches, len(order)))
        spread = [order[i] for i in np.linspace(0, per_epoch - 1, timed).astype(int)]
        self._train_on(order[:1], 1)
        began = time.perf_counter()
        self._train_on(spread, 1)
        train_seconds = (time.perf_counter() - began) / timed * per_epoch
        users = len(self.valid_windows)
        sample = min(users, self.config.eval_batch_size)
        began = time.perf_counter()
        with self._autocast():
            evaluate(
                self.model,
                self.data,
                self.valid_windows.subset(np.arange(sample)),
                self.config.eval_batch_size,
                self.device,
                mask_seen=self.config.mask_seen,
            )
        valid_seconds = (time.perf_counter() - began) / max(sample, 1) * users
        return EpochTiming(train_seconds + valid_seconds, timed, per_epoch, sample, users)

    def evaluate_split(self, split: str) -> EvalResult:
        windows = self.valid_windows if split == "valid" else self.test_windows
        with self._autocast():
            return evaluate(
                self.model,
                self.data,
                windows,
                self.config.eval_batch_size,
                self.device,
                mask_seen=self.config.mask_seen,
            )

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return self.checkpoint.path if self.checkpoint else None

    def _state(self, epoch, best, history, run_id, finished) -> dict:
        weights = self.model.state_dict()
        if best["epoch"] == epoch and best["state"] is not None:
            best = {**best, "state": weights}  # the same tensors: torch.save writes them once
        return {
            "epoch": epoch,
            "model": weights,
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "best": best,
            "history": history,
            "run_id": run_id,
            "finished": finished,
        }

    def _save(self, state: dict) -> None:
        if self.checkpoint:
            self.still_owner()
            self.checkpoint.write(state)  # atomic: a kill never leaves half a file

    def _load(self) -> dict | None:
        """The checkpoint's state, restored into the model, optimiser and RNG; None to start afresh.
        A corrupt file is set aside with a warning and the run starts from scratch: writes are
        atomic, so damage came from outside (disk, another tool) and no earlier state is known good.
        One that asks to run code stops the run (UnsafeCheckpointError, one line)."""
        if not self.checkpoint or not self.checkpoint.exists():
            return None
        try:
            state = self.checkpoint.read(map_location=self.device)
        except checkpoints.CheckpointCorrupt as err:
            moved = self.checkpoint.set_aside()
            self.set_aside = moved
            print(
                f"warning: checkpoint {err.path} is {err.reason}; moved to {moved.name}, and "
                f"{self.run_name} starts again from epoch 1",
                file=sys.stderr,
                flush=True,
            )
            return None
        if "model" in state:  # a finished training's slim checkpoint holds its best weights only
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            keep_fused_if_able(self.optimizer, self.device)
            torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return state

    # ------------------------------------------------------------------ the loop
    def fit(
        self,
        epoch_callback: EpochCallback | None = None,
        evaluate_test: bool = True,
        keep_checkpoint: bool = False,
    ) -> TrainResult:
        config = self.config
        resumed = self._load()
        start = resumed["epoch"] + 1 if resumed else 1
        history: list[dict[str, float]] = resumed["history"] if resumed else []
        best = resumed["best"] if resumed else {"epoch": 0, "value": -1.0, "state": None, "valid": {}}
        run_id = resumed["run_id"] if resumed else None
        finished = resumed["finished"] if resumed else False
        if resumed and self.progress is not None:
            print(self._resume_line(resumed), flush=True)
        if self.tracker and run_id is None:
            tags = {**self.tags(), **owner_tags()}  # this process trains it (harness.store.liveness)
            if self.checkpoint_path:
                tags[CHECKPOINT_TAG] = self.checkpoint_path.stem
            run_id = self.tracker.start_run(self.run_name, self.params(), tags, parent_run_id=self.parent_run_id)
            if self.checkpoint_path:
                # remembered from the start: a kill during epoch 1 resumes this run, not a new one
                self._save(self._state(0, best, history, run_id, finished))
                self._end_superseded(run_id)
        elif self.tracker and resumed and not finished:
            self._reopen(run_id, start)
        status = "FAILED"
        try:
            with _progress(bool(self.progress)) as progress:
                epoch = start
                while not finished and epoch <= config.epochs:
                    began = time.perf_counter()
                    loss = self.train_epoch(epoch, progress)
                    train_seconds = time.perf_counter() - began
                    began = time.perf_counter()
                    valid = self.evaluate_split("valid").summary(config.topk, "valid")
                    eval_seconds = time.perf_counter() - began
                    row = {
                        "epoch": epoch,
                        "train_loss": loss,
                        "train_seconds": train_seconds,
                        "valid_seconds": eval_seconds,
                        **valid,
                    }
                    history.append(row)
                    value = valid[self.valid_metric]
                    if value > best["value"]:
                        best = {
                            "epoch": epoch,
                            "value": value,
                            "valid": valid,
                            "state": copy.deepcopy(self.model.state_dict()),
                        }
                    finished = epoch - best["epoch"] >= config.patience or epoch == config.epochs
                    self.still_owner()  # nothing of this epoch is recorded by a process that lost the run
                    if self.tracker:
                        self.tracker.log_metrics(run_id, {k: v for k, v in row.items() if k != "epoch"}, step=epoch)
                    self._save(self._state(epoch, best, history, run_id, finished))
                    if self.progress is not None:
                        _report_epoch(progress, row, self.valid_metric, best)
                    if epoch_callback:
                        epoch_callback(epoch, row)
                    epoch += 1
            self.still_owner()
            result = self._finish(best, history, run_id, evaluate_test)
            status = "FINISHED"
            if self.checkpoint and not keep_checkpoint:
                self.checkpoint.remove()
            return result
        except RunTakenOver:
            run_id = None  # the run is another process's now: its record is left as it is
            raise
        except BaseException as err:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            if self.tracker and run_id:
                self.tracker.set_tags(run_id, {FAILURE_TAG: failure_text(err)})
            raise
        finally:
            if self.tracker and run_id:
                self.tracker.end_run(run_id, status)

    def _resume_line(self, state: dict) -> str:
        run = f" (MLflow run {state['run_id']})" if state.get("run_id") else ""
        if state["finished"]:
            return f"{self.run_name}{run}: training finished before, from checkpoint {self.checkpoint_path}"
        if state["epoch"] == 0:
            return (
                f"resuming {self.run_name}{run}: it stopped during epoch 1, which starts again "
                f"(checkpoint {self.checkpoint_path})"
            )
        return f"resuming {self.run_name}{run} from its epoch {state['epoch']} checkpoint {self.checkpoint_path}"

    def _end_superseded(self, run_id: str) -> None:
        """Runs of this checkpoint left unfinished when a run starts afresh lost their process before
        their first checkpoint, or their checkpoint was unreadable: nothing will resume them, so
        they end KILLED, naming the run that replaces them (and the report stops waiting). One that
        the store's opening already marked KILLED (its process was gone: harness.store.liveness)
        gets the same note."""
        try:
            earlier = self.tracker.client.search_runs(
                [self.tracker.experiment_id], filter_string=f"tags.`{CHECKPOINT_TAG}` = '{self.checkpoint_path.stem}'"
            )
        except Exception:  # a store that cannot search (e.g. busy): leave them for the next start
            return
        for run in earlier:
            failure = run.data.tags.get("failure", "")
            if run.info.run_id == run_id or run.info.status not in ("RUNNING", "KILLED") or "superseded" in failure:
                continue
            if run.info.status == "KILLED" and not failure.startswith("interrupted: its process"):
                continue  # stopped by the user (Ctrl-C) or an error: its own record says why
            why = (
                f"its checkpoint {self.set_aside.name} was unreadable"
                if self.set_aside
                else "its process stopped before a checkpoint remembered it"
            )
            self.tracker.set_tags(run.info.run_id, {"failure": f"interrupted: {why}; superseded by run {run_id}"})
            if run.info.status == "RUNNING":
                self.tracker.end_run(run.info.run_id, "KILLED")

    def _reopen(self, run_id: str, epoch: int) -> None:
        """A resumed run is RUNNING again (its interruption ended it KILLED), and it may continue
        under newer code and other kernels than it started with (git_commit and the kernel_backend
        tags are the start's): the tag `resumed` lists every resume as 'epoch N at <commit>, kernels
        <kernel>=<backend>,..., adam (fused|unfused)'."""
        from harness.store.writer import git_commit

        kernels = ",".join(f"{k}={v}" for k, v in sorted(self.model.backend_report().items())) or "torch"
        note = f"epoch {epoch} at {git_commit()}, kernels {kernels}, {self.optimizer_implementation()}"
        self.tracker.reopen(run_id, note, owner_tags())

    def _finish(self, best, history, run_id, evaluate_test) -> TrainResult:
        if best["state"] is not None:
            self.model.load_state_dict(best["state"])
        if evaluate_test and self.progress is not None:
            print(
                f"evaluating the test split: {len(self.test_windows):,} users, best epoch {best['epoch']} ...",
                flush=True,
            )
        test_eval = self.evaluate_split("test") if evaluate_test else None
        test = test_eval.summary(self.config.topk, "test") if test_eval else None
        epoch_times = [row["train_seconds"] for row in history]
        # the first epoch carries warm-up (allocation, Triton autotuning): excluded when possible
        seconds = statistics.median(epoch_times[1:] or epoch_times) if epoch_times else float("nan")
        result = TrainResult(
            config=self.config,
            comparability=self.comparability,
            best_epoch=best["epoch"],
            epochs_run=len(history),
            valid=best["valid"],
            test=test,
            test_eval=test_eval,
            history=history,
            seconds_per_epoch=seconds,
            n_parameters=self.model.n_parameters(),
            backends=self.model.backend_report(),
            run_id=run_id,
        )
        if self.tracker and run_id:
            final = {f"best_{k}": v for k, v in best["valid"].items()}
            final.update(test or {})
            final.update({"best_epoch": best["epoch"], "epochs_run": len(history), "seconds_per_epoch": seconds})
            self.tracker.log_metrics(run_id, final, step=len(history))
            if test_eval is not None:
                self.tracker.log_per_user(run_id, per_user_table(self.data, test_eval))
        return result


def per_user_table(data: SequenceData, result: EvalResult) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user": result.users,
            "user_token": data.user_tokens[result.users],
            "target": result.targets,
            "rank": result.ranks,
        }
    )


@contextlib.contextmanager
def _progress(enabled: bool):
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as progress:
        yield progress


def _report_epoch(progress, row, valid_metric, best) -> None:
    echo = progress.console.print if progress is not None else functools.partial(print, flush=True)
    echo(
        f"epoch {row['epoch']:>3}  loss {row['train_loss']:.4f}  "
        f"{valid_metric.removeprefix('valid_')} {row[valid_metric]:.4f}  "
        f"hit@10 {row.get('valid_hit_at_10', float('nan')):.4f}  "
        f"({row['train_seconds']:.1f}s + {row['valid_seconds']:.1f}s)  best epoch {best['epoch']}"
    )
