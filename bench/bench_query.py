"""Query latency of the text side: one new sentence (never cached) -> its embedding, per text tower.

    python bench/bench_query.py                               # the bundled model and the packaged towers
    python bench/bench_query.py --checkpoint model_final.pth --n 100

Times `model.encode_text([query])` for --n distinct English and Korean queries, one at a time as the demo sends
them, after a few untimed warm-up calls, and prints the median and 95th percentile in milliseconds. Each row's
sentences (warm-up ones too) carry the row's own numbers, so a tower's in-process sentence cache, shared by the rows
that use the same tower, never answers a timed call (single queries never touch the disk cache). Ranking the
600-face gallery (or 100k faces with FAISS, bench/bench_index.py) is added on top of this.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from checkpoint import load_checkpoint  # noqa: E402
from cli_types import positive_int  # noqa: E402
from config import make_config  # noqa: E402
from model import ExprCLIP  # noqa: E402
from utils import run_cli  # noqa: E402

EN = ["a wide smile number {}", "someone frowning at item {}", "a face shocked by letter {}"]
KO = ["{}번째 사진 속 활짝 웃는 얼굴", "{}번 화난 표정", "{}번째 깜짝 놀란 사람"]


def queries(templates: list[str], n: int, row: int) -> list[str]:
    """n distinct sentences for table row `row` (numbers row*n .. row*n+n-1: no two rows share one)."""
    return [templates[i % len(templates)].format(row * n + i) for i in range(n)]


def latency_ms(model, sentences: list[str], warmup: list[str]) -> tuple[float, float]:
    """(median, p95) ms of encode_text on each query alone, after encoding each `warmup` sentence alone."""
    times = []
    with torch.inference_mode():
        for w in warmup:                  # the first calls load and warm the tower: not timed
            model.encode_text([w])
        for q in sentences:
            t = time.perf_counter()
            model.encode_text([q])
            times.append(1000 * (time.perf_counter() - t))
    return float(np.median(times)), float(np.percentile(times, 95))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", action="append", help="a model to time (repeatable); default: the bundled one")
    ap.add_argument("--n", type=positive_int, default=60, help="distinct queries per language")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    models = {Path(p).name: load_checkpoint(p)[0] for p in a.checkpoint or [ROOT / "models" / "exprclip-ferplus.pth"]}
    for tower in ("pkg:all-minilm-l6-v2", "pkg:multilingual-e5-small", "pkg:multilingual-use"):
        frozen = dict(text_model=tower, freeze_text=True, text_weights="pretrained", text_pooling="mean")
        models[tower] = ExprCLIP(make_config(frozen, preset="offline"), load_weights=False).eval()
    print("| model / text tower | English: median / p95 ms | Korean: median / p95 ms |")
    print("|---|---|---|")
    for row, (name, model) in enumerate(models.items()):
        cells = [latency_ms(model, queries(ts, a.n, row), queries(ts, 4, -1 - row))   # warm-up: negative numbers
                 for ts in (EN, KO)]
        print(f"| {name} | " + " | ".join(f"{m:.1f} / {p:.1f}" for m, p in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
