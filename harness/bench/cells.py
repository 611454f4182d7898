"""A benchmark cell, one point of the axes (model, kernel backend, hidden size, sequence length, batch
size, SSD chunk size, training protocol, compiled or eager), and the product of the axes."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from harness.errors import UserError

#: the axes of one cell, in table order
AXES = ("model", "backend", "hidden", "seq_len", "batch_size", "chunk_size", "protocol", "compile")
DEFAULT_N_ITEMS = 3416  # ML-1M after 5-core filtering: the synthetic catalogue size
PROTOCOLS = ("prefix", "all_positions")


class BenchError(UserError, ValueError):
    """A benchmark request that cannot run (unknown axis value, empty product)."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark: a registered model, or a named variant of one with options, shown under its
    name as a study names its variants (`tim4rec-log=tim4rec:time_encoding=log`)."""

    name: str
    model: str
    options: tuple[tuple[str, str], ...] = ()

    @property
    def spec(self) -> str:
        """MODEL:KEY=VALUE..., as written after NAME= on the command line"""
        return ":".join([self.model, *(f"{k}={v}" for k, v in self.options)])


def parse_model_spec(text: str) -> ModelSpec:
    """MODEL, MODEL:KEY=VALUE[:KEY=VALUE...] or NAME=MODEL:KEY=VALUE...; unnamed variants are called
    MODEL-KEY=VALUE-..."""
    head, *options = (part.strip() for part in text.split(":"))
    name, _, model = head.rpartition("=")
    if not model:
        raise BenchError(f"model {text!r}: expected MODEL, MODEL:KEY=VALUE or NAME=MODEL:KEY=VALUE")
    pairs = []
    for option in options:
        key, equals, value = (p.strip() for p in option.partition("="))
        if not (key and equals):
            raise BenchError(f"model {text!r}: option {option!r} is not KEY=VALUE")
        if key in ("hidden_size", "chunk_size"):
            raise BenchError(f"model {text!r}: {key} is a benchmark axis: use --hidden / --chunk-size")
        pairs.append((key, value))
    if not name:
        name = "-".join([model, *(f"{k}={v}" for k, v in pairs)])
    return ModelSpec(name, model, tuple(pairs))


@dataclasses.dataclass(frozen=True)
class BenchCell:
    model: str  # the name shown: a registered model, or a variant's name (then `base` is its model)
    backend: str
    hidden: int
    seq_len: int
    batch_size: int
    chunk_size: int | None
    protocol: str
    #: the encoder run eagerly or through torch.compile (harness/compiling.py)
    compile: bool = False
    #: the registered model of a named variant ("" when `model` is registered) and the variant's options
    base: str = ""
    options: tuple[tuple[str, str], ...] = ()

    @property
    def registered(self) -> str:
        return self.base or self.model

    def label(self) -> str:
        chunk = f" c{self.chunk_size}" if self.chunk_size else ""
        compiled = "+compiled" if self.compile else ""
        return f"{self.model}/{self.backend}{compiled}{chunk}/{self.protocol}"


def supports_chunk_size(model: str) -> bool:
    """SSD models expose a `chunk_size` option (read from the model's config class)."""
    import models

    return "chunk_size" in {f.name for f in dataclasses.fields(models.model_class(model).config_class)}


def cells(
    models_: Sequence[str | ModelSpec],
    hiddens: Sequence[int],
    seq_lens: Sequence[int],
    batch_size: int,
    chunk_sizes: Sequence[int | None],
    backends: Sequence[str],
    protocols: Sequence[str],
    compiles: Sequence[bool] = (False,),
) -> tuple[list[BenchCell], list[str]]:
    """The product of the axes, ordered by shape (hidden, seq_len) first so that every shape's cells
    sit together; chunk sizes apply to SSD models only (others get one cell with chunk '-')."""
    notes: list[str] = []
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise BenchError(f"unknown protocol(s) {bad}; expected {', '.join(PROTOCOLS)}")
    specs = [m if isinstance(m, ModelSpec) else ModelSpec(m, m) for m in models_]
    chunked = {spec.name: supports_chunk_size(spec.model) for spec in specs}
    real_chunks = [c for c in chunk_sizes if c]
    if real_chunks:
        for spec in specs:
            if not chunked[spec.name]:
                notes.append(f"{spec.name}: chunk_size applies to SSD models only; one cell per shape")
    out: list[BenchCell] = []
    for hidden, seq_len in itertools.product(hiddens, seq_lens):
        for spec, backend in itertools.product(specs, backends):
            base = "" if spec.name == spec.model else spec.model
            for chunk in (real_chunks or [None]) if chunked[spec.name] else [None]:
                for protocol, compiled in itertools.product(protocols, compiles):
                    out.append(
                        BenchCell(
                            spec.name,
                            backend,
                            hidden,
                            seq_len,
                            batch_size,
                            chunk,
                            protocol,
                            compiled,
                            base,
                            spec.options,
                        )
                    )
    return out, notes
