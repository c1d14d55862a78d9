"""Symmetric contrastive (CLIP) loss with multi-positive and soft (vote-distribution) targets.

FER-style data repeats one sentence per class, so a batch holds many identical captions. Pairs that share a
group id (same caption, or same label) are positives: the target row of image i spreads its mass evenly over
every text j with group[j] == group[i], instead of pretending that j != i are negatives.

Soft targets generalise this to annotator votes (FER+: 6 surprise / 4 fear): image i puts mass dist[i, c] on the
texts of class c, spread evenly over the texts of that class; text j of class c is matched to the images in
proportion to their dist[:, c]. With one-hot distributions this is exactly the multi-positive loss by label.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def positive_targets(row_groups: torch.Tensor, col_groups: torch.Tensor) -> torch.Tensor:
    """[N] x [M] group ids -> [N, M] soft targets, each row uniform over its positives (rows sum to 1)."""
    pos = (row_groups[:, None] == col_groups[None, :]).float()  # [N, M]
    return pos / pos.sum(dim=1, keepdim=True).clamp_min(1.0)


def soft_targets(dist: torch.Tensor, col_class: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image rows' class distributions [N, C] and the texts' classes [M] (-1: none) -> (image->text [N, M],
    text->image [M, N]).

    image->text: dist[i, c_j] / (number of texts of class c_j), renormalised over the classes present;
    text->image: dist[i, c_j] renormalised over the images. Rows with no mass stay zero (they add no loss)."""
    known = col_class >= 0                                     # a text of no trained class (-1) is a negative only
    cls = col_class.clamp_min(0)
    counts = torch.bincount(cls[known], minlength=dist.shape[1]).clamp_min(1).to(dist.dtype)   # [C]
    w = dist[:, cls] * known                                                                     # [N, M]
    i2t = w / counts[cls]
    i2t = i2t / i2t.sum(dim=1, keepdim=True).clamp_min(1e-12)
    t2i = w.t() / w.t().sum(dim=1, keepdim=True).clamp_min(1e-12)                               # [M, N]
    return i2t, t2i


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j targets[i, j] * log_softmax(logits)[i, j]."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
              groups: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised embeddings.

    image_emb, text_emb: [B, D] (row i of each is a pair); logit_scale: scalar, already exp()'d;
    groups: [B] ids (None -> every pair distinct, the classic CLIP identity target).
    """
    if groups is None:
        groups = torch.arange(image_emb.shape[0], device=image_emb.device)
    logits = logit_scale * image_emb @ text_emb.t()  # [B, B] image -> text
    targets = positive_targets(groups, groups)        # [B, B], symmetric
    return 0.5 * (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.t(), targets))


def soft_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                   dist: torch.Tensor, text_class: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with distribution targets.

    image_emb [N, D], text_emb [M, D] (unit vectors); dist [N, C] each image's class distribution (votes, or one-hot);
    text_class [M] the class of each text (the batch's captions, or every class sentence). Text rows whose class has
    no mass in the batch are left out of the text->image mean."""
    logits = logit_scale * image_emb @ text_emb.t()  # [N, M]
    i2t, t2i = soft_targets(dist, text_class)
    keep = t2i.sum(dim=1) > 0                          # [M]
    t2i_loss = soft_cross_entropy(logits.t()[keep], t2i[keep]) if keep.any() else logits.sum() * 0
    return 0.5 * (soft_cross_entropy(logits, i2t) + t2i_loss)


@dataclass(frozen=True)
class Loss:
    """A training loss over the model's outputs by name (ExprCLIP.forward) and the batch's targets."""
    fn: Callable[[dict, dict], torch.Tensor]
    rowwise: bool     # a mean over rows: micro-batches accumulate exactly and ranks average their gradients

    def __call__(self, out: dict, targets: dict) -> torch.Tensor:
        return self.fn(out, targets)


def make_loss(cfg) -> Loss:
    """The loss a config trains with: ce (classifier baseline), soft (vote distributions / every class sentence)
    or the multi-positive CLIP loss over group ids."""
    if cfg.objective == "ce":
        return Loss(lambda o, t: F.cross_entropy(o["logits"].float(), t["labels"]), rowwise=True)
    if cfg.targets == "soft" or cfg.contrast == "classes":
        return Loss(lambda o, t: soft_clip_loss(o["image_features"].float(), o["text_features"].float(),
                                                o["logit_scale"].float(), t["dist"], t["text_class"]), rowwise=False)
    return Loss(lambda o, t: clip_loss(o["image_features"].float(), o["text_features"].float(),
                                       o["logit_scale"].float(), t["groups"]), rowwise=False)
