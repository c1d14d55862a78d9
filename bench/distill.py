"""An ensemble distilled into one model (issue 21's last accuracy lever): finished models' class probabilities,
averaged, either scored as an ensemble on a split or blended into the training rows' `soft_labels`, so that
`train.py --targets soft` (bench/ferplus.py's recipe) trains one student on them.

    python bench/distill.py score --teachers A.pth B.pth C.pth --data runs/l2full/data_sample      # val: the choice
    python bench/distill.py targets --teachers A.pth B.pth C.pth --data runs/l2full/data_sample \
        --out runs/kd/data_sample --weight 0.5                       # then bench/ferplus.py --work runs/kd ...

A teacher's probabilities: softmax over the classes of its logit scale x the cosine between each face (with its
mirror, as the demo reads it) and each class's paper-sentence prototype. `score` prints one JSON line per teacher and
one per ensemble of two or more (mean probabilities), through bench/select_score.py's five sentence sets, on one
split or on several pooled (`--split val,test`: the 852 val faces and FER2013Valid, BENCHMARKS.md's selection set
for close calls since the distillation round).
`targets` rewrites only `train` rows (adding the column when the data has none): soft_labels = (1 - weight) x the row's own votes (its one-hot label when it has
none) + weight x the ensemble's probabilities; val and test rows, and faces that do not decode, are left as they were.
Relative image paths are written out absolute, so the new folder needs no copy of the images.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import metrics  # noqa: E402
from checkpoint import create_model_and_transforms, read_checkpoint  # noqa: E402
from dataset import target_distributions  # noqa: E402
from embed import embed_images, text_prototypes  # noqa: E402
from evaluate import SPLIT_ALIASES, class_order, get_bank, pick_split, read_data  # noqa: E402
from precision import autocast_for  # noqa: E402
from select_score import SELECT, half_banks  # noqa: E402
from utils import UserError, read_csv_checked, run_cli  # noqa: E402


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def teacher_probs(path: str, paths: list[str], classes: list[str], banks: list[dict]) -> tuple[list, np.ndarray]:
    """One teacher: [N, C] probabilities through each bank (flip-averaged faces), and the decoded-face mask [N]."""
    dev = torch.device("cpu")
    model, _, preprocess = create_model_and_transforms(read_checkpoint(path, hint="--teachers"), dev, path=path)
    autocast, _ = autocast_for(model.cfg, dev)
    emb, ok = embed_images(model, paths, preprocess, dev, 64, autocast, tta=True)              # [N, D]
    scale = model.scale().item()
    protos = [text_prototypes(model, bank, classes, autocast) for bank in banks]               # each [C, D]
    return [softmax(scale * metrics.zero_shot_scores(emb, p)) for p in protos], ok


def check_weight(weight: float) -> None:
    if not 0 <= weight <= 1:
        raise UserError(f"--weight {weight}: use a share between 0 and 1 (0.5 = half votes, half teachers)")


def blend(train: pd.DataFrame, probs: np.ndarray, ok: np.ndarray, classes: list[str], weight: float) -> dict:
    """Train rows (read_data's table) -> {image: soft_labels JSON} = (1 - weight) x own targets + weight x probs
    [n, C]; undecoded faces, and rows whose label is outside `classes`, are left out (they keep their cell)."""
    check_weight(weight)
    own = target_distributions(train, classes, soft=True, source="--data captions.csv")      # [n, C]
    mixed = (1 - weight) * own + weight * probs
    keep = ok & (own.sum(1) > 0)
    return {img: json.dumps({c: round(float(v), 5) for c, v in zip(classes, row)})
            for img, row, k in zip(train["image"], mixed, keep) if k}


def report(probs: list[np.ndarray], y: np.ndarray, classes: list[str], **head) -> dict:
    reps = [metrics.classification_report(p, y, classes) for p in probs]
    top = [round(100 * r["top1"], 2) for r in reps]
    return dict(head, faces=len(y), paper_top1=top[0], paper_uar=round(100 * reps[0]["uar"], 2), sets=top,
                mean=round(float(np.mean(top)), 2))


def score(a) -> None:
    table, _ = read_data(a.data)
    df = pd.concat([pick_split(table, s)[0] for s in dict.fromkeys(a.split.split(","))], ignore_index=True)   # val,test: pooled
    classes = class_order(list(df["label"]))
    y = np.array([classes.index(c) for c in df["label"]])
    with tempfile.TemporaryDirectory() as tmp:
        banks = [get_bank(s, table) for s in ["paper", *half_banks(SELECT, Path(tmp))]]
    each = []
    for t in a.teachers:
        probs, ok = teacher_probs(t, list(df["path"]), classes, banks)
        if not ok.all():
            raise UserError(f"{df['path'].iloc[int(np.argmin(ok))]}: not a readable image")
        each.append(probs)
        print(json.dumps(report(probs, y, classes, teachers=[t])), flush=True)
    for k in range(2, len(each) + 1):
        for sub in itertools.combinations(range(len(each)), k):
            mean = [np.mean([each[i][s] for i in sub], 0) for s in range(len(banks))]
            print(json.dumps(report(mean, y, classes, teachers=[a.teachers[i] for i in sub])), flush=True)


def targets(a) -> None:
    out = Path(a.out) / "captions.csv"
    if out.exists():
        raise UserError(f"{out} exists; pick a new --out folder (targets are never written over)")
    df = read_csv_checked(Path(a.data) / "captions.csv", ("image", "label", "split"),
                          hint="a captions.csv with image,label,split columns (bench/ferplus.py writes one)")
    table, _ = read_data(a.data)                                     # the same rows, image paths resolved
    if "soft_labels" not in df.columns:                              # hard labels only: each row's own target
        df["soft_labels"], table["soft_labels"] = "", ""              # is its one-hot label
    train = table[table["split"] == "train"].reset_index(drop=True)
    if train.empty:
        raise UserError(f"{a.data}: no `train` rows to distil into")
    classes = class_order(list(train["label"]))
    probs, ok = zip(*(teacher_probs(t, list(train["path"]), classes, [get_bank("paper", table)])
                      for t in a.teachers))
    mean = np.mean([p[0] for p in probs], 0)                          # [n_train, C]
    new = blend(train, mean, np.logical_and.reduce(ok), classes, a.weight)
    split = df["split"].str.strip().str.lower().replace(SPLIT_ALIASES)
    hit = (split == "train") & df["image"].isin(new.keys())          # val and test rows are never touched
    df.loc[hit, "soft_labels"] = df.loc[hit, "image"].map(new)
    found = dict(zip(table["image"], table["path"]))                 # as training resolves them (e.g. images/)
    df["image"] = [str(Path(found[p]).resolve()) if p in found else p for p in df["image"]]   # usable from --out
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    agree = float((mean.argmax(1) == np.array([classes.index(c) for c in train["label"]])).mean())
    print(json.dumps(dict(out=str(out), rows=int(hit.sum()), kept=int((~hit & (split == "train")).sum()),
                          weight=a.weight, teachers=a.teachers, teacher_train_top1=round(100 * agree, 2))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["score", "targets"])
    ap.add_argument("--teachers", nargs="+", required=True, help="finished checkpoints (exported or final)")
    ap.add_argument("--data", required=True, help="a captions.csv folder (bench/ferplus.py's data_sample)")
    ap.add_argument("--split", default="val",
                    help="score: the split(s) read, pooled when several (val; val,test: the 4,405-face selection set)")
    ap.add_argument("--out", help="targets: a new folder for the blended captions.csv")
    ap.add_argument("--weight", type=float, default=0.5, help="targets: the teachers' share of each target")
    a = ap.parse_args(argv)
    if a.cmd == "targets" and not a.out:
        raise UserError("targets needs --out FOLDER (a new folder for the blended captions.csv)")
    check_weight(a.weight)                                            # before minutes of teacher inference
    score(a) if a.cmd == "score" else targets(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
