"""Each epoch's validation (train.Trainer.end_epoch): validation loss, text->image precision@10 per class (mean),
image->text top-1 against the class prototypes (or the CE baseline's logits).

    out = validate(model, batches, loss_fn, class_texts, label_vocab, cfg.objective, device, autocast)
"""
from __future__ import annotations

import numpy as np
import torch

import metrics
from embed import classifier_logits, encode_batch, text_prototypes


def class_scores(model, img: np.ndarray, class_texts: dict, label_vocab: dict,
                 objective: str) -> tuple[list[int], np.ndarray]:
    """(label ids, [N, C] scores): cosine to each class's text prototype, or the CE baseline's logits."""
    if objective == "ce":
        logits = classifier_logits(model, img)                                  # [N, K]
        return list(range(logits.shape[1])), logits
    names = sorted(class_texts, key=lambda l: label_vocab[l])
    protos = text_prototypes(model, class_texts, names)                         # [C, D]
    return [label_vocab[l] for l in names], metrics.zero_shot_scores(img, protos)


@torch.no_grad()
def validate(model, batches, loss_fn, class_texts: dict, label_vocab: dict, objective: str, device,
             autocast) -> dict:
    """batches: collated val batches (None for one whose images all failed to decode); loss_fn(batch) -> loss.
    -> dict(val_loss, val_p10, val_top1); nan where there is nothing to measure (no pairs, no labelled classes)."""
    losses, embs, labels = [], [], []
    for batch in batches:
        if batch is None:
            continue
        if len(batch["labels"]) > 1:
            losses.append(float(loss_fn(batch)))
        embs.append(encode_batch(model, batch["pixels"].to(device), autocast))          # [b, D]
        labels.append(batch["labels"])
    out = dict(val_loss=float(np.mean(losses)) if losses else float("nan"), val_p10=float("nan"),
               val_top1=float("nan"))
    if not embs or not class_texts:
        return out
    img, y = np.concatenate(embs), torch.cat(labels).numpy()
    classes, scores = class_scores(model, img, class_texts, label_vocab, objective)   # [C], [N, C]
    keep = np.isin(y, classes)
    relevant = np.asarray(classes)[:, None] == y[None, keep]                          # [C, N]
    present = relevant.any(1)
    out["val_p10"] = float(np.mean(metrics.precision_at_k(scores[keep].T[present], relevant[present], 10)))
    out["val_top1"] = metrics.topk_accuracy(scores[keep], np.searchsorted(classes, y[keep]), 1)
    return out
