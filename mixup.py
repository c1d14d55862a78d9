"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on a training batch whose targets are distributions.

The soft loss (`--contrast classes` / `--targets soft`) scores every face against every class sentence with a
target distribution over classes, so a mixed face simply gets the mixed distribution. Each face is mixed with its
mirror in the batch order (timm's convention: the batch reversed); CutMix's box is drawn as in timm's `rand_bbox`
and its weight corrected to the pasted area, but from torch's global generator, which train.py seeds per step, so a
resumed run mixes the same way (timm draws boxes from numpy's global state).
"""
from __future__ import annotations

import torch


def mix_batch(pixels: torch.Tensor, dist: torch.Tensor, mixup: float, cutmix: float
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """pixels [B, 3, H, W], dist [B, C] -> (mixed pixels, mixed targets, weight of the original face).

    mixup / cutmix: Beta(alpha, alpha) concentration, 0 = off; with both on, each batch uses one of them (even odds).
    The inputs are not modified."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand(()) < 0.5))
    alpha = cutmix if use_cutmix else mixup
    if alpha <= 0 or len(pixels) < 2:
        return pixels, dist, 1.0
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = pixels.flip(0)
    if use_cutmix:
        y0, y1, x0, x1 = cutmix_box(pixels.shape[-2:], lam)
        lam = 1 - (y1 - y0) * (x1 - x0) / (pixels.shape[-2] * pixels.shape[-1])
        mixed = pixels.clone()
        mixed[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
    else:
        mixed = pixels * lam + partner * (1 - lam)
    return mixed, dist * lam + dist.flip(0) * (1 - lam), lam


def cutmix_box(size: tuple[int, int], lam: float) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a box of about (1 - lam) of the area, centred anywhere, clipped to the image."""
    h, w = size
    cut = (1 - lam) ** 0.5
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = (int(torch.randint(n, ())) for n in (h, w))
    return max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
