"""Check the harness against RecBole 1.2.0 (the official TiM4Rec code's framework) on one dataset.

1. Split: for every user, the same validation and test target and the same history (item tokens,
   oldest first, at most max_len) as RecBole's own data pipeline (5-core, TO ordering, LS
   valid_and_test, as in the official configs).
2. SASRec: RecBole's SASRec (the TiM4Rec baseline configuration) and ours with the same weights
   give the same full-ranking scores and the same cross-entropy loss on a RecBole training batch.

RecBole is not a dependency of the project; install it into a side folder first (no dependencies:
only its data code and its SASRec are used):

    .venv/bin/python -m pip install --target /tmp/recbole recbole==1.2.0 colorlog colorama texttable tabulate --no-deps
    HARNESS_DATA_DIR=../shared/data .venv/bin/python scripts/check_against_recbole.py \
        --recbole /tmp/recbole --dataset amazon-beauty

Exit status 0 when everything agrees. RecBole 1.2.0 predates NumPy 2 and imports
optional extras at package import (tensorboard, thop, ray, kmeans_pytorch): the few names it needs
are provided here, none of them on the data path.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path


def _import_recbole(folder: str):
    import numpy as np

    sys.path.insert(0, folder)
    for alias, target in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if not hasattr(np, alias):
            setattr(np, alias, target)
    board = types.ModuleType("torch.utils.tensorboard")
    board.SummaryWriter = object
    sys.modules.setdefault("torch.utils.tensorboard", board)
    for name in ("thop", "ray", "plotly", "kmeans_pytorch"):
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.profile = stub.kmeans = None
            sys.modules[name] = stub
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation

    return Config, create_dataset, data_preparation


def recbole_pipeline(folder: str, inter_file: Path, dataset: str, max_len: int):
    """RecBole's config, dataset and (train, valid, test) loaders for the official protocol."""
    Config, create_dataset, data_preparation = _import_recbole(folder)
    root = Path(tempfile.mkdtemp(prefix="recbole-"))
    (root / dataset).mkdir()
    (root / dataset / f"{dataset}.inter").symlink_to(inter_file.resolve())
    config = Config(
        model="SASRec",
        dataset=dataset,
        config_dict={
            "data_path": str(root),
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "user_inter_num_interval": "[5,inf)",
            "item_inter_num_interval": "[5,inf)",
            "MAX_ITEM_LIST_LENGTH": max_len,
            "train_neg_sample_args": None,
            "loss_type": "CE",
            "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
            "show_progress": False,
            "device": "cpu",
            **SASREC_BASELINE,
        },
    )
    dataset_ = create_dataset(config)
    return config, dataset_, data_preparation(config, dataset_)


# baseline/SASRec/config.yaml of the TiM4Rec repository, in RecBole's names
SASREC_BASELINE = {
    "n_layers": 2,
    "n_heads": 8,
    "hidden_size": 64,
    "inner_size": 256,
    "hidden_dropout_prob": 0.2,
    "attn_dropout_prob": 0.2,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "initializer_range": 0.02,
}


def recbole_samples(loaders) -> dict[str, dict]:
    """split -> {user token: (target token, history tokens joined by spaces)}"""
    out = {}
    for split, loader in zip(("valid", "test"), loaders[1:]):
        data = loader._dataset
        inter = data.inter_feat
        users = data.id2token("user_id", inter["user_id"].numpy())
        targets = data.id2token("item_id", inter["item_id"].numpy())
        histories = [
            " ".join(data.id2token("item_id", seq[:length]))
            for seq, length in zip(inter["item_id_list"].numpy(), inter["item_length"].numpy())
        ]
        out[split] = {str(u): (str(t), h) for u, t, h in zip(users, targets, histories)}
    return out


