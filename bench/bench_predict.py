"""predict.py against evaluate.py on one labelled folder of photos: the same answers, and predict's speed.

    python bench/bench_detect.py --write-folder /tmp/pe --n-acc 300      # photo-like scenes of FER-2013 faces
    python bench/bench_predict.py --folder /tmp/pe/photos [--checkpoint models/exprclip-ferplus.pth]

The folder is CLASS/*.jpg (any class names prepare.py knows: angry, happy, ...). predict.py reads every file as the
demo reads an upload (flip; the paper's sentence of each class, named by the folder), and each file's largest face's
top expression is compared with its folder; evaluate.py scores the same folder (--faces auto, --tta flip). Prints
top-1, UAR and the confusion matrices of both (they must be equal: the demo's answers are the ones evaluate reports),
and predict's files per second, the model load included (the per-face lines predict prints are left out).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import evaluate  # noqa: E402
import metrics  # noqa: E402
import predict  # noqa: E402
from captions import canonical_name  # noqa: E402
from served_model import BUNDLED_MODEL  # noqa: E402
from utils import run_cli  # noqa: E402


def predict_folder(checkpoint: str, folder: Path, work: Path) -> tuple[pd.DataFrame, list[str], float]:
    """(one row per file: its largest face, the class names, seconds of predict.main) for CLASS/* under folder."""
    classes = evaluate.class_order(canonical_name(d.name) for d in folder.iterdir() if d.is_dir())
    folders = {canonical_name(d.name): d.name for d in folder.iterdir() if d.is_dir()}
    bank = evaluate.get_bank("paper", None)
    vocab = work / "vocab.txt"
    vocab.write_text("".join(f"{folders[c]}: {bank[c][0]}\n" for c in classes), encoding="utf-8")
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = predict.main([str(folder), "--checkpoint", checkpoint, "--vocab", str(vocab), "--out",
                           str(work / "p.csv"), "--top", "1"])
    seconds = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"predict.py exited {rc}")
    rows = pd.read_csv(work / "p.csv", encoding="utf-8-sig")
    return rows[rows["face"] == 1].reset_index(drop=True), [folders[c] for c in classes], seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", required=True, help="CLASS/* images (bench_detect.py --write-folder DIR: DIR/photos)")
    ap.add_argument("--checkpoint", default=str(BUNDLED_MODEL))
    a = ap.parse_args(argv)
    folder = Path(a.folder)
    with tempfile.TemporaryDirectory() as tmp:
        rows, names, seconds = predict_folder(a.checkpoint, folder, Path(tmp))
    t = time.perf_counter()
    res = evaluate.evaluate(a.checkpoint, folder, tta=True)
    eval_seconds = time.perf_counter() - t
    y = np.array([names.index(Path(f).parent.name) for f in rows["file"]])
    pred = rows[names].to_numpy().argmax(1)
    conf = metrics.confusion_matrix(y, pred, len(names))
    same = np.array_equal(np.asarray(conf), np.asarray(res["confusion"]))
    print(f"{len(rows)} files in {folder} ({', '.join(names)}), checkpoint {a.checkpoint}")
    print(f"  predict.py : top-1 {np.mean(pred == y):.3f}  UAR {metrics.uar(conf):.3f}  "
          f"({(rows['how'] == 'face').sum()} with a face found)  {seconds:.1f} s, {len(rows) / seconds:.1f} files/s "
          "with the model load")
    print(f"  evaluate.py: top-1 {res['top1']:.3f}  UAR {res['uar']:.3f}  faces {res['faces']}  {eval_seconds:.1f} s")
    print(f"  confusion matrices {'equal' if same else 'DIFFER'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
