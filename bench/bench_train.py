"""Training-step throughput: distinct-caption text encoding vs encoding every caption (issue: cheaper steps).

    python bench/bench_train.py                      # paper config: resnet50 @ 224, DistilBERT-sized text, batch 32
    python bench/bench_train.py --image-size 64 --steps 5 --device cuda

FER-style captions: one of the eight paper sentences per image, so a batch of 32 holds at most 8 distinct ones.
Random-init weights (speed does not depend on them); the DistilBERT-sized tower is built from DistilBertConfig()
with the uncased WordPiece vocabulary of the packaged MiniLM (or --tokenizer DIR). Prints images/s, the ratio,
and the ceiling: the same step with the text tower costing nothing (its embeddings computed outside the timing).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from captions import load_caption_bank  # noqa: E402
from cli_types import nonneg_int, positive_int  # noqa: E402
from config import make_config  # noqa: E402
from loss import clip_loss  # noqa: E402
from model import ExprCLIP, resolve_source  # noqa: E402
from precision import amp_dtype, amp_setup  # noqa: E402
from train import param_groups  # noqa: E402


def distilbert_folder(tokenizer_dir: str, dest: Path) -> str:
    """dest, filled with DistilBERT's default config and an uncased WordPiece tokenizer (no download)."""
    import transformers
    d = str(dest)
    transformers.DistilBertConfig().save_pretrained(d)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(d)
    return d


def time_steps(model, cfg, device, batch, mode: str, steps: int, warmup: int, fused: bool = False) -> float:
    """Images/s of full optimizer steps (forward, loss, backward, AdamW).

    mode: every (each pair's caption encoded), distinct (each distinct caption once, scattered), or free (text
    embeddings computed once outside the timed loop: the step as if the text tower cost nothing -- the ceiling
    that any text-side saving can reach)."""
    opt = torch.optim.AdamW(param_groups(model, cfg), fused=fused or None)
    autocast, scaler = amp_setup(cfg, device)
    pixels, caps, groups = batch
    uniq = list(dict.fromkeys(caps)) if mode != "every" else caps
    tok = model.tokenize(uniq)
    index = torch.tensor([uniq.index(c) for c in caps]).to(device) if mode != "every" else None
    ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    if mode == "free":
        with torch.no_grad(), autocast():
            fixed = model.encode_tokens(ids, mask)[index].float()                   # [B,D], no text graph
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with autocast():
            if mode == "free":
                img, txt, s = model.encode_image(pixels), fixed, model.scale()
            else:
                out = model(pixels, ids, mask, index)
                img, txt, s = out["image_features"], out["text_features"], out["logit_scale"]
            loss = clip_loss(img.float(), txt.float(), s.float(), groups)
        opt.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        scaler.step(opt) if scaler else opt.step()
        if scaler:
            scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * len(caps) / (time.perf_counter() - t0)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-model", default="resnet50")
    ap.add_argument("--image-size", type=positive_int, default=224)
    ap.add_argument("--batch-size", type=positive_int, default=32)
    ap.add_argument("--steps", type=positive_int, default=3, help="timed steps per mode")
    ap.add_argument("--warmup", type=nonneg_int, default=1, help="untimed steps before them")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokenizer", default="pkg:all-minilm-l6-v2", help="folder with an uncased WordPiece tokenizer")
    ap.add_argument("--max-length", type=positive_int, default=64)
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    ap.add_argument("--fused", action="store_true", help="fused AdamW kernel (torch >= 2.4 on CPU and CUDA)")
    ap.add_argument("--vs-plain", action="store_true",
                    help="also time the plain step of the simple CLIP tutorials: fp32, NCHW, every caption encoded")
    return ap.parse_args(argv)


def build_model(a: argparse.Namespace, device: torch.device):
    """(cfg, model): random-init image tower and DistilBERT-sized text tower, built from a temporary folder that
    is removed once the model holds its tokenizer and weights."""
    with tempfile.TemporaryDirectory(prefix="distilbert-") as tmp:
        cfg = make_config(dict(image_model=a.image_model, image_weights="none", image_size=a.image_size,
                               text_model=distilbert_folder(resolve_source(a.tokenizer), Path(tmp)),
                               text_weights="none", batch_size=a.batch_size, max_length=a.max_length,
                               device=a.device, amp=a.amp))
        return cfg, ExprCLIP(cfg).to(device)


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(a.device)
    cfg, model = build_model(a, device)
    dtype = amp_dtype(cfg, device)
    if dtype is not None:
        model = model.to(memory_format=torch.channels_last)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, a.batch_size)
    sentences = [v[0] for v in load_caption_bank("paper").values()]
    caps = [sentences[i] for i in labels]
    pixels = torch.randn(a.batch_size, 3, a.image_size, a.image_size, device=device)
    if dtype is not None:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    batch = (pixels, caps, torch.tensor(labels, device=device))
    best = dict.fromkeys(("every", "distinct", "free"), 0.0)
    for _ in range(2):   # interleaved, best of two: warm-up and clock drift do not favour any mode
        for mode in best:
            best[mode] = max(best[mode], time_steps(model, cfg, device, batch, mode, a.steps, a.warmup, a.fused))
    every, distinct, free = best["every"], best["distinct"], best["free"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {name}; {a.image_model} @ {a.image_size}px + DistilBERT-sized text (66M), batch {a.batch_size}, "
          f"{len(set(caps))} distinct captions, autocast {dtype}, AdamW {'fused' if a.fused else 'default'}")
    print(f"every caption encoded : {every:8.1f} images/s")
    print(f"distinct captions only: {distinct:8.1f} images/s")
    print(f"speed-up              : {distinct / every:8.2f}x")
    print(f"text tower free       : {free:8.1f} images/s  (ceiling of any text saving: {free / every:.2f}x; "
          f"text tower = {1 - every / free:.0%} of an every-caption step)")
    if device.type == "cuda":
        print(f"peak GPU memory       : {torch.cuda.max_memory_allocated() / 2**30:8.2f} GiB allocated "
              f"({torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved)")
    if a.vs_plain:
        model = model.to(memory_format=torch.contiguous_format)
        plain_batch = (pixels.contiguous(), caps, batch[2])
        plain = max(time_steps(model, replace(cfg, amp="off"), device, plain_batch, "every", a.steps, a.warmup)
                    for _ in range(2))
        print(f"plain fp32 NCHW step  : {plain:8.1f} images/s  (every caption; the distinct-caption step above is "
              f"{distinct / plain:.2f}x faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