def compare_split(data, theirs: dict, max_len: int) -> bool:
    from harness.data.samples import eval_windows

    ok = True
    for split in ("valid", "test"):
        windows = eval_windows(data, split, max_len)
        same_target = same_history = 0
        for start, end, user in zip(windows.starts, windows.ends, windows.users):
            target, history = theirs[split].get(str(data.user_tokens[user]), (None, None))
            same_target += target == str(data.item_tokens[data.items[end]])
            same_history += history == " ".join(str(data.item_tokens[i]) for i in data.items[start:end])
        n = len(windows.users)
        print(
            f"split {split}: harness {n} users, RecBole {len(theirs[split])}; equal targets {same_target}, "
            f"equal histories {same_history}"
        )
        ok &= n == len(theirs[split]) == same_target == same_history
    return ok


def compare_sasrec(config, dataset, train_loader, max_len: int) -> bool:
    """Copy RecBole's SASRec weights into ours; scores and loss on a training batch must agree."""
    import torch
    from recbole.model.sequential_recommender.sasrec import SASRec as RecBoleSASRec

    import models

    torch.manual_seed(0)
    theirs = RecBoleSASRec(config, train_loader._dataset).eval()
    ours = models.build(
        "sasrec",
        dataset.item_num - 1,
        max_len,
        {
            "hidden_size": 64,
            "n_layers": 2,
            "n_heads": 8,
            "inner_size": 256,
            "dropout": 0.2,
            "attn_dropout": 0.2,
            "layer_norm_eps": 1e-12,
        },
    ).eval()
    weights = theirs.state_dict()
    mapped = {
        "item_embedding.weight": weights["item_embedding.weight"],
        "position_embedding.weight": weights["position_embedding.weight"],
        "input_norm.weight": weights["LayerNorm.weight"],
        "input_norm.bias": weights["LayerNorm.bias"],
    }
    for i in range(2):
        attention = f"trm_encoder.layer.{i}.multi_head_attention."
        feed = f"trm_encoder.layer.{i}.feed_forward."
        for kind in ("weight", "bias"):
            mapped[f"attention.{i}.qkv.{kind}"] = torch.cat(
                [weights[f"{attention}{name}.{kind}"] for name in ("query", "key", "value")]
            )
            for ours_name, their_name in (("dense", "dense"), ("norm", "LayerNorm")):
                mapped[f"attention.{i}.{ours_name}.{kind}"] = weights[f"{attention}{their_name}.{kind}"]
            for ours_name, their_name in (("up", "dense_1"), ("down", "dense_2"), ("norm", "LayerNorm")):
                mapped[f"feed_forward.{i}.{ours_name}.{kind}"] = weights[f"{feed}{their_name}.{kind}"]
    ours.load_state_dict(mapped, strict=True)
    batch = next(iter(train_loader))
    with torch.no_grad():
        their_scores = theirs.full_sort_predict(batch)
        our_scores = ours.score(ours.last_hidden(batch["item_id_list"], None, batch["item_length"]))
        their_loss = theirs.calculate_loss(batch).item()
        our_loss = torch.nn.functional.cross_entropy(our_scores, batch["item_id"]).item()
    gap = (their_scores - our_scores).abs().max().item()
    n_theirs, n_ours = (sum(p.numel() for p in m.parameters()) for m in (theirs, ours))
    print(
        f"sasrec: parameters RecBole {n_theirs:,} ours {n_ours:,}; batch of {len(batch)}: max |score "
        f"difference| {gap:.2e}; loss RecBole {their_loss:.6f} ours {our_loss:.6f}"
    )
    return n_theirs == n_ours and gap < 1e-4 and abs(their_loss - our_loss) < 1e-5


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, run from anywhere
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recbole", required=True, help="folder holding the recbole package")
    parser.add_argument("--dataset", default="amazon-beauty", help="a catalogue name with a RecBole .inter file")
    parser.add_argument("--max-len", type=int, default=50)
    args = parser.parse_args()

    from harness.data.catalogue import load, locate
    from harness.data.preprocess import PreprocessSettings

    data = load(args.dataset, PreprocessSettings(5, 5))
    inter_file = locate(args.dataset, download=False)[1].path
    config, dataset, loaders = recbole_pipeline(args.recbole, inter_file, args.dataset, args.max_len)
    ok = compare_split(data, recbole_samples(loaders), args.max_len)
    ok &= compare_sasrec(config, dataset, loaders[0], args.max_len)
    print("agrees with RecBole" if ok else "DIFFERENT from RecBole")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
