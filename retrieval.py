"""Search functions behind the demo, usable without Gradio.

    engine = Engine.load("model_final.pth", "images/")
    search_text(engine, "a wide smile", k=8)            -> [(path, cosine), ...]
    rank_expressions(engine, pil_image, sentences)      -> [(sentence, probability, cosine), ...]
    similar_images(engine, pil_image, k=8)              -> [(path, cosine), ...]
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from config import Config
from dataset import build_transform
from index import GalleryIndex, list_images, make_encoder
from model import ExprCLIP, load_checkpoint
from utils import UserError, file_digest, pick_device

MAX_QUERY_CHARS = 500


@dataclass
class Engine:
    model: ExprCLIP
    cfg: Config
    device: torch.device
    index: GalleryIndex | None
    failed: list[Path] = field(default_factory=list)     # gallery files that could not be decoded

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, gallery: str | os.PathLike | None, device: str = "auto",
             cache_root: str | os.PathLike = ".cache/gallery", progress: bool = True) -> "Engine":
        """Rebuild the model from the checkpoint alone, then embed the gallery (cached on disk, incremental)."""
        dev = pick_device(device)
        model, cfg = load_checkpoint(checkpoint, dev)
        engine = cls(model, cfg, dev, None)
        if gallery is not None:
            engine.index_gallery(gallery, file_digest(checkpoint), cache_root, progress)
        return engine

    def index_gallery(self, gallery, digest: str, cache_root, progress: bool = True) -> dict:
        """Embeddings keyed by checkpoint digest and each file's (path, size, mtime): only new/changed files are
        encoded. The cache lives under cache_root/<gallery path hash>/ so read-only galleries work too."""
        gallery = Path(gallery)
        if not gallery.is_dir():
            raise UserError(f"{gallery}: gallery folder not found (pass --gallery DIR)")
        key = hashlib.sha256(str(gallery.resolve()).encode()).hexdigest()[:12]
        self.index = GalleryIndex.open(gallery, digest, self.cfg.embed_dim, index_root=Path(cache_root) / key)
        stats = self.index.update(list_images(gallery), make_encoder(self.model, self.cfg, self.device),
                                  batch_size=64, progress=progress)
        self.failed = list(stats.get("failed_paths", []))
        return stats

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        return self.model.encode_text(texts).float().cpu().numpy()       # [n, D]

    @torch.no_grad()
    def embed_image(self, image: Image.Image) -> np.ndarray:
        """PIL image -> [D] unit vector, with the model's own eval preprocessing (gray faces -> 3 channels)."""
        im = image.convert("L").convert("RGB") if self.cfg.grayscale else image.convert("RGB")
        x = build_transform(self.cfg, train=False)(image=np.asarray(im))["image"][None].to(self.device)
        return self.model.encode_image(x)[0].float().cpu().numpy()


def clean_query(text: str | None) -> str:
    text = (text or "").strip()
    if not text:
        raise UserError("type a description of an expression first, e.g. 'a wide smile'")
    return text[:MAX_QUERY_CHARS]


def search_text(engine: Engine, query: str, k: int = 8) -> list[tuple[Path, float]]:
    """Gallery images ranked by cosine similarity to a sentence, best first."""
    q = engine.embed_text([clean_query(query)])                          # [1, D]
    return _search(engine, q, k)


def similar_images(engine: Engine, image: Image.Image, k: int = 8) -> list[tuple[Path, float]]:
    """Gallery images with the most similar expression to `image` (image embedding vs gallery)."""
    return _search(engine, engine.embed_image(image)[None], k)


def _search(engine: Engine, q: np.ndarray, k: int) -> list[tuple[Path, float]]:
    if engine.index is None or len(engine.index) == 0:
        raise UserError("the gallery is empty: put images in the gallery folder (--gallery DIR) and restart")
    scores, paths = engine.index.search(q, int(k))
    return [(p, float(s)) for p, s in zip(paths[0], scores[0])]


def rank_expressions(engine: Engine, image: Image.Image, sentences: list[str]) -> list[tuple[str, float, float]]:
    """Zero-shot: (sentence, softmax probability at the model's temperature, cosine), most likely first."""
    sentences = [s.strip() for s in sentences if s and s.strip()]
    if not sentences:
        raise UserError("the expression list is empty: add at least one description, one per line")
    cos = engine.embed_text(sentences) @ engine.embed_image(image)      # [S]
    logits = float(engine.model.scale()) * cos
    prob = np.exp(logits - logits.max())
    prob /= prob.sum()
    order = np.argsort(-cos, kind="stable")
    return [(sentences[i], float(prob[i]), float(cos[i])) for i in order]
