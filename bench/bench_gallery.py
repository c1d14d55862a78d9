"""What `python demo.py` answers: precision@10 on the bundled drawn gallery for unseen sentences, per language.

    python bench/bench_gallery.py                                  # the bundled model, images/ as the gallery
    python bench/bench_gallery.py --checkpoint model_final.pth

Each sentence of the evaluation-only sets (captions/everyday.csv, captions/everyday_ko.csv; never trained on) and
the paper's eight is searched in the gallery exactly as the demo's search box does (retrieval.search_text); a hit
counts when the face's label in captions.csv is the sentence's class. Prints precision@10 per class and language,
and the worst sentence of each.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from captions import CANONICAL, load_caption_bank  # noqa: E402
from retrieval import Engine, search_text  # noqa: E402
from utils import run_cli  # noqa: E402

SETS = {"paper": "paper", "everyday EN": str(ROOT / "captions" / "everyday.csv"),
        "everyday KO": str(ROOT / "captions" / "everyday_ko.csv")}


def precision(engine: Engine, labels: dict[str, str], sentence: str, label: str, k: int) -> float:
    hits = search_text(engine, sentence, k)
    return float(np.mean([labels.get(Path(p).name) == label for p, _ in hits]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "models" / "exprclip-ferplus.pth"))
    ap.add_argument("--gallery", default=str(ROOT / "images"))
    ap.add_argument("--labels", default=str(ROOT / "captions.csv"), help="image,label of the gallery")
    ap.add_argument("--k", type=int, default=10)
    a = ap.parse_args(argv)
    table = pd.read_csv(a.labels, dtype=str, keep_default_na=False)
    labels = dict(zip(table["image"].map(lambda p: Path(p).name), table["label"]))
    with tempfile.TemporaryDirectory() as cache:
        engine = Engine.load(a.checkpoint, a.gallery, device="cpu", cache_root=cache, progress=False)
        rows = []
        for name, bank in SETS.items():
            for label, sentences in load_caption_bank(bank).items():
                for s in sentences:
                    rows.append(dict(set=name, label=label, sentence=s,
                                     p=precision(engine, labels, s, label, a.k)))
    df = pd.DataFrame(rows)
    classes = [c for c in CANONICAL if c in set(df["label"])]
    print(f"{a.checkpoint}: precision@{a.k} on {len(labels)} gallery faces\n")
    print("| sentences | " + " | ".join(classes) + " | mean |\n|---|" + "---|" * (len(classes) + 1))
    for name, g in df.groupby("set", sort=False):
        per = g.groupby("label")["p"].mean()
        print(f"| {name} | " + " | ".join(f"{per.get(c, float('nan')):.2f}" for c in classes) +
              f" | **{g['p'].mean():.2f}** |")
    print()
    for name, g in df.groupby("set", sort=False):
        w = g.loc[g["p"].idxmin()]
        print(f"worst {name}: {w['sentence']!r} ({w['label']}) {w['p']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
