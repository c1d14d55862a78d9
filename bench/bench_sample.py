"""The offline quick start, measured: train on the bundled sample, then time text queries against its gallery.

    python bench/bench_sample.py                  # preset offline, as `python train.py --preset offline --data .` trains it
    python bench/bench_sample.py --queries 200

Prints: training wall time and images/s, gallery embedding time, query latency (text encoding + ranking) p50/p99,
and the labels of the top 10 faces for "a wide smile" (the quick start's promise: smiling faces first).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import train  # noqa: E402
from retrieval import Engine, search_text  # noqa: E402
from utils import run_cli  # noqa: E402

QUERIES = ["a wide smile", "An expression of disdain and superiority.", "wide-open eyes and a rounded open mouth",
           "a frown with eyebrows drawn together", "tears under the eyes", "a wrinkled nose", "a calm face"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="offline")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--work", default=None, help="output folder (default: a temporary one)")
    a = ap.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-sample-"))
    ckpt = work / "model_final.pth"
    t0 = time.perf_counter()
    train.main(["--preset", a.preset, "--data", str(ROOT), "--out-dir", str(work), "--final-path", str(ckpt)])
    train_s = time.perf_counter() - t0
    hist = pd.read_csv(work / "metrics.csv")
    t0 = time.perf_counter()
    engine = Engine.load(ckpt, ROOT / "images", "cpu", work / "cache", progress=False)
    index_s = time.perf_counter() - t0
    lat = []
    for i in range(a.queries):
        t = time.perf_counter()
        search_text(engine, f"{QUERIES[i % len(QUERIES)]} (query {i})", k=12)   # every query new: no cache hit
        lat.append((time.perf_counter() - t) * 1000)
    labels = pd.read_csv(ROOT / "captions.csv").set_index("image")["label"]
    top = [labels[p.name] for p, _ in search_text(engine, "a wide smile", k=10)]
    print(f"train ({a.preset}, {len(hist)} epochs on {ROOT / 'images'}): {train_s:.0f} s wall including model "
          f"loading, {hist['images_per_s'].median():.0f} images/s (median epoch); best val P@10 "
          f"{hist['val_p10'].max():.3f}, val top-1 {hist['val_top1'].max():.3f}")
    print(f"gallery: {len(engine.index)} images embedded in {index_s:.1f} s (model load included)")
    print(f"query latency (text encoding + ranking, {a.queries} queries, 1 CPU process): "
          f"p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms")
    print(f"'a wide smile' top 10: {', '.join(top)} -> {top.count('happiness')}/10 happiness")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
