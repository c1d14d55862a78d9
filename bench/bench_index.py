"""Gallery search benchmark: exact (numpy) vs the FAISS index that index.py builds, ranking only (no model).

Synthetic 256-d unit vectors shaped like face embeddings: a shared "face" direction, 8 expression directions,
300 sub-centres (identity/pose) around them, a 32-d low-rank spread and isotropic noise, so random pairs have
cosine ~0.4 and nearest neighbours ~0.8 (clusters overlap; pure uniform noise would be unrealistically hard,
well-separated clusters unrealistically easy). Stored as float16 in 4096-row blocks like the index's chunks.
Queries (text embeddings) are noisier and shifted by a fixed offset, like CLIP's image/text modality gap.
  python bench/bench_index.py --sizes 10000,100000,1000000 --nprobe 16,32,64,128
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_types import nonneg_int, positive_int, positive_int_list  # noqa: E402
from knn import build_faiss, default_nlist, default_nprobe, exact_search  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class FaceLikeVectors:
    """Generator of clustered, overlapping unit vectors (see the module docstring)."""

    def __init__(self, dim: int, n_sub: int = 300, rank: int = 32, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim, self.shared = dim, unit(rng.normal(size=dim))
        expressions = unit(rng.normal(size=(8, dim)))
        self.subs = 0.8 * expressions[rng.integers(0, 8, n_sub)] + 0.5 * unit(rng.normal(size=(n_sub, dim)))
        self.basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0].T  # [rank, dim]

    def sample(self, n: int, rng: np.random.Generator, noise: float = 0.5) -> np.ndarray:
        """float32 [n, dim] unit vectors."""
        low = rng.normal(size=(n, len(self.basis))) @ self.basis * (0.8 / np.sqrt(len(self.basis)))
        x = self.shared + self.subs[rng.integers(0, len(self.subs), n)] + low
        return unit(x + rng.normal(size=(n, self.dim)) * (noise / np.sqrt(self.dim))).astype(np.float32)


def make_gallery(n: int, gen: FaceLikeVectors, seed: int) -> np.ndarray:
    """float16 [n, dim], generated in pieces to keep memory low."""
    rng, out = np.random.default_rng(seed), np.empty((n, gen.dim), np.float16)
    for i in range(0, n, 100_000):
        out[i:i + 100_000] = gen.sample(min(100_000, n - i), rng)
    return out


def latency_ms(fn, queries: np.ndarray) -> np.ndarray:
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q[None])
        times.append((time.perf_counter() - t) * 1e3)
    return np.array(times)


def row(n: int, name: str, build, lat: np.ndarray, recall: float) -> None:
    """One table line: size, method, build seconds, p50 / p99 latency (ms), recall@10."""
    build = f"{build:>8.1f}" if isinstance(build, float) else f"{build:>8}"
    print(f"{n:>9} {name:<26} {build} {np.percentile(lat, 50):>8.2f} {np.percentile(lat, 99):>8.2f} "
          f"{recall:>9.3f}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=positive_int_list, default=[10000, 100000, 1000000], help="gallery sizes")
    ap.add_argument("--dim", type=positive_int, default=256)
    ap.add_argument("--query-noise", type=float, default=0.8, help="queries' noise (the gallery's is 0.5: queries are noisier)")
    ap.add_argument("--gap", type=float, default=1.0, help="norm of a fixed offset added to every query "
                    "(text embeddings sit apart from image embeddings: the modality gap)")
    ap.add_argument("--queries", type=positive_int, default=200)
    ap.add_argument("--exact-queries", type=nonneg_int, default=30, help="single queries timed for exact search "
                    "(0: skip exact search)")
    ap.add_argument("--nprobe", type=positive_int_list, default=[16, 32, 64, 128], help="FAISS nprobe values to try "
                    "(each capped at the index's nlist; a value capped to one already timed is not timed again)")
    ap.add_argument("--chunk-rows", type=positive_int, default=4096)
    return ap.parse_args(argv)


def nprobes(asked: list[int], nlist: int) -> list[int]:
    """The --nprobe values capped at nlist, each once, in the order asked."""
    return list(dict.fromkeys(min(p, nlist) for p in asked))


def main(argv=None) -> None:
    args = parse_args(argv)
    import faiss

    gen, rng = FaceLikeVectors(args.dim), np.random.default_rng(1)
    gap = args.gap * unit(rng.normal(size=args.dim))
    queries = unit(gen.sample(args.queries, rng, noise=args.query_noise) + gap).astype(np.float32)
    pairs = gen.sample(2000, rng)
    pair_cos = np.mean(np.sum(pairs[:1000] * pairs[1000:], 1))
    print(f"data: {args.dim}-d face-like unit vectors (random-pair cos {pair_cos:.2f}),"
          f" float16 in {args.chunk_rows}-row blocks; {args.queries} single queries (noise {args.query_noise}, "
          f"gap {args.gap}); "
          f"{os.cpu_count()} CPU threads visible, shared with other jobs; faiss threads {faiss.omp_get_max_threads()}")
    print(f"{'N':>9} {'method':<26} {'build s':>8} {'p50 ms':>8} {'p99 ms':>8} {'recall@10':>9}")
    for n in args.sizes:
        gallery = make_gallery(n, gen, seed=n)
        blocks = lambda: (gallery[i:i + args.chunk_rows] for i in range(0, n, args.chunk_rows))  # noqa: E731
        _, truth = exact_search(blocks(), queries, 10)  # all queries at once: ground truth
        t = time.perf_counter()
        dense = gallery.astype(np.float32)  # what GalleryIndex.search keeps below faiss_threshold
        exact = {"exact, f32 in RAM": (lambda q: exact_search([dense], q, 10), time.perf_counter() - t),
                 "exact, f16 chunks streamed": (lambda q: exact_search(blocks(), q, 10), 0.0)}
        for name, (fn, build) in exact.items() if args.exact_queries else ():
            row(n, name, build, latency_ms(fn, queries[:args.exact_queries]), 1.0)
        del dense
        t = time.perf_counter()
        index = build_faiss(blocks, n, args.dim)
        build = time.perf_counter() - t
        for nprobe in nprobes(args.nprobe, index.nlist):
            index.nprobe = nprobe
            _, ids = index.search(queries, 10)
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
            row(n, f"IVF{index.nlist},SQfp16 nprobe={index.nprobe}", build,
                latency_ms(lambda q: index.search(q, 10), queries), recall)
        assert index.nlist == default_nlist(n)
        with tempfile.TemporaryDirectory() as tmp:  # as GalleryIndex serves it: saved, then memory-mapped
            faiss.write_index(index, f"{tmp}/x.index")
            del index
            index = faiss.read_index(f"{tmp}/x.index", faiss.IO_FLAG_MMAP)
            index.nprobe = default_nprobe(index.nlist)
            _, ids = index.search(queries, 10)
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
            row(n, f"  default nprobe={index.nprobe}, mmap", "", latency_ms(lambda q: index.search(q, 10), queries),
                recall)
        del gallery, index


if __name__ == "__main__":
    main()
