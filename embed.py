"""Images and class sentences to embeddings, one way for every caller: evaluate.py, index.py (the gallery cache),
retrieval.py (the demo), train.py's validation scoring and the benches.

    model, _, preprocess = create_model_and_transforms("model_final.pth")     # checkpoint.py
    emb, ok = embed_images(model, paths_or_pil_images, preprocess)          # [n_ok, D] unit vectors, [N] decoded
    protos = text_prototypes(model, {"happiness": ["a wide smile", ...]}, ["happiness", ...])   # [C, D]
    scores = emb @ protos.T                                                  # [n_ok, C] cosine = zero-shot scores
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

import metrics
from transform import BadImage
from utils import UserError


def _decode(preprocess, image) -> torch.Tensor | None:
    try:
        return preprocess(image)                                   # [3, H, W]
    except (BadImage, OSError):
        return None


@torch.inference_mode()
def embed_images(model, images: list, preprocess, device=None, batch_size: int = 64, autocast=nullcontext,
                 tta=False) -> tuple[np.ndarray, np.ndarray]:
    """Paths or PIL images -> (float32 [n_ok, D] unit vectors of the decodable ones, in order; bool [N] decoded).

    Batches stream through a thread pool: the next batch decodes while one encodes (at most two in memory).
    autocast: a context factory (precision.autocast_for). tta: each face and its mirror image are encoded in one
    forward pass and their embeddings averaged (test-time augmentation); or a views function (see encode_batch)."""
    device = device if device is not None else next(model.parameters()).device
    chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    embs, ok = [np.zeros((0, model.embed_dim), np.float32)], []
    decode = partial(_decode, preprocess)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        pending = pool.map(decode, chunks[0]) if chunks else iter(())
        for k in range(len(chunks)):
            tensors = list(pending)
            if k + 1 < len(chunks):
                pending = pool.map(decode, chunks[k + 1])                 # prefetch
            good = [t for t in tensors if t is not None]
            ok += [t is not None for t in tensors]
            if good:
                embs.append(encode_batch(model, torch.stack(good).to(device), autocast, tta))
    return np.concatenate(embs), np.asarray(ok, bool)


@torch.inference_mode()
def encode_batch(model, x: torch.Tensor, autocast=nullcontext, tta=False) -> np.ndarray:
    """A preprocessed batch [b, 3, H, W] on the model's device -> float32 [b, D] unit vectors. tta: True averages
    face and mirror; a function x -> [view, ...] (bench/bench_tta.py's crop views) averages those views.
    embed_images and train.py's validation both encode through here."""
    xs = tta(x) if callable(tta) else [x, x.flip(3)] if tta else [x]
    with autocast():
        e = model.encode_image(torch.cat(xs)).float()                              # [V*b, D]
    # normalised again in fp32: under bf16 autocast the model's own unit vectors have norms 0.997-1.001
    return F.normalize(e.view(len(xs), len(x), -1).sum(0), dim=-1).cpu().numpy()  # [b, D]


@torch.inference_mode()
def embed_texts(model, texts: list[str], autocast=nullcontext, batch_size: int = 256) -> np.ndarray:
    """Sentences -> float32 [n, D] unit vectors; each is cut to the text tower's max_length tokens."""
    out = [np.zeros((0, model.embed_dim), np.float32)]
    for i in range(0, len(texts), batch_size):
        with autocast():
            e = model.encode_text(texts[i:i + batch_size]).float()                 # [b, D]
        out.append(F.normalize(e, dim=-1).cpu().numpy())                           # fp32 unit vectors (bf16 drifts)
    return np.concatenate(out)


def text_prototypes(model, bank: dict[str, list[str]], classes: list[str], autocast=nullcontext) -> np.ndarray:
    """Zero-shot class scoring's one helper: each class's sentences encoded, averaged and re-normalised (prompt
    ensembling) -> [C, D]; image embeddings @ prototypes.T are the per-class scores."""
    missing = [c for c in classes if not bank.get(c)]
    if missing:
        raise UserError(f"the prompt bank has no sentence for class(es) {', '.join(map(str, missing))} (it has: "
                        f"{', '.join(map(str, bank))}); pass --prompts with a CSV label,caption that covers them")
    emb = embed_texts(model, [t for c in classes for t in bank[c]], autocast)          # [M, D]
    return metrics.class_prototypes(emb, [c for c in classes for _ in bank[c]], classes)[1]


@torch.inference_mode()
def classifier_logits(model, emb: np.ndarray) -> np.ndarray:
    """The CE baseline's class logits over image embeddings: [N, D] -> [N, K] (K = model.class_names)."""
    weight = model.classifier.weight
    return model.classifier(torch.from_numpy(emb).to(weight.device, weight.dtype)).float().cpu().numpy()
