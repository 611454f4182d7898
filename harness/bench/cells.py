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
class BenchCell:
    model: str
    backend: str
    hidden: int
    seq_len: int
    batch_size: int
    chunk_size: int | None
    protocol: str
    #: the encoder run eagerly or through torch.compile (harness/compiling.py)
    compile: bool = False

    def label(self) -> str:
        chunk = f" c{self.chunk_size}" if self.chunk_size else ""
        compiled = "+compiled" if self.compile else ""
        return f"{self.model}/{self.backend}{compiled}{chunk}/{self.protocol}"


def supports_chunk_size(model: str) -> bool:
    """SSD models expose a `chunk_size` option (read from the model's config class)."""
    import models

    return "chunk_size" in {f.name for f in dataclasses.fields(models.model_class(model).config_class)}


def cells(
    models_: Sequence[str],
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
    chunked = {m: supports_chunk_size(m) for m in models_}
    real_chunks = [c for c in chunk_sizes if c]
    if real_chunks:
        for model in models_:
            if not chunked[model]:
                notes.append(f"{model}: chunk_size applies to SSD models only; one cell per shape")
    out: list[BenchCell] = []
    for hidden, seq_len in itertools.product(hiddens, seq_lens):
        for model, backend in itertools.product(models_, backends):
            for chunk in (real_chunks or [None]) if chunked[model] else [None]:
                for protocol, compiled in itertools.product(protocols, compiles):
                    out.append(BenchCell(model, backend, hidden, seq_len, batch_size, chunk, protocol, compiled))
    return out, notes
