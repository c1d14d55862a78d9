"""Gradient accumulation that keeps every contrastive negative of the accumulated batch (GradCache-style).

A plain loop over micro-batches would contrast each image only with its own micro-batch. Instead:
1. embed every micro-batch without gradients (cheap, no activations kept) -> all image embeddings [B, D];
2. for each micro-batch, re-embed it WITH gradients, splice it into the cached [B, D], take the loss over the whole
   batch and backward: that yields dL/d(image tower) through exactly this micro-batch;
3. one text pass with gradients against the cached image embeddings (captions are few: distinct ones only).
The sum of these backward passes is the gradient of the full-batch loss; the temperature gets its gradient once.
RNG states are replayed so dropout masks match between the cached and the gradient pass. BatchNorm still sees
micro-batch statistics, as with any accumulation.
Under torchrun the cached embeddings of every rank are gathered (no gradients), each rank splices only its own rows
in, and distributed.sync_grads then all-reduces: the gradient of one process on the whole global accumulated batch.
"""
from __future__ import annotations

import torch

from distributed import gather_cached
from loss import Loss


def micro_slices(n: int, k: int) -> list[slice]:
    """Split n rows into k nearly equal, non-empty contiguous slices."""
    k = max(1, min(k, n))
    return [slice(i * n // k, (i + 1) * n // k) for i in range(k)]


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def accumulated_backward(model, batch: dict, k: int, autocast, backward, device: torch.device,
                         loss_fn: Loss) -> torch.Tensor:
    """Backward of the full-batch loss in k micro-batches; returns the loss (detached). `backward(loss)` applies
    the caller's scaling (GradScaler) and calls .backward(); `loss_fn` is loss.make_loss(cfg)."""
    pixels, labels = batch["pixels"], batch["labels"].to(device)
    parts = micro_slices(len(pixels), k)
    if loss_fn.rowwise:                         # a mean over rows (ce): plain accumulation is exact
        total = 0.0
        for s in parts:
            with autocast():
                out = model(pixels[s].to(device))
            loss = loss_fn(out, dict(labels=labels[s])) * (s.stop - s.start) / len(pixels)
            backward(loss)
            total += float(loss.detach())
        return torch.tensor(total)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    index, groups = batch["text_index"].to(device), batch["groups"].to(device)
    states, cached = [], []
    with torch.no_grad(), autocast():
        for s in parts:
            states.append(_rng_state(device))
            cached.append(model.encode_image(pixels[s].to(device)).float())
        txt_cached = model.encode_tokens(ids, mask).float()[index]        # [b, D]
    img_all, txt_all, groups, off = gather_cached(torch.cat(cached), txt_cached, groups)   # [B, D] x2, [B]
    targets, scale = dict(groups=groups), model.scale()
    for s, state in zip(parts, states):
        _set_rng_state(state, device)
        with autocast():
            img_k = model.encode_image(pixels[s].to(device)).float()      # [m, D], with gradients
        img = torch.cat([img_all[:off + s.start], img_k, img_all[off + s.stop:]])
        backward(loss_fn(dict(image_features=img, text_features=txt_all, logit_scale=scale.detach()), targets))
    with autocast():
        txt = model.encode_tokens(ids, mask).float()[index]              # [b, D]: text tower + temperature
    txt = torch.cat([txt_all[:off], txt, txt_all[off + len(pixels):]])
    loss = loss_fn(dict(image_features=img_all, text_features=txt, logit_scale=scale), targets)
    backward(loss)
    return loss.detach()
