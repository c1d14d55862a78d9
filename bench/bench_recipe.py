"""Training throughput of the shipped FER+ recipe, side by side in one process: today's path against the levers.

    python bench/bench_recipe.py --data runs/ferplus/data_sample            # FER+ as bench/ferplus.py prepares it
    python bench/bench_recipe.py --data . --steps 10 --rounds 2             # the bundled drawn sample, a smoke run

Every variant is a real train.Trainer (the recipe of bench/ferplus.py, multilingual text tower) on the same
data and the same batches: images/s of whole steps, loader included (decode, augment, collate) as train.py runs
them. Variants are timed in turns, `--rounds` times, so load on the shared cores falls on all of them alike; the
median of the rounds is printed with its range, and the ratio to `today`. Steady state: each round's batches were
seen once before (the decode cache, where on, is warm, as from a run's second epoch on).

Variants: today = PNG decode and resize every epoch, fp32, one loader worker, the frozen class sentences' features
rebuilt each step (the path before this round, as bench/ferplus.py ran it); today-w0 = the same in the training
process; cache = faces decoded once into memory; text-once = cache + the frozen class sentences' features reused
from the last step; then, each on top of text-once: fold = BatchNorm folded into the convolutions (--image-bn fold);
freeze2 = the stem and first 2 stages frozen (--freeze-image-stages 2); fold-freeze2/3 = both; bf16 = bf16 autocast (on CPUs with AMX/AVX512-BF16;
depthwise convolutions stay fp32); freeze2-dw = freeze2 + the depthwise filters frozen too (--freeze-depthwise);
freeze2-bf16, freeze2-dw-bf16 = those with bf16 autocast;
px48 = 48 px, FER's own resolution. fold, freeze and px48 change the model: their accuracy at equal epochs is an
ablation row of bench/ferplus.py, not a given.
"""
from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cli_types import choice_list, positive_int  # noqa: E402
from config import add_config_args, config_from_args  # noqa: E402
from ferplus import RECIPE  # noqa: E402
from logs import setup_logging  # noqa: E402
from precision import cpu_has_bf16  # noqa: E402
from train import Trainer  # noqa: E402
from utils import UserError, run_cli  # noqa: E402

# Each variant states every lever it differs by (so a RECIPE that turns one on does not leak into `today`).
OFF = ["--amp", "off", "--freeze-image-stages", "0", "--freeze-depthwise", "false", "--image-bn", "train"]
VARIANTS = {"today": [*OFF, "--cache-images", "false", "--num-workers", "1"],
            "today-w0": [*OFF, "--cache-images", "false"],
            "cache": [*OFF, "--cache-images", "true"],
            "text-once": [*OFF, "--cache-images", "true"],
            "bf16": [*OFF, "--cache-images", "true", "--amp", "bf16"],
            "px48": [*OFF, "--cache-images", "true", "--image-size", "48"],
            "fold": [*OFF, "--cache-images", "true", "--image-bn", "fold"],
            "freeze2": [*OFF, "--cache-images", "true", "--freeze-image-stages", "2"],
            "freeze3": [*OFF, "--cache-images", "true", "--freeze-image-stages", "3"],
            "freeze2-bf16": [*OFF, "--cache-images", "true", "--freeze-image-stages", "2", "--amp", "bf16"],
            "freeze2-dw": [*OFF, "--cache-images", "true", "--freeze-image-stages", "2", "--freeze-depthwise", "true"],
            "freeze2-dw-bf16": [*OFF, "--cache-images", "true", "--freeze-image-stages", "2", "--freeze-depthwise",
                                "true", "--amp", "bf16"],
            "fold-freeze2": [*OFF, "--cache-images", "true", "--image-bn", "fold", "--freeze-image-stages", "2"],
            "fold-freeze3": [*OFF, "--cache-images", "true", "--image-bn", "fold", "--freeze-image-stages", "3"]}

# Before this round the frozen class sentences' features were rebuilt every step from per-sentence keys; these
# variants keep that path (model.reuse_frozen_batch off) so the side-by-side baseline is the code as it was.
OLD_TEXT_PATH = ("today", "today-w0", "cache")


def trainer(recipe: list[str], data: str, variant: str, work: str) -> Trainer:
    flags = VARIANTS[variant]
    ap = argparse.ArgumentParser()
    add_config_args(ap)
    args = ap.parse_args([*recipe, "--data", data, "--out-dir", work, "--final-path", "", "--epochs", "100",
                          "--log-level", "warning", *flags])
    tr = Trainer(config_from_args(args))
    tr.model.reuse_frozen_batch = variant not in OLD_TEXT_PATH
    return tr


def timed_pass(tr: Trainer, batches: list[list[int]], epoch: int) -> float:
    """Images/s of loader + train_step over `batches` (as index lists), in epoch `epoch`'s augmentation."""
    tr.model.train()
    tr.epoch_batches.set(epoch, batches)
    n, t = 0, time.perf_counter()
    for batch in tr.train_loader:
        tr.train_step(batch)
        n += len(batch["labels"])
    return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "runs" / "ferplus" / "data_sample"))
    ap.add_argument("--steps", type=positive_int, default=20, help="batches per timed pass")
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--variants", type=choice_list(*VARIANTS), default=list(VARIANTS))
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_recipe"))
    ap.add_argument("--recipe", help="train.py flags replacing bench/ferplus.py's RECIPE (quoted)")
    a = ap.parse_args(argv)
    setup_logging("warning")
    if not (Path(a.data) / "captions.csv").is_file() and not Path(a.data).is_file():   # before any run folder
        raise UserError(f"--data {a.data}: no captions.csv there; prepare FER+ first (python bench/ferplus.py "
                        "prepares runs/ferplus/data_sample) or pass --data DIR")
    names = list(dict.fromkeys(a.variants))
    for v in [v for v in names if "bf16" in v and not cpu_has_bf16()]:
        print(f"{v}: skipped (this CPU has no AMX/AVX512-BF16; autocast would run emulated)")
        names.remove(v)
    recipe = shlex.split(a.recipe) if a.recipe else RECIPE
    trainers = {v: trainer(recipe, a.data, v, f"{a.work}/{v}") for v in names}
    batches = next(iter(trainers.values())).train_batches(0)[:a.steps]
    for tr in trainers.values():                 # warm-up: first steps, allocator, decode cache filled
        timed_pass(tr, batches, 0)
    rates = {v: [] for v in names}
    for r in range(a.rounds):
        for v, tr in trainers.items():
            rates[v].append(timed_pass(tr, batches, 1 + r))
    cpu = platform.processor() or platform.machine()
    print(f"\n{cpu}, {torch.get_num_threads()} threads, bf16 units: {cpu_has_bf16()}; {a.steps} steps x "
          f"{a.rounds} rounds, batch {trainers[names[0]].cfg.batch_size}")
    print("| path | images/s (median, range) | vs today |\n|---|---|---|")
    base = float(np.median(rates[names[0]]))
    for v in names:
        med = float(np.median(rates[v]))
        print(f"| {v} | {rate(med)} ({rate(min(rates[v]))}-{rate(max(rates[v]))}) | {med / base:.2f}x |")
    return 0


def rate(x: float) -> str:
    """Images/s for the table: whole numbers from 100 up, three significant digits below (a starved run's 0.4
    img/s prints as 0.4, not 0)."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
