"""Test-time augmentation of the face side, measured: one pass, flip (the demo's default) and crop views (shifted or
zoomed copies of the face, each with its mirror), all views of a face averaged into one embedding, then scored
through sentence sets on the same faces. Issue 21's "flip or crop test-time augmentation" ablation.

    python bench/bench_tta.py --data runs/lite2/data_sample                      # val: the choice
    python bench/bench_tta.py --data runs/lite2/data_sample --split test --views flip,shift3,zoom1.1   # read after

Views: none (1 pass), flip (2), shiftN (flip + the face moved N px up, down, left and right, edges replicated, each
with its mirror: 10), zoomZ (flip + the centre crop of the face enlarged Z times and the face shrunk Z times inside
replicated edges, each with its mirror: 6). Sentence sets: on val the paper's eight and the four halves of
captions/select.csv (bench/select_score.py's five-set mean); on test the paper's eight and the everyday English and
Korean sets. One JSON line per view set.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import metrics  # noqa: E402
from checkpoint import create_model_and_transforms, read_checkpoint  # noqa: E402
from embed import embed_images, text_prototypes  # noqa: E402
from evaluate import class_order, get_bank, pick_split, read_data  # noqa: E402
from precision import autocast_for  # noqa: E402
from select_score import SELECT, half_banks  # noqa: E402
from utils import UserError, run_cli  # noqa: E402

TEST_SETS = ["paper", str(ROOT / "captions" / "everyday.csv"), str(ROOT / "captions" / "everyday_ko.csv")]


def views(x: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """[b, 3, H, H] -> the view batches of `kind` (module docstring), each [b, 3, H, H]."""
    if kind == "none":
        return [x]
    out, h = [x, x.flip(3)], x.shape[-1]
    if kind.startswith("shift"):
        s = int(kind[5:])
        pad = F.pad(x, (s, s, s, s), mode="replicate")                        # [b, 3, H+2s, H+2s]
        for dy, dx in ((0, -s), (0, s), (-s, 0), (s, 0)):
            v = pad[..., s + dy:s + dy + h, s + dx:s + dx + h]
            out += [v, v.flip(3)]
    elif kind.startswith("zoom"):
        z = float(kind[4:])
        big = F.interpolate(x, size=round(h * z), mode="bilinear", align_corners=False)
        o = (big.shape[-1] - h) // 2
        small = F.interpolate(x, size=round(h / z), mode="bilinear", align_corners=False)
        q = h - small.shape[-1]
        for v in (big[..., o:o + h, o:o + h], F.pad(small, (q // 2, q - q // 2, q // 2, q - q // 2), mode="replicate")):
            out += [v, v.flip(3)]
    elif kind != "flip":
        raise UserError(f"--views {kind}: use none, flip, shiftN (e.g. shift3) or zoomZ (e.g. zoom1.1)")
    return out


def embed_views(model, paths: list[str], preprocess, kind: str, autocast) -> np.ndarray:
    """Faces -> float32 [N, D] unit vectors, the mean of each face's views (undecodable faces refused)."""
    emb, ok = embed_images(model, paths, preprocess, torch.device("cpu"), 64, autocast, partial(views, kind=kind))
    if not ok.all():
        raise UserError(f"{paths[int(np.argmin(ok))]}: not a readable image")
    return emb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "models" / "exprclip-ferplus.pth"))
    ap.add_argument("--data", required=True, help="a captions.csv folder (bench/ferplus.py's data_sample)")
    ap.add_argument("--split", default="val", help="val (the choice) or test (FER2013Valid, read after)")
    ap.add_argument("--views", default="none,flip,shift3,shift6,zoom1.1,zoom1.2")
    a = ap.parse_args(argv)
    kinds = a.views.split(",")
    passes = {k: len(views(torch.zeros(1, 3, 8, 8), k)) for k in kinds}    # a bad name is refused before loading
    ck = read_checkpoint(a.checkpoint)
    model, _, preprocess = create_model_and_transforms(ck, torch.device("cpu"), path=a.checkpoint)
    autocast, _ = autocast_for(model.cfg, torch.device("cpu"))
    table, _ = read_data(a.data)
    df, _ = pick_split(table, a.split)
    classes = class_order(list(df["label"]))
    y = np.array([classes.index(c) for c in df["label"]])
    with tempfile.TemporaryDirectory() as tmp:
        sets = ["paper", *half_banks(SELECT, Path(tmp))] if a.split == "val" else TEST_SETS
        protos = [text_prototypes(model, get_bank(s, table), classes, autocast) for s in sets]
    for kind in kinds:
        emb = embed_views(model, list(df["path"]), preprocess, kind, autocast)
        reps = [metrics.classification_report(metrics.zero_shot_scores(emb, p), y, classes) for p in protos]
        top = [round(100 * r["top1"], 2) for r in reps]
        print(json.dumps(dict(views=kind, passes=passes[kind], faces=len(y),
                              paper_top1=top[0], paper_uar=round(100 * reps[0]["uar"], 2), sets=top,
                              mean=round(float(np.mean(top)), 2))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
