"""The model zoo on the CPU: builds, forward passes on real amazon-beauty batches, causality (and the designed
non-causality of faithful TiM4Rec), exact padding trimming, short training runs with falling loss, and clear
configuration errors. Kernel numerics are tested with the kernels; GPU paths are checked by scripts/gpu_check.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from harness.config import ConfigError, TrainConfig
from harness.data.preprocess import SequenceData
from harness.data.samples import eval_windows, gather
from harness.train import Trainer
from models import ModelConfigError
from models.base import Dropout
from models.kernels import describe_backends
from models.kernels.time_pairs import PairDropout, keep_factors
from models.mamba4rec import OFFICIAL_CONFIGS as MAMBA4REC_CONFIGS
from models.tim4rec import OFFICIAL_CONFIGS as TIM4REC_CONFIGS
from models.tim4rec import OFFICIAL_MAX_LEN
from models.tisasrec import CausalPairs, DroppedPairs, attention_mask, personal_time_matrix, repo_time_matrix

# the shared data folder as conftest.py finds it (HARNESS_SHARED_DATA, else ../shared/data beside the repo)
SHARED_DATA = Path(os.environ.get("HARNESS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
BEAUTY = SHARED_DATA / "amazon-beauty" / "amazon-beauty.inter"
ALL_MODELS = ("sasrec", "tisasrec", "mamba4rec", "ssd4rec", "tim4rec")
MAX_LEN = 20

# (model, options) pairs that declare themselves causal; every one is checked for it.
CAUSAL_VARIANTS = [
    ("sasrec", {}),
    ("tisasrec", {}),
    ("tisasrec", {"time_encoding": "personal"}),
    ("tisasrec", {"time_encoding": "personal", "position_encoding": "kv", "time_dropout": "table"}),
    ("mamba4rec", {}),
    ("mamba4rec", {"num_layers": 2, "mamba_dt_init": True}),
    ("ssd4rec", {}),
    ("ssd4rec", {"conv_activation": "silu", "chunk_size": 4}),
    ("ssd4rec", {"num_layers": 1, "is_ffn": False, "ffn_activation": "gelu"}),
    ("tim4rec", {"time_encoding": "causal"}),
    ("tim4rec", {"time_encoding": "causal", "p2p_residual": False, "first_gap": "learned"}),
    ("tim4rec", {"is_time": False}),
]
FAITHFUL_TIM4REC = [
    {},
    {"time_encoding": "log"},
    {"pad_gap": "zero", "timestamp_dtype": "float64", "first_gap": "learned", "position_embedding": True},
    dict(TIM4REC_CONFIGS["ml-1m"]),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: one intra-op thread is as fast as two here and leaves the second core to others
    (without OMP_WAIT_POLICY=PASSIVE, two threads measured 10x slower on the shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def beauty() -> SequenceData:
    if not BEAUTY.is_file():
        pytest.skip("../shared/data/amazon-beauty is not present")
    from harness.data.catalogue import load

    return load(str(BEAUTY), use_cache=False)


def subset(data: SequenceData, n_users: int) -> SequenceData:
    """The first n_users users (item ids and n_items unchanged)."""
    end = int(data.offsets[n_users])
    return SequenceData(
        name=f"{data.name}-first{n_users}",
        offsets=data.offsets[: n_users + 1].copy(),
        items=data.items[:end].copy(),
        timestamps=data.timestamps[:end].copy(),
        user_tokens=data.user_tokens[:n_users].copy(),
        item_tokens=data.item_tokens,
    )


def real_batch(data: SequenceData, max_len: int, n: int = 48, width: int | None = None, longest: int | None = None):
    """n test windows with a spread of lengths (at most `longest`), right-padded to `width` (None = trimmed)."""
    windows = eval_windows(data, "test", max_len)
    order = np.argsort(windows.lengths, kind="stable")
    if longest is not None:
        order = order[windows.lengths[order] <= longest]
    pick = order[np.linspace(0, len(order) - 1, n).astype(int)]
    return gather(data, windows.subset(pick), width)


def build(name: str, options: dict | None = None, max_len: int = MAX_LEN, seed: int = 0):
    torch.manual_seed(seed)
    model = models.build(name, 12101, max_len, options or {})
    return model.eval()


def encode(model, batch_items, batch_stamps):
    with torch.no_grad():
        return model.encode(batch_items, batch_stamps if model.uses_timestamps else None)


def mask_real(items: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    real = (items[:, : hidden.size(1)] != 0).unsqueeze(-1)
    return hidden * real


# --------------------------------------------------------------------------------------------- building
def test_registry_has_every_model():
    assert set(ALL_MODELS) <= set(models.available())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_defaults_forward_on_real_batch(beauty, name):
    model = build(name, max_len=50)
    batch = real_batch(beauty, 50, width=None if model.trims_padding else 50)
    hidden = model.last_hidden(batch.items, batch.timestamps if model.uses_timestamps else None, batch.lengths)
    assert hidden.shape == (len(batch.lengths), 64)
    assert torch.isfinite(hidden).all()
    # On CPU every kernel runs its torch twin, or its compiled CPU twin where it has one and it builds.
    assert model.backend_report() == {k: v for k, v in describe_backends("cpu").items() if k in model.backend_report()}
    assert set(model.backend_report().values()) <= {"torch", "cpp"}


@pytest.mark.parametrize("config_name", sorted(TIM4REC_CONFIGS))
def test_tim4rec_official_configs_build_and_run(beauty, config_name):
    max_len = OFFICIAL_MAX_LEN[config_name]
    model = build("tim4rec", TIM4REC_CONFIGS[config_name], max_len=max_len)
    assert model.is_causal == (not TIM4REC_CONFIGS[config_name]["is_time"])
    batch = real_batch(beauty, max_len, n=8, width=None if model.trims_padding else max_len)
    hidden = model.last_hidden(batch.items, batch.timestamps, batch.lengths)
    assert hidden.shape == (8, TIM4REC_CONFIGS[config_name]["hidden_size"]) and torch.isfinite(hidden).all()


@pytest.mark.parametrize("config_name", sorted(MAMBA4REC_CONFIGS))
def test_mamba4rec_official_configs_build_and_run(beauty, config_name):
    model = build("mamba4rec", MAMBA4REC_CONFIGS[config_name], max_len=50)
    batch = real_batch(beauty, 50, n=8)
    assert torch.isfinite(model.last_hidden(batch.items, None, batch.lengths)).all()


def test_parameter_counts_match_the_official_architectures():
    """Counts of the official modules at hidden 64, 12,101 items, max_len 50 (computed by hand from the
    official code; the item table has n_items + 1 rows)."""
    table = 12102 * 64
    ssd_block = 64 * 324 + 324 + 192 * 4 + 192 + 3 * 4 + 128 + 128 * 64 + 64  # in_proj, conv, dt/A/D, norm, out
    ffn = 64 * 256 + 256 + 256 * 64 + 64 + 128
    ssd_layer = ssd_block + 128 + ffn
    time_layer = 2 * (4 * 4 + 4) + 2 * (50 * 50 + 50) + (50 * 50 + 50) + 100  # convs, MLP, p2p gate, LayerNorm
    assert build("ssd4rec", max_len=50).n_parameters() == table + 128 + 2 * ssd_layer
    assert build("tim4rec", max_len=50).n_parameters() == table + 128 + 100 + 2 * (ssd_layer + time_layer)
    mamba = 64 * 256 + (128 * 4 + 128) + 128 * 68 + (4 * 128 + 128) + 128 * 32 + 128 + 128 * 64
    assert build("mamba4rec", max_len=50).n_parameters() == table + 128 + (mamba + 128 + ffn)
    attention = 4 * (64 * 64 + 64) + 128
    tisasrec = table + 50 * 64 + 2 * 257 * 64 + 128 + 2 * (attention + 64 * 256 + 256 + 256 * 64 + 64 + 128)
    assert build("tisasrec", max_len=50).n_parameters() == tisasrec


# --------------------------------------------------------------------------------------------- causality
def _perturb_from(batch, position: int, generator: torch.Generator):
    """Copies of items/timestamps with every real entry at >= position changed."""
    items, stamps = batch.items.clone(), batch.timestamps.clone()
    later = (torch.arange(items.size(1)) >= position) & (items != 0)
    new_items = torch.randint(1, 12102, items.shape, generator=generator)
    items = torch.where(later, new_items, items)
    jitter = torch.randint(1, 400, items.shape, generator=generator).double() * 86400
    stamps = torch.where(later, stamps + jitter.cumsum(1), stamps)
    return items, stamps


@pytest.mark.parametrize("name,options", CAUSAL_VARIANTS, ids=[f"{n}-{o}" for n, o in CAUSAL_VARIANTS])
def test_causal_models_do_not_look_ahead(beauty, name, options):
    model = build(name, options)
    assert model.is_causal and model.trims_padding
    batch = real_batch(beauty, MAX_LEN, n=16, width=MAX_LEN)
    position = 5
    assert (batch.lengths > position).any()
    before = encode(model, batch.items, batch.timestamps)
    items, stamps = _perturb_from(batch, position, torch.Generator().manual_seed(1))
    after = encode(model, items, stamps)
    torch.testing.assert_close(after[:, :position], before[:, :position], rtol=1e-5, atol=1e-5)
    long = batch.lengths > position
    assert (after[long, position:] - before[long, position:]).abs().max() > 1e-3  # later ones do change


@pytest.mark.parametrize("options", FAITHFUL_TIM4REC, ids=lambda o: str(sorted(o)))
def test_faithful_tim4rec_sees_later_timestamps(beauty, options):
    model = build("tim4rec", options)
    assert not model.is_causal and not model.trims_padding
    with torch.no_grad():  # at init (weights N(0, 0.02), steps ~0.01) the time path's effect is tiny
        generator = torch.Generator().manual_seed(0)
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.15)
    batch = real_batch(beauty, MAX_LEN, n=16, width=MAX_LEN)
    row = int(torch.argmax(batch.lengths))
    before = encode(model, batch.items, batch.timestamps)
    stamps = batch.timestamps.clone()
    stamps[row, batch.lengths[row] - 1] += 90 * 86400  # only the last real timestamp of one row
    after = encode(model, batch.items, stamps)
    assert (after[row, :3] - before[row, :3]).abs().max() > 1e-4  # the first positions moved
    others = torch.arange(len(batch.lengths)) != row
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=0)  # rows stay independent


def test_faithful_tim4rec_refuses_all_positions_training(beauty):
    config = TrainConfig(
        model="tim4rec", dataset="amazon-beauty", protocol="all_positions", max_len=MAX_LEN, device="cpu"
    )
    with pytest.raises(ConfigError, match="not causal"):
        Trainer(config, data=subset(beauty, 50), progress=False)


# --------------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("options", FAITHFUL_TIM4REC, ids=lambda o: str(sorted(o)))
def test_tim4rec_trimmed_item_path_is_exact(beauty, options):
    trimmed = build("tim4rec", dict(options, trim_item_path=True), max_len=50)
    full = build("tim4rec", dict(options, trim_item_path=False), max_len=50)
    full.load_state_dict(trimmed.state_dict())
    batch = real_batch(beauty, 50, n=32, width=50, longest=30)
    assert int(batch.lengths.max()) == 30  # so that trimming actually cuts something
    a = encode(trimmed, batch.items, batch.timestamps)
    b = encode(full, batch.items, batch.timestamps)
    assert a.size(1) == int(batch.lengths.max()) and b.size(1) == 50
    torch.testing.assert_close(
        mask_real(batch.items, a), mask_real(batch.items, b[:, : a.size(1)]), rtol=1e-5, atol=1e-5
    )
    # a narrower input is padded to max_len inside, exactly as the harness would have done
    narrow = real_batch(beauty, 50, n=32, width=None, longest=30)
    torch.testing.assert_close(encode(trimmed, narrow.items, narrow.timestamps), a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,options", CAUSAL_VARIANTS, ids=[f"{n}-{o}" for n, o in CAUSAL_VARIANTS])
def test_trailing_padding_does_not_change_real_positions(beauty, name, options):
    model = build(name, options)
    batch = real_batch(beauty, MAX_LEN, n=16, width=None, longest=12)
    padded = real_batch(beauty, MAX_LEN, n=16, width=MAX_LEN, longest=12)
    assert batch.items.size(1) == 12 and padded.items.size(1) == MAX_LEN
    a = encode(model, batch.items, batch.timestamps)
    b = encode(model, padded.items, padded.timestamps)[:, : a.size(1)]
    torch.testing.assert_close(mask_real(batch.items, a), mask_real(batch.items, b), rtol=1e-5, atol=1e-5)


ALL_VARIANTS = CAUSAL_VARIANTS + [("tim4rec", options) for options in FAITHFUL_TIM4REC]


@pytest.mark.parametrize("name,options", ALL_VARIANTS, ids=[f"{n}-{o}" for n, o in ALL_VARIANTS])
def test_last_layer_at_one_position_is_exact(beauty, name, options):
    """encode(at=...) computes the last layer only at each row's last real position (prefix training and
    evaluation read nothing else): values and every parameter's gradient equal the full encode read there.
    Float64 and no dropout, so any difference is a real one, not rounding or a different mask."""
    no_dropout = {
        "sasrec": {"attn_dropout": 0.0},
        "tisasrec": {"attn_dropout": 0.0},
        "tim4rec": {"time_drop_out": 0.0},
    }.get(name, {})
    options = dict(options, dropout=0.0, **no_dropout)
    model = build(name, options).double().train()
    batch = real_batch(beauty, MAX_LEN, n=24, width=None if model.trims_padding else MAX_LEN)
    stamps = batch.timestamps if model.uses_timestamps else None
    last = (batch.lengths - 1).clamp(min=0)
    full = model.encode(batch.items, stamps)
    expected = full[torch.arange(len(last)), last]
    got = model.last_hidden(batch.items, stamps, batch.lengths)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(expected)
    parameters = [p for p in model.parameters() if p.requires_grad]
    grads_full = torch.autograd.grad((expected * upstream).sum(), parameters, allow_unused=True, retain_graph=True)
    grads_at = torch.autograd.grad((got * upstream).sum(), parameters, allow_unused=True)
    for (name_, _), a, b in zip(model.named_parameters(), grads_at, grads_full):
        a = torch.zeros_like(_) if a is None else a
        b = torch.zeros_like(_) if b is None else b
        # the scale of the whole gradient: parameters whose true gradient is 0 (a key bias under softmax)
        # carry only rounding noise in both paths
        torch.testing.assert_close(
            a, b, rtol=1e-8, atol=1e-12 * (1 + float(b.abs().max())), msg=lambda m: f"gradient of {name_}: {m}"
        )


# --------------------------------------------------------------------------------------------- time encodings
def test_tim4rec_official_gaps_keep_the_float32_and_padding_quirks():
    model = build("tim4rec", max_len=6)
    items = torch.tensor([[5, 6, 7, 0, 0, 0]])
    stamps = torch.tensor([[1.3e9, 1.3e9 + 1, 1.3e9 + 200, 0, 0, 0]], dtype=torch.float64)
    gaps = model.time_gaps(items, stamps)
    # float32 spacing at 1.3e9 is 128 s: a 1 s gap vanishes, 200 s becomes 256; the jump into padding stays
    assert gaps[0, :3].tolist() == [0.0, 0.0, 256.0]
    assert gaps[0, 3].item() == pytest.approx(-1.3e9 - 256, rel=1e-6)
    assert gaps[0, 4:].tolist() == [0.0, 0.0]
    exact = build("tim4rec", {"timestamp_dtype": "float64", "pad_gap": "zero"}, max_len=6)
    assert exact.time_gaps(items, stamps)[0].tolist() == [0.0, 1.0, 199.0, 0.0, 0.0, 0.0]


def test_tisasrec_time_matrices():
    stamps = torch.tensor([[1000.0, 1000.0, 1100.0, 1400.0, 0.0]], dtype=torch.float64)
    items = torch.tensor([[1, 2, 3, 4, 0]])
    repo = repo_time_matrix(stamps, 256)
    assert repo[0, 3, :4].tolist() == [256, 256, 256, 0] and repo[0, 2, :3].tolist() == [100, 100, 0]
    personal = personal_time_matrix(items, stamps, 256)
    # row 2: smallest non-zero gap so far 100 -> ticks 0, 0, 1; row 3: gaps {100, 300} -> scale 100 still
    assert personal[0, 2, :3].tolist() == [1, 1, 0]
    assert personal[0, 3, :4].tolist() == [4, 4, 3, 0]
    # brute force of the original's per-user rule at the last position (the whole visible history)
    times = stamps[0, :4]
    scale = min(float(d) for d in times.diff() if d != 0)
    ticks = [round(float(t - times.min()) / scale) + 1 for t in times]
    assert personal[0, 3, :4].tolist() == [min(abs(ticks[3] - t), 256) for t in ticks]


def test_tisasrec_bucketed_time_terms_equal_the_materialised_ones(beauty):
    model = build("tisasrec", {"time_encoding": "personal"})
    batch = real_batch(beauty, MAX_LEN, n=16, width=None)
    a = encode(model, batch.items, batch.timestamps)
    model.materialise_time = True
    b = encode(model, batch.items, batch.timestamps)
    torch.testing.assert_close(mask_real(batch.items, a), mask_real(batch.items, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", ["all", "last"])
def test_tisasrec_causal_pair_blocks_equal_the_full_pairs(beauty, rows):
    """Training with the repository's per-pair time dropout materialises only the causal pairs, in blocks
    of query rows: with the same dropped pairs, a time-aware attention layer gives the output and gradients
    of the full [L, L] pairs (zero above the blocks: those pairs are masked), for every query row and for
    each sequence's last row only (the prefix protocol's last layer)."""
    model = build("tisasrec", {"time_encoding": "personal"}, max_len=50).train()
    model.set_kernel_backend("torch", torch.device("cpu"))  # the torch twin's blocks
    batch = real_batch(beauty, 50, n=32, width=None)  # sorted by length: shuffled, so blocks' rows interleave
    shuffle = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    items, stamps, lengths = batch.items[shuffle], batch.timestamps[shuffle], batch.lengths[shuffle]
    length = items.size(1)
    relation = model.time_matrix(items, stamps)
    torch.manual_seed(1)
    unused = PairDropout(0, 0, model.dropout.p)  # the torch twin draws its masks from torch's generator
    blocks = [model._pair_embeddings(table, relation, unused) for table in (model.time_k, model.time_v)]
    assert all(isinstance(b, CausalPairs) and len(b.blocks) > 1 for b in blocks)
    # dropout really applied: some looked-up entries are zero
    assert any((pairs == 0).any() for _, pairs in blocks[0].blocks)

    def leaves(pairs: CausalPairs) -> CausalPairs:
        return CausalPairs([(i0, p.detach().requires_grad_()) for i0, p in pairs.blocks], pairs.length)

    def full(pairs: CausalPairs) -> torch.Tensor:
        b, h, _, _, d = pairs.blocks[0][1].shape
        dense = torch.zeros(b, h, length, length, d)
        for i0, p in pairs.blocks:
            dense[:, :, i0 : i0 + p.size(2), : p.size(3)] = p
        return dense

    layer = model.attention[0].eval()  # the layer's own dropouts off: only the pairs' masks differ by path
    x = torch.randn(items.size(0), length, layer.query.in_features)
    mask = attention_mask(items, x.dtype)
    at = (lengths - 1).clamp(min=0) if rows == "last" else None
    results = []
    for assemble in (lambda pairs: pairs, full):
        time_k, time_v = (leaves(b) for b in blocks)
        layer.zero_grad()
        out = layer(x, mask, assemble(time_k), assemble(time_v), at=at)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        (out * weights).sum().backward()
        # a block no last row falls in gets no gradient on the blocks path, zeros through the full pairs
        grads = [
            torch.zeros_like(p) if p.grad is None else p.grad for pairs in (time_k, time_v) for _, p in pairs.blocks
        ]
        results.append((out, grads, layer.query.weight.grad.clone()))
    (out_blocks, grads_blocks, query_blocks), (out_full, grads_full, query_full) = results
    torch.testing.assert_close(out_blocks, out_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(query_blocks, query_full, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_blocks, grads_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", ["all", "last"])
def test_tisasrec_fused_pairs_equal_the_pairs_dropped_with_the_same_masks(beauty, rows):
    """The "cpp" backend's DroppedPairs (the pairs' masks redrawn in C++) give a time-aware attention layer the
    output and the gradients (query weights, both time tables) of the materialised pairs [b, h, L, L, d] dropped
    with the same keep factors, for every query row and for each sequence's last row only."""
    if describe_backends("cpu")["time_pairs"] != "cpp":
        pytest.skip("the C++ kernels are unavailable here (no toolchain)")
    model = build("tisasrec", {"time_encoding": "personal"}, max_len=50).train()
    batch = real_batch(beauty, 50, n=32, width=None)
    items, stamps, lengths = batch.items, batch.timestamps, batch.lengths
    count, length = items.shape
    relation = model.time_matrix(items, stamps)
    heads, hidden = model.config.n_heads, model.config.hidden_size
    dropouts = (PairDropout(7, 0, 0.2), PairDropout(7, 1, 0.2))

    def materialised(table: torch.Tensor, dropout: PairDropout) -> torch.Tensor:
        dropped = table[relation] * keep_factors(dropout, count, length, hidden)  # [b, L, L, hidden]
        return dropped.view(count, length, length, heads, -1).permute(0, 3, 1, 2, 4)

    layer = model.attention[0].eval()  # the layer's own dropouts off: only the pairs' masks matter
    x = torch.randn(count, length, hidden)
    mask = attention_mask(items, x.dtype)
    at = (lengths - 1).clamp(min=0) if rows == "last" else None
    results = []
    for fused in (True, False):
        tables = [t.weight.detach().clone().requires_grad_() for t in (model.time_k, model.time_v)]
        if fused:
            positions = torch.arange(length).expand(count, -1)
            time_k, time_v = (DroppedPairs(t, relation, positions, d) for t, d in zip(tables, dropouts))
        else:
            time_k, time_v = (materialised(t, d) for t, d in zip(tables, dropouts))
        layer.zero_grad()
        out = layer(x, mask, time_k, time_v, at=at)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out, [t.grad for t in tables], layer.query.weight.grad.clone()))
    (out_fused, tables_fused, query_fused), (out_full, tables_full, query_full) = results
    torch.testing.assert_close(out_fused, out_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(query_fused, query_full, rtol=1e-4, atol=1e-6)
    for a, b in zip(tables_fused, tables_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(t.abs().sum() > 0 for t in tables_fused)


def test_tisasrec_cpp_keys_every_layer_by_one_seed_per_forward(beauty, monkeypatch):
    """Under pairwise dropout on the "cpp" backend, one forward pass keys every layer's time-pair kernels by one
    seed (the repository's masks: drawn once, shared by the layers), stream 0 for the key table and 1 for the value
    table; the seed comes from torch's generator, so a torch seed fixes it and the next pass draws another."""
    if describe_backends("cpu")["time_pairs"] != "cpp":
        pytest.skip("the C++ kernels are unavailable here (no toolchain)")
    import models.tisasrec as tisasrec_module

    calls = []
    for name in ("time_pair_scores", "time_pair_context"):

        def record(*args, _name=name, _original=getattr(tisasrec_module, name)):
            calls.append((_name, args[-1]))  # (x, table, relation, positions, dropout)
            return _original(*args)

        monkeypatch.setattr(tisasrec_module, name, record)
    model = build("tisasrec", {"time_encoding": "personal"}, max_len=50).train()
    batch = real_batch(beauty, 50, n=8, width=None)
    seeds = []
    for torch_seed in (3, 3, 4):
        calls.clear()
        torch.manual_seed(torch_seed)
        model.last_hidden(batch.items, batch.timestamps, batch.lengths)
        expected = [("time_pair_scores", 0), ("time_pair_context", 1)] * model.config.n_layers
        assert [(name, dropout.stream) for name, dropout in calls] == expected
        assert len({dropout.seed for _, dropout in calls}) == 1
        assert all(dropout.p == model.dropout.p > 0 for _, dropout in calls)
        seeds.append(calls[0][1].seed)
    assert seeds[0] == seeds[1] != seeds[2]
    calls.clear()
    model.eval().last_hidden(batch.items, batch.timestamps, batch.lengths)
    assert calls == []  # no dropout, no pairs: the bucketed path


@pytest.mark.parametrize(
    "name, config, signature",
    [
        ("mamba4rec", MAMBA4REC_CONFIGS["tim4rec-baseline"], "A_log"),  # 2 layers, residuals: scan and convolution
        ("tim4rec", {}, "time_layers.0.conv1.weight"),  # the SSD block's convolution and the time path's
        ("ssd4rec", {}, "conv1d.weight"),
    ],
)
def test_models_train_alike_on_the_cpp_and_torch_kernels(beauty, name, config, signature):
    # The same weights and batch through both CPU backends (the compiled scans, convolution and gated norm against
    # their torch twins): the loss and every parameter's gradient agree to float32 rounding. The dropout stays on
    # torch's masks for both ("cpp:dropout=torch", which keeps the FFN's activation apart from its dropout too; the
    # C++ dropout draws other masks and is tested on its own, and with its activation fused below).
    batch = real_batch(beauty, 50)
    results = []
    for backend in ("torch", "cpp"):
        if backend == "cpp" and describe_backends("cpu")["causal_conv1d"] != "cpp":
            pytest.skip("the C++ kernels are unavailable here (no toolchain)")
        model = build(name, config, max_len=50).train()
        _nonzero_linear_biases(model)
        model.set_kernel_backend(f"{backend}:dropout=torch", torch.device("cpu"))
        assert model.backend_report()["activation_dropout"] == "torch"
        results.append(_loss_and_gradients(model, batch))
    (loss_torch, grads_torch), (loss_cpp, grads_cpp) = results
    torch.testing.assert_close(loss_cpp, loss_torch, rtol=1e-5, atol=1e-6)
    assert grads_cpp.keys() == grads_torch.keys() and any(signature in n for n in grads_cpp)
    for n, grad in grads_torch.items():
        torch.testing.assert_close(grads_cpp[n], grad, rtol=1e-3, atol=1e-6, msg=lambda m: f"{n}: {m}")


def _nonzero_linear_biases(model):
    """RecBole's initialisation zeroes every Linear bias: these get the same values in every build, so that a bias a
    C++ kernel folds in (the SSD block's xBC projection bias, into its convolution) changes what is compared."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)


def _loss_and_gradients(model, batch):
    """One training step's loss and parameter gradients, after torch.manual_seed(1) (the same dropout seeds)."""
    torch.manual_seed(1)
    timestamps = batch.timestamps if model.uses_timestamps else None
    loss = model.loss(model.last_hidden(batch.items, timestamps, batch.lengths), batch.targets)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["mamba4rec", "tim4rec", "ssd4rec"])
def test_ffn_activation_fused_with_its_dropout_trains_alike(beauty, name):
    # The FFN's activation and dropout as one C++ kernel ("cpp") against the two steps with the same C++ masks
    # ("cpp:activation_dropout=torch"): the same loss and gradients up to float32 rounding; and the fusion ran.
    if describe_backends("cpu")["activation_dropout"] != "cpp":
        pytest.skip("the C++ kernels are unavailable here (no toolchain)")
    from models.kernels import dropout as dropout_module

    batch = real_batch(beauty, 50)
    results, calls = [], []
    for backend in ("cpp:activation_dropout=torch", "cpp"):
        model = build(name, max_len=50).train()
        model.set_kernel_backend(backend, torch.device("cpu"))
        assert model.backend_report()["activation_dropout"] == ("torch" if "=" in backend else "cpp")
        with pytest.MonkeyPatch.context() as patch:
            fused = dropout_module._ActivatedDropoutCpp.apply
            patch.setattr(dropout_module._ActivatedDropoutCpp, "apply", lambda *a: calls.append(backend) or fused(*a))
            results.append(_loss_and_gradients(model, batch))
    (loss_apart, grads_apart), (loss_fused, grads_fused) = results
    assert calls and set(calls) == {"cpp"}  # every FFN layer's call, none from the unfused model
    torch.testing.assert_close(loss_fused, loss_apart, rtol=1e-5, atol=1e-6)
    assert grads_fused.keys() == grads_apart.keys()
    for n, grad in grads_apart.items():
        torch.testing.assert_close(grads_fused[n], grad, rtol=1e-3, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_mamba4rec_dt_init_option():
    official = build("mamba4rec")
    assert torch.count_nonzero(official.layers[0].mamba.dt_proj.bias) == 0  # RecBole re-init, as released
    mamba = build("mamba4rec", {"mamba_dt_init": True})
    step = torch.nn.functional.softplus(mamba.layers[0].mamba.dt_proj.bias)
    assert step.min() >= 1e-4 - 1e-7 and step.max() <= 0.1 + 1e-6


def test_conv_activation_follows_the_official_rule():
    assert build("ssd4rec").layers[0].ssd.activation == "hardswish"  # n_heads 4
    assert build("ssd4rec", {"head_dim": 16}).layers[0].ssd.activation == "silu"  # n_heads 8
    assert build("tim4rec", {"conv_activation": "silu"}).time_activation == "silu"


# --------------------------------------------------------------------------------------------- training
TRAINING = [
    ("sasrec", {}, "prefix"),
    ("tisasrec", {}, "prefix"),
    ("tisasrec", {"time_dropout": "table"}, "all_positions"),
    ("mamba4rec", {}, "prefix"),
    ("ssd4rec", {}, "all_positions"),
    ("tim4rec", {}, "prefix"),
    ("tim4rec", {"time_encoding": "causal"}, "all_positions"),
]


@pytest.mark.parametrize("name,options,protocol", TRAINING, ids=[f"{n}-{p}-{o}" for n, o, p in TRAINING])
def test_training_lowers_the_loss(beauty, name, options, protocol):
    """Two short epochs (about 220 Adam steps of 16 samples) on the first 300 users, through the project
    trainer: the second epoch's mean loss is clearly lower than the first's and than the uniform guess."""
    data = subset(beauty, 300)
    config = TrainConfig(
        model=name,
        dataset="amazon-beauty",
        model_params=options,
        protocol=protocol,
        max_len=MAX_LEN,
        batch_size=16,
        lr=3e-3,
        epochs=2,
        device="cpu",
        seed=3,
    )
    trainer = Trainer(config, data=data, progress=False)
    first = trainer.train_epoch(1)
    second = trainer.train_epoch(2)
    assert math.isfinite(first) and second < first - 0.1 and second < math.log(12102) - 0.5


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "name,options,message",
    [
        ("tim4rec", {"head_dim": 48}, "divisible by head_dim"),
        ("ssd4rec", {"hidden_size": 40, "head_dim": 32}, "divisible by head_dim"),
        ("tisasrec", {"n_heads": 3}, "divisible by n_heads"),
        ("sasrec", {"n_heads": 5}, "divisible by n_heads"),
        ("tim4rec", {"chunk_size": 0}, "chunk_size"),
        ("tim4rec", {"time_encoding": "fourier"}, "time_encoding"),
        ("tim4rec", {"conv_activation": "relu"}, "conv_activation"),
        ("tisasrec", {"time_encoding": "absolute"}, "time_encoding"),
        ("mamba4rec", {"d_state": 0}, "d_state"),
        ("mamba4rec", {"hiden_size": 64}, "unknown option"),
    ],
)
def test_impossible_configurations_are_clear_errors(name, options, message):
    with pytest.raises(ModelConfigError, match=message):
        models.build(name, 100, 20, options)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_backend_errors(name):
    with pytest.raises(ModelConfigError, match="backend"):
        models.build(name, 100, 20, kernel_backend="vulkan")
    if not torch.cuda.is_available():
        with pytest.raises(ModelConfigError, match="CUDA|torch backend|no GPU kernel"):
            models.build(name, 100, 20, kernel_backend="triton", device="cpu")
    assert set(models.build(name, 100, 20, kernel_backend="torch").backend_report().values()) <= {"torch"}


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_cpu_dropout_is_an_inverted_bernoulli_mask(backend):
    """models.base.Dropout (every model's dropout) draws its CPU mask from 32-bit words, on torch's generator or
    in C++: it must still zero a fraction p, scale survivors by 1/(1-p), pass gradients through the same mask,
    follow the torch seed, and be the identity in eval mode or at p = 0."""

    if backend == "cpp" and describe_backends("cpu")["dropout"] != "cpp":
        pytest.skip("the C++ kernels are unavailable here (no toolchain)")

    def dropout(p: float) -> Dropout:
        layer = Dropout(p)
        layer.set_backends({"dropout": backend})
        return layer

    torch.manual_seed(0)
    layer = dropout(0.4)
    x = torch.full((400, 500), 2.0, requires_grad=True)
    y = layer(x)
    zeros = (y == 0).float().mean().item()
    assert abs(zeros - 0.4) < 0.005  # 200k draws: sd of the fraction about 0.0011
    assert torch.allclose(y[y != 0], torch.tensor(2.0 / 0.6))
    y.sum().backward()
    assert torch.equal(x.grad, (y / 2.0).detach())
    torch.manual_seed(0)
    assert torch.equal(dropout(0.4)(x), y)
    torch.manual_seed(1)
    assert not torch.equal(dropout(0.4)(x), y)
    assert not torch.equal(layer(x), y)  # the next draw differs
    layer.eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(dropout(0.0)(x), x)


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5, 0.9])
def test_drop_mask_uses_every_bit_of_both_words(p):
    """The mask packs two 32-bit words per 64-bit draw: each word alone (even and odd elements) must drop
    a fraction p; torch's plain int64 random_() leaves the top bit 0, which would drop only ~max(0, 2p-1)
    of the odd elements."""
    from models.base import drop_mask

    torch.manual_seed(0)
    mask = drop_mask(torch.Size([1000, 1000]), p, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    flat = mask.flatten().float()
    for half in (flat[0::2], flat[1::2]):  # 500k draws each: sd of the fraction below 0.0008
        assert abs(half.mean().item() - p) < 0.004


def test_sasrec_cpu_attention_with_dropout_is_sdpa_math():
    """SASRec's CPU training attention (written out for the cheap dropout mask) is SDPA's causal math:
    equal with the mask switched off, and with p > 0 it drops a fraction p of the probabilities."""
    from models.sasrec import SASRecConfig, SelfAttention

    torch.manual_seed(0)
    attention = SelfAttention(SASRecConfig(hidden_size=16, n_heads=4, attn_dropout=0.3)).double()
    q, k, v = (torch.randn(3, 4, 9, 4, dtype=torch.float64) for _ in range(3))
    attention.probability_dropout.p = 0.0
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention._cpu_attention_with_dropout(q, k, v), expected, rtol=1e-12, atol=1e-12)
    attention.probability_dropout.p = 0.3
    ones = torch.ones(200, 4, 30, 1, dtype=torch.float64)
    summed = attention._cpu_attention_with_dropout(torch.zeros_like(ones), torch.zeros_like(ones), ones)
    # uniform causal weights 1/(i+1); each kept one scaled by 1/0.7, so the mean over rows stays 1
    assert abs(summed.mean().item() - 1.0) < 0.01
    assert summed.std().item() > 0.1  # without dropout every output would be exactly 1
