"""Score checkpoints on a validation split through five sentence sets: the paper's eight and the old and new halves
(first and last 12 per class) of the selection phrasings, English and Korean. The measure behind the model-choice
rules in BENCHMARKS.md.

    python bench/select_score.py --data runs/lite2/data_val10_sample runs/cand/a.pth runs/cand/b.pth

One JSON line per checkpoint: val faces, paper top-1 / UAR, the five sets' top-1 and their mean (percent).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
from utils import read_csv_checked, run_cli  # noqa: E402

SELECT = ROOT / "captions" / "select.csv"


def half_banks(select: Path, folder: Path, first: int = 12) -> list[str]:
    """select.csv (label,caption,lang) -> four label,caption CSVs in `folder`: old/new halves x en/ko."""
    df = read_csv_checked(select, ("label", "caption", "lang"), hint="selection phrasings need label,caption,lang")
    order = df.groupby(["label", "lang"]).cumcount()                # position within its class and language
    out = []
    for lang in ("en", "ko"):
        for name, rows in (("old", order < first), ("new", order >= first)):
            path = folder / f"select_{name}_{lang}.csv"
            df[rows & (df["lang"] == lang)][["label", "caption"]].to_csv(path, index=False)
            out.append(str(path))
    return out


def score(checkpoint: str, data: str, sets: list[str], split: str = "val") -> dict:
    """Top-1 of each sentence set (percent) on the same face embeddings, paper UAR, and the mean."""
    res = evaluate.evaluate(checkpoint, data, split=split, prompts="paper", compare=["paper", *sets])
    cp = res["compare_prompts"]
    top = [100 * cp[s]["top1"] for s in cp]
    return dict(checkpoint=checkpoint, faces=res["n_images"], paper_top1=round(top[0], 2),
                paper_uar=round(100 * cp["paper"]["uar"], 2), sets=[round(t, 2) for t in top],
                mean=round(sum(top) / len(top), 2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--data", required=True, help="a captions.csv folder with a val split (bench/ferplus.py's)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--select", default=str(SELECT))
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sets = half_banks(Path(a.select), Path(tmp))
        for ck in a.checkpoints:
            print(json.dumps(score(ck, a.data, sets, a.split)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
