"""k-nearest-neighbour search over L2-normalised embeddings: exact (streamed blocks) and FAISS IVF (fp16 codes).
Used by index.GalleryIndex and bench/bench_index.py."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np


def exact_search(blocks: Iterable[np.ndarray], query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of query [q, D] over row blocks streamed in order -> (scores, ids), each [q, k]."""
    best_s, best_i, offset = np.zeros((len(query), 0), np.float32), np.zeros((len(query), 0), np.int64), 0
    for block in blocks:
        s = query @ np.asarray(block, np.float32).T  # [q, b]
        ids = np.broadcast_to(np.arange(len(block)), s.shape)
        if s.shape[1] > k:  # keep this block's top k, then merge with the best so far
            ids = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s = np.take_along_axis(s, ids, 1)
        best_s, best_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, ids + offset], 1)  # [q, <= 2k]
        if best_s.shape[1] > k:
            top = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(best_s, top, 1), np.take_along_axis(best_i, top, 1)
        offset += len(block)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def default_nlist(n: int) -> int:
    """IVF list count: the power of two nearest sqrt(n), with at least 39 training points per list."""
    return int(max(1, min(2 ** round(math.log2(max(n, 1)) / 2), n // 39)))


def default_nprobe(nlist: int) -> int:
    """IVF lists probed per query: 1/16 of them, at least 32 (bench/bench_index.py: recall@10 >= 0.99 at 1M)."""
    return min(nlist, max(32, nlist // 16))


def build_faiss(blocks: Callable[[], Iterable[np.ndarray]], n: int, dim: int, nlist: int | None = None):
    """IVF inner-product index with fp16 codes over n rows; blocks() is streamed twice (train sample, then add)."""
    import faiss
    nlist = nlist or default_nlist(n)
    index = faiss.index_factory(dim, f"IVF{nlist},SQfp16", faiss.METRIC_INNER_PRODUCT)
    take = np.sort(np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False))  # training rows
    sample, offset = [], 0
    for b in blocks():
        sample.append(np.asarray(b[take[(take >= offset) & (take < offset + len(b))] - offset], np.float32))
        offset += len(b)
    index.train(np.concatenate(sample))
    for b in blocks():
        index.add(np.ascontiguousarray(b, dtype=np.float32))
    return index
