"""Check that the harness's validation and test samples equal RecBole 1.2.0's, user by user.

For every user: the same target item and the same history (item tokens, oldest first, at most
max_len) in both splits, from RecBole's own data pipeline (5-core, TO ordering, LS valid_and_test,
as in the official TiM4Rec configs). RecBole is not a dependency of the project; install it into a
side folder first (no dependencies: only its data code is used):

    .venv/bin/python -m pip install --target /tmp/recbole recbole==1.2.0 colorlog colorama texttable tabulate --no-deps
    HARNESS_DATA_DIR=../shared/data .venv/bin/python scripts/check_split_against_recbole.py \
        --recbole /tmp/recbole --dataset amazon-beauty

Exit status 0 when every target and history agrees. RecBole 1.2.0 predates NumPy 2 and imports
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


def recbole_samples(folder: str, inter_file: Path, dataset: str, max_len: int) -> dict[str, dict]:
    """split -> {user token: (target token, history tokens joined by spaces)}"""
    Config, create_dataset, data_preparation = _import_recbole(folder)
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / dataset).mkdir()
        (Path(root) / dataset / f"{dataset}.inter").symlink_to(inter_file.resolve())
        config = Config(model="SASRec", dataset=dataset, config_dict={
            "data_path": root, "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "user_inter_num_interval": "[5,inf)", "item_inter_num_interval": "[5,inf)",
            "MAX_ITEM_LIST_LENGTH": max_len, "train_neg_sample_args": None, "loss_type": "CE",
            "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full"},
            "show_progress": False,
        })
        _, valid, test = data_preparation(config, create_dataset(config))
    out = {}
    for split, loader in (("valid", valid), ("test", test)):
        data = loader._dataset
        inter = data.inter_feat
        users = data.id2token("user_id", inter["user_id"].numpy())
        targets = data.id2token("item_id", inter["item_id"].numpy())
        histories = [" ".join(data.id2token("item_id", seq[:length]))
                     for seq, length in zip(inter["item_id_list"].numpy(), inter["item_length"].numpy())]
        out[split] = {str(u): (str(t), h) for u, t, h in zip(users, targets, histories)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recbole", required=True, help="folder holding the recbole package")
    parser.add_argument("--dataset", default="amazon-beauty", help="a catalogue name with a RecBole .inter file")
    parser.add_argument("--max-len", type=int, default=50)
    args = parser.parse_args()

    from harness.data.catalogue import load, locate
    from harness.data.preprocess import PreprocessSettings
    from harness.data.samples import eval_windows

    data = load(args.dataset, PreprocessSettings(5, 5))
    theirs = recbole_samples(args.recbole, locate(args.dataset, download=False)[1].path, args.dataset, args.max_len)
    ok = True
    for split in ("valid", "test"):
        windows = eval_windows(data, split, args.max_len)
        same_target = same_history = 0
        for start, end, user in zip(windows.starts, windows.ends, windows.users):
            target, history = theirs[split].get(str(data.user_tokens[user]), (None, None))
            same_target += target == str(data.item_tokens[data.items[end]])
            same_history += history == " ".join(str(data.item_tokens[i]) for i in data.items[start:end])
        n = len(windows.users)
        print(f"{split}: harness {n} users, RecBole {len(theirs[split])}; equal targets {same_target}, "
              f"equal histories {same_history}")
        ok &= n == len(theirs[split]) == same_target == same_history
    print("identical to RecBole" if ok else "DIFFERENT from RecBole")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
