"""Text-tower ablation: tower x training sentences x selection rule, with the image side of one trained model kept.

    python bench/multilingual.py --checkpoint models/exprclip-ferplus.pth --work runs/multilingual
    python bench/multilingual.py ... --ship models/new.pth      # also write the variant named by --ship-variant

Each variant learns a linear text head with align_text.align on FER2013Train faces (votes as targets) and keeps an
epoch by the selection phrasings (captions/select.csv, English and Korean, on the 3% `val` carve-out of train), or
the last epoch. Every variant is then scored on FER2013Valid (the bench's `test` split, never used to train or
select) through three sentence sets: the paper's eight sentences, unseen everyday English (captions/everyday.csv)
and unseen everyday Korean (captions/everyday_ko.csv): majority-vote top-1 and UAR, no TTA. The first row is the
model as it is (its own text tower). Prints a markdown table; results also go to WORK/multilingual.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import align_text  # noqa: E402
import evaluate  # noqa: E402
import metrics  # noqa: E402
from captions import CANONICAL, load_caption_bank  # noqa: E402
from checkpoint import create_model_and_transforms, read_checkpoint, save_checkpoint  # noqa: E402
from embed import text_prototypes  # noqa: E402
from utils import run_cli  # noqa: E402

import ferplus  # noqa: E402

CLASSES = list(CANONICAL)
SMALL, EN = "paper,rich", "paper,rich,captions/facs_en.csv"
LARGE = "paper,rich,captions/facs_en.csv,captions/facs_ko.csv"
TOWERS = {"e5": "pkg:multilingual-e5-small", "use": "pkg:multilingual-use"}
VARIANTS = [(t, b) for t in TOWERS for b in ("small", "en", "large")]       # each gives a best and a last row
EVAL_SETS = {"paper": "paper", "everyday": str(ferplus.EVERYDAY), "everyday_ko": str(ferplus.EVERYDAY_KO)}


def score(model, emb: np.ndarray, y: np.ndarray) -> dict:
    """top-1 / UAR of the test faces through each evaluation sentence set."""
    out = {}
    for name, bank in EVAL_SETS.items():
        protos = text_prototypes(model, load_caption_bank(bank), CLASSES)
        rep = metrics.classification_report(metrics.zero_shot_scores(emb, protos), y, CLASSES)
        out[name] = dict(top1=rep["top1"], uar=rep["uar"])
    return out


def row(name: str, r: dict) -> str:
    s = r["scores"]
    cells = [f"{100 * s[k]['top1']:.1f} / {100 * s[k]['uar']:.1f}" for k in EVAL_SETS]
    gaps = [f"{100 * (s[k]['top1'] - s['paper']['top1']):+.1f}" for k in ("everyday", "everyday_ko")]
    sel = r.get("select", {})
    sel_txt = ", ".join(f"{k} {100 * v:.1f}" for k, v in sel.items() if k != "epoch") or "-"
    return f"| {name} | {' | '.join(cells)} | {' | '.join(gaps)} | {r.get('epoch', '-')} | {sel_txt} |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "models" / "exprclip-ferplus.pth"))
    ap.add_argument("--ferplus", default=str(ROOT.parent / "shared" / "data" / "ferplus"))
    ap.add_argument("--work", default="runs/multilingual")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--variants", default="all", help="comma list of tower-bank, e.g. e5-large,use-en, or all")
    ap.add_argument("--ship", help="write the --ship-variant model here")
    ap.add_argument("--ship-variant", default="e5-large-best")
    a = ap.parse_args(argv)
    work = Path(a.work)
    data = ferplus.prepare_data(Path(a.ferplus), work, 0, with_sample=True)
    ck = read_checkpoint(a.checkpoint)
    old, _, preprocess = create_model_and_transforms(ck, "cpu", path=a.checkpoint)
    table, _ = evaluate.read_data(str(data))
    faces = {s: align_text.split_faces(old, preprocess, table, s, CLASSES, a.checkpoint, str(work))
             for s in ("train", "val", "test")}
    emb_te, df_te = faces["test"]
    y = np.array([CLASSES.index(c) for c in df_te["label"]])
    results = {"as shipped": dict(scores=score(old, emb_te, y))}
    print(f"{len(faces['train'][1])} training faces, {len(faces['val'][1])} selection faces, {len(y)} test faces")
    banks = dict(small=SMALL, en=EN, large=LARGE)
    for tower, bank in VARIANTS:
        if a.variants != "all" and f"{tower}-{bank}" not in a.variants.split(","):
            continue
        t0 = time.time()
        models, epochs, hist = align_text.align(old, faces, TOWERS[tower], banks[bank], str(ROOT / "captions" /
                                                "select.csv"), a.epochs)
        for keep, model in models.items():
            name = f"{tower}-{bank}-{keep}"
            results[name] = dict(scores=score(model, emb_te, y), epoch=epochs[keep], select=hist[epochs[keep]],
                                 seconds=round(time.time() - t0, 1))
            print(row(name, results[name]), f"({results[name]['seconds']} s)", flush=True)
            if a.ship and name == a.ship_variant:
                save_checkpoint(a.ship, model, label_counts=ck.get("label_counts"), epoch=epochs[keep],
                                metrics=dict(hist[epochs[keep]], aligned_from=Path(a.checkpoint).name))
    (work / "multilingual.json").write_text(json.dumps(results, indent=1))
    print("\n| variant | paper top-1 / UAR | everyday EN | everyday KO | EN gap | KO gap | epoch | selection top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(row(name, r))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
