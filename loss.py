"""Symmetric contrastive (CLIP) loss with multi-positive targets.

FER-style data repeats one sentence per class, so a batch holds many identical captions. Pairs that share a
group id (same caption, or same label) are positives: the target row of image i spreads its mass evenly over
every text j with group[j] == group[i], instead of pretending that j != i are negatives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def positive_targets(row_groups: torch.Tensor, col_groups: torch.Tensor) -> torch.Tensor:
    """[N] x [M] group ids -> [N, M] soft targets, each row uniform over its positives (rows sum to 1)."""
    pos = (row_groups[:, None] == col_groups[None, :]).float()  # [N, M]
    return pos / pos.sum(dim=1, keepdim=True).clamp_min(1.0)


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
