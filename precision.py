"""Mixed precision in one place: which autocast dtype a config gets on a device, and the matching GradScaler.

auto: CUDA bf16 (fp16 + GradScaler where bf16 is missing); CPU bf16 only where the CPU has native bf16 matrix units
(AMX or AVX512-BF16), else fp32. Used by train.py, and at inference (autocast_for) by evaluate.py, the demo, the
gallery index and the benches.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import torch

from config import Config


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units on this CPU (AMX or AVX512-BF16): autocast to bf16 is then several times faster."""
    cpu = getattr(torch, "cpu", None)
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this config and device, or None for fp32."""
    if cfg.amp == "off" or device.type not in ("cuda", "cpu"):
        return None
    if cfg.amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else None
    return torch.bfloat16 if cfg.amp == "bf16" else torch.float16


def amp_setup(cfg: Config, device: torch.device):
    """(autocast context factory, GradScaler or None): fp16 gets a scaler, bf16 and fp32 do not."""
    dtype = amp_dtype(cfg, device)
    if dtype is None:
        return nullcontext, None
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def autocast_for(cfg: Config, device: torch.device, amp: str | None = None):
    """Inference: (autocast context factory, dtype or None) from the checkpoint's amp setting, or `amp` when given.
    fp16 on a CPU runs in fp32 (slow there, no benefit)."""
    amp = amp or (cfg.amp if cfg.amp in ("auto", "bf16", "fp16", "off") else "auto")   # old checkpoints: amp=True
    dtype = amp_dtype(replace(cfg, amp=amp), device)
    if device.type == "cpu" and dtype == torch.float16:
        dtype = None
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else nullcontext, dtype
