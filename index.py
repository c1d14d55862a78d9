"""On-disk gallery index of image embeddings: incremental, resumable, exact or FAISS search.

Layout of <gallery>/.exprclip-index/<checkpoint digest>/:
  index.json            {"format", "checkpoint", "dim", "chunk_rows"}
  chunk-000007.npy      float16 [rows, dim] L2-normalised embeddings
  chunk-000007.csv      manifest of that chunk: path,size,mtime_ns,chunk,row for each *live* row
  faiss-<stamp>.index   IVF index over the live rows (only when len >= faiss_threshold)
Every file is written to a temp name then renamed, a chunk's .npy before its .csv, so Ctrl-C or a crash leaves all
finished chunks usable and a re-run encodes only what is missing. A path listed by two chunks (a crash while merging)
is read from the newer chunk. One writer at a time per index folder (a lock file: a second process is refused).
`build`/`search` work on photo galleries (photos.PhotoIndex: a row per face, keyed `photo#i`, face-crop files a row
each; photos.jsonl holds each photo's record and face boxes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from knn import build_faiss, default_nlist, default_nprobe, exact_search  # noqa: F401 (re-exported)
from utils import (IMAGE_EXTS, UserError, atomic_write, file_digest, folder_lock, pick_device, regular_or_broken,
                   run_cli, walk_files)

INDEX_DIRNAME = ".exprclip-index"
BUSY = ("another process is updating this index (index.py build, or a demo indexing or adding photos); wait for it "
        "to finish and run again")
COLUMNS = ["path", "size", "mtime_ns", "chunk", "row"]
Encoder = Callable[[list[Path]], tuple[np.ndarray, list[bool]]]


def list_images(folder: str | os.PathLike, exts=IMAGE_EXTS, skip: Path | None = None,
                unlisted: list[Path] | None = None) -> list[Path]:
    """Image files (or other `exts`) under folder (recursive, sorted; links to folders followed, each real folder
    once, so a loop ends; FIFOs and devices left out), skipping index folders (the default one, and `skip`: an
    --index-dir inside the gallery, whose face thumbnails are no photos). A folder that cannot be listed is named
    in one warning and appended to `unlisted` (its photos are not gone: photos.PhotoIndex keeps their entries)."""
    folder, skip = Path(folder), skip and os.path.abspath(skip)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such image folder")
    out = []
    skip = {os.path.realpath(p) for p in (folder / INDEX_DIRNAME, skip) if p}      # a link to one is skipped too
    keep = lambda root, d: d != INDEX_DIRNAME and os.path.realpath(os.path.join(root, d)) not in skip  # noqa: E731
    for root, dirs, files in walk_files(folder, keep, unlisted):
        out += [Path(root, f) for f in files if os.path.splitext(f)[1].lower() in exts and regular_or_broken(root, f)]
    return sorted(out)


class GalleryIndex:
    """Embeddings of a gallery's images for one checkpoint; `update` is incremental, `search` exact or FAISS."""

    def __init__(self, gallery: Path, folder: Path, checkpoint_digest: str, dim: int, chunk_rows: int = 4096,
                 faiss_threshold: int = 100_000, nprobe: int | None = None):
        self.gallery, self.dir, self.checkpoint, self.dim = Path(gallery), Path(folder), checkpoint_digest, dim
        self.chunk_rows, self.faiss_threshold, self.nprobe = chunk_rows, faiss_threshold, nprobe
        self._gallery_abs, self._faiss_cache = os.path.abspath(self.gallery), (None, None)
        meta = self.dir / "index.json"
        if meta.is_file():
            m = json.loads(meta.read_text())
            if m.get("checkpoint") != checkpoint_digest or m.get("dim") != dim:
                raise UserError(f"{meta}: made for checkpoint {m.get('checkpoint')} dim {m.get('dim')}, not "
                                f"{checkpoint_digest} dim {dim}; delete that folder to rebuild")
        self._load()

    @classmethod
    def open(cls, folder: str | os.PathLike, checkpoint_digest: str, dim: int,
             index_root: str | os.PathLike | None = None, **kw) -> "GalleryIndex":
        """Index of the gallery `folder`, stored in <index_root or folder/.exprclip-index>/<checkpoint_digest>/."""
        root = Path(index_root) if index_root else Path(folder) / INDEX_DIRNAME
        return cls(Path(folder), root / checkpoint_digest, checkpoint_digest, dim, **kw)

    # ---- reading -------------------------------------------------------------------------------------------
    def _load(self) -> None:
        """Read every chunk manifest; _raw keeps duplicates (to clean them), _m is one live row per path."""
        frames = [pd.read_csv(f, dtype={"path": str}, keep_default_na=False)
                  for f in sorted(self.dir.glob("chunk-*.csv")) if f.with_suffix(".npy").is_file()]
        raw = pd.concat(frames) if frames else pd.DataFrame({c: pd.Series(dtype=str if c == "path" else "int64")
                                                             for c in COLUMNS})
        self._raw = raw[COLUMNS].sort_values(["chunk", "row"]).reset_index(drop=True)
        self._m = self._raw.drop_duplicates("path", keep="last").reset_index(drop=True)  # global order = row id
        self._keys = self._m["path"].to_numpy()
        self._groups = [(int(c), g["row"].to_numpy()) for c, g in self._m.groupby("chunk", sort=True)]
        self._mmaps: dict[int, np.ndarray] = {}
        self._dense: np.ndarray | None = None  # float32 copy for exact search, only below faiss_threshold
        self._stamp: str | None = None  # identity of the live vectors, names the FAISS file

    def _chunk(self, cid: int) -> np.ndarray:
        if cid not in self._mmaps:
            self._mmaps[cid] = np.load(self.dir / f"chunk-{cid:06d}.npy", mmap_mode="r")
        return self._mmaps[cid]

    def _blocks(self) -> Iterator[np.ndarray]:
        """Live embeddings, one chunk at a time, in global row order (float16, memory-mapped)."""
        for cid, rows in self._groups:
            mm = self._chunk(cid)
            yield mm if len(rows) == len(mm) else mm[rows]

    def __len__(self) -> int:
        return len(self._m)

    @property
    def paths(self) -> list[Path]:
        """Indexed image paths in row order (the order of search ids)."""
        return [self.gallery / k for k in self._keys]

    def search(self, query: np.ndarray, k: int = 10, exact: bool = False) -> tuple[np.ndarray, list[list[Path]]]:
        """Query [q, D] or [D] (L2-normalised) -> scores [q, k'] (k' = min(k, len)) and q lists of paths, best first."""
        q = np.atleast_2d(np.asarray(query, np.float32))  # [q, D]
        if q.shape[1] != self.dim:
            raise ValueError(f"query has dim {q.shape[1]}, index has {self.dim}")
        k = min(k, len(self))
        if k == 0:
            return np.zeros((len(q), 0), np.float32), [[] for _ in q]
        if len(self) < self.faiss_threshold:  # small: float32 in RAM (<= threshold * dim * 4 bytes)
            if self._dense is None:
                self._dense = np.concatenate([np.asarray(b, np.float32) for b in self._blocks()])
            scores, ids = exact_search([self._dense], q, k)
        elif exact:  # large: stream float16 chunks from the memory maps
            scores, ids = exact_search(self._blocks(), q, k)
        else:
            scores, ids = self._faiss().search(q, k)
            miss = (ids < 0).any(1)  # too few hits in the probed lists: answer those queries exactly
            if miss.any():
                scores[miss], ids[miss] = exact_search(self._blocks(), q[miss], k)
        return scores, [[self.gallery / self._keys[i] for i in row] for row in ids]

    def vector(self, key: str) -> np.ndarray:
        """The stored float32 [D] embedding of the live row with this manifest key (KeyError if none)."""
        hit = np.flatnonzero(self._keys == key)
        if not len(hit):
            raise KeyError(key)
        row = self._m.iloc[int(hit[0])]
        return np.asarray(self._chunk(int(row["chunk"]))[int(row["row"])], np.float32)

    def _faiss(self):
        """The FAISS index of the current live rows: cached, else read from disk, else built and saved."""
        import faiss
        if self._stamp is None:  # live (chunk, row) pairs + the chunk files' size/mtime identify the vectors
            stats = [(self.dir / f"chunk-{c:06d}.npy").stat() for c, _ in self._groups]
            files = [(c, st.st_size, st.st_mtime_ns) for (c, _), st in zip(self._groups, stats)]
            live = self._m[["chunk", "row"]].to_numpy(np.int64)
            self._stamp = hashlib.sha1(live.tobytes() + repr(files).encode()).hexdigest()[:16]
        if self._faiss_cache[0] != self._stamp:
            path = self.dir / f"faiss-{self._stamp}.index"
            if not path.is_file():
                built = build_faiss(self._blocks, len(self), self.dim)
                atomic_write(path, lambda t: faiss.write_index(built, t))
                del built
                for old in self.dir.glob("faiss-*.index"):
                    if old != path:
                        old.unlink()
            self._faiss_cache = (self._stamp, faiss.read_index(str(path), faiss.IO_FLAG_MMAP))  # lists stay on disk
        index = self._faiss_cache[1]
        index.nprobe = min(self.nprobe or default_nprobe(index.nlist), index.nlist)
        return index

    # ---- writing -------------------------------------------------------------------------------------------
    def _key(self, p: Path) -> str:
        """Manifest key: path relative to the gallery (posix), or absolute when outside it."""
        p = os.path.abspath(p)
        try:
            rel = os.path.relpath(p, self._gallery_abs)
        except ValueError:  # another drive
            rel = ".."
        return Path(p if rel.startswith("..") else rel).as_posix()

    def _start(self) -> None:
        """Create the folder, write index.json, delete temp files and .npy files without a manifest."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "index.json"
        if not meta.is_file():
            info = dict(format=1, checkpoint=self.checkpoint, dim=self.dim, chunk_rows=self.chunk_rows)
            atomic_write(meta, lambda t: Path(t).write_text(json.dumps(info, indent=1)))
        for f in self.dir.glob("*.tmp"):
            f.unlink()
        for f in self.dir.glob("chunk-*.npy"):
            if not f.with_suffix(".csv").is_file():
                f.unlink()
        ids = [int(f.stem.split("-")[1]) for f in self.dir.glob("chunk-*.csv")]
        self._next_chunk = max(ids, default=0) + 1

    def _write_chunk(self, emb: np.ndarray, rows: pd.DataFrame) -> None:
        """Save emb [n, D] as a new chunk (npy first, then its manifest); rows has path,size,mtime_ns."""
        cid, self._next_chunk = self._next_chunk, self._next_chunk + 1
        rows = rows.assign(chunk=cid, row=np.arange(len(rows)))[COLUMNS]
        base = self.dir / f"chunk-{cid:06d}"

        def save_npy(t: str) -> None:
            with open(t, "wb") as f:
                np.save(f, emb.astype(np.float16))
        atomic_write(base.with_suffix(".npy"), save_npy)
        atomic_write(base.with_suffix(".csv"), lambda t: rows.to_csv(t, index=False))
        self._raw = pd.concat([self._raw, rows], ignore_index=True)

    def _drop_rows(self, mask: np.ndarray) -> None:
        """Remove the masked rows of _raw from their chunks' manifests; delete chunks left empty."""
        for cid in np.unique(self._raw["chunk"].to_numpy()[mask]):
            base = self.dir / f"chunk-{int(cid):06d}"
            keep = self._raw[(self._raw["chunk"].to_numpy() == cid) & ~mask]
            if len(keep):
                atomic_write(base.with_suffix(".csv"), lambda t: keep.to_csv(t, index=False))
            else:
                base.with_suffix(".csv").unlink(missing_ok=True)     # the cache folder may have been removed
                base.with_suffix(".npy").unlink(missing_ok=True)
        self._raw = self._raw[~mask].reset_index(drop=True)

    def _flush(self, buf: list, final: bool = False) -> None:
        """Write full chunks (and, if final, the remainder) from buf = [(emb [n, D], rows DataFrame)]."""
        while buf and (final or sum(len(r) for _, r in buf) >= self.chunk_rows):
            emb, rows = np.concatenate([e for e, _ in buf]), pd.concat([r for _, r in buf], ignore_index=True)
            n = min(len(rows), self.chunk_rows)
            self._write_chunk(emb[:n], rows.iloc[:n])
            buf[:] = [(emb[n:], rows.iloc[n:])] if n < len(rows) else []

    def _merge_sparse(self) -> None:
        """Rewrite chunks under half full (deletions, small tails of past updates) into full ones."""
        counts = self._raw.groupby("chunk").size()
        sparse = [int(c) for c, n in counts.items() if n < self.chunk_rows // 2]
        if len(sparse) < 2 and not any(counts[c] < len(self._chunk(c)) for c in sparse):
            return
        buf: list = []
        for cid in sparse:
            rows = self._raw[self._raw["chunk"] == cid]
            buf.append((np.asarray(self._chunk(cid)[rows["row"].to_numpy()], np.float32),
                        rows[["path", "size", "mtime_ns"]]))
            self._flush(buf)
        self._flush(buf, final=True)
        self._mmaps.clear()
        self._drop_rows(self._raw["chunk"].isin(sparse).to_numpy())

    def update(self, image_paths: list[Path], encode: Encoder, batch_size: int = 64, progress: bool = True) -> dict:
        """Encode new/changed images, drop deleted ones -> counts added/changed/removed/unchanged/failed
        (+ failed_paths). `encode(paths)` returns float32 [n, D] L2-normalised rows and an ok-mask. One writer per
        index across processes and threads (utils.folder_lock); another process updating it -> UserError."""
        with folder_lock(self.dir, BUSY):
            return self._update(image_paths, encode, batch_size, progress)

    def _update(self, image_paths: list[Path], encode: Encoder, batch_size: int, progress: bool) -> dict:
        self._start()
        self._mmaps.clear()  # nothing open while chunks are deleted (Windows)
        self._faiss_cache = (None, None)
        stats = dict(added=0, changed=0, removed=0, unchanged=0, failed=0, failed_paths=[])
        old = dict(zip(self._m["path"], zip(self._m["size"], self._m["mtime_ns"])))
        current = {self._key(p): Path(p) for p in image_paths}
        todo = []  # (key, path, size, mtime_ns, kind)
        for key, p in current.items():
            try:
                st = p.stat()
            except OSError:
                stats["failed"] += 1
                stats["failed_paths"].append(p)
                continue
            if old.get(key) == (st.st_size, st.st_mtime_ns):
                stats["unchanged"] += 1
            else:
                todo.append((key, p, st.st_size, st.st_mtime_ns, "changed" if key in old else "added"))
        stats["removed"] = len(set(old) - set(current))
        stale = (set(old) - set(current)) | {t[0] for t in todo if t[4] == "changed"}
        self._drop_rows((self._raw["path"].isin(stale) | self._raw.duplicated("path", keep="last")).to_numpy())
        try:
            self._encode(todo, encode, batch_size, progress, stats)
            self._merge_sparse()
        finally:
            self._load()
        if len(self) >= self.faiss_threshold:
            self._faiss()
        return stats

    def _encode(self, todo: list, encode: Encoder, batch_size: int, progress: bool, stats: dict) -> None:
        """Encode todo in batches into chunks; on Ctrl-C or an error the rows encoded so far are still saved."""
        from tqdm import tqdm
        buf: list = []
        bar = tqdm(total=len(todo), unit="img", disable=not progress or not todo)
        try:
            for i in range(0, len(todo), batch_size):
                batch = todo[i:i + batch_size]
                emb, ok = encode([t[1] for t in batch])
                ok = np.asarray(ok, bool)
                for t, o in zip(batch, ok):
                    stats[t[4] if o else "failed"] += 1
                    if not o:
                        stats["failed_paths"].append(t[1])
                if ok.any():
                    emb = np.asarray(emb, np.float32)[ok]  # [n_ok, D]
                    if emb.shape != (ok.sum(), self.dim):
                        raise ValueError(f"encoder gave {emb.shape} for {ok.sum()} images of dim {self.dim}")
                    rows = pd.DataFrame([(t[0], t[2], t[3]) for t, o in zip(batch, ok) if o],
                                        columns=["path", "size", "mtime_ns"])
                    buf.append((emb, rows))
                    self._flush(buf)
                bar.update(len(batch))
        finally:
            self._flush(buf, final=True)
            bar.close()


def make_encoder(model, preprocess, device=None, autocast=None, tta: bool = False) -> Encoder:
    """encode(paths) -> (float32 [n, D] embeddings, zero rows for undecodable files; ok-mask), over
    embed.embed_images (autocast: the checkpoint's precision unless given; tta: face and mirror averaged)."""
    from contextlib import nullcontext

    from embed import embed_images

    def encode(paths: list[Path]) -> tuple[np.ndarray, list[bool]]:
        emb, ok = embed_images(model, paths, preprocess, device, batch_size=max(1, len(paths)),
                               autocast=autocast or nullcontext, tta=tta)
        out = np.zeros((len(paths), emb.shape[1]), np.float32)   # failed rows stay zero
        out[ok] = emb
        return out, ok.tolist()
    return encode


def _open_model(args):
    """(model, preprocess, autocast, photos.PhotoIndex) for the CLI; the model is imported lazily."""
    from checkpoint import create_model_and_transforms
    from photos import PhotoIndex
    from precision import autocast_for
    from served_model import choose_checkpoint
    ckpt, why = choose_checkpoint(args.checkpoint)
    if not Path(args.images).is_dir():
        raise UserError(f"{args.images}: no such image folder")
    if not ckpt.is_file():
        raise UserError(f"{ckpt}: no such checkpoint; pass --checkpoint model_final.pth")
    print(f"checkpoint: {ckpt} ({why})", file=sys.stderr)       # stdout: the results only
    device = pick_device(args.device)
    model, _, preprocess = create_model_and_transforms(ckpt, device)
    digest = file_digest(ckpt) + ("+flip" if args.tta == "flip" else "")     # the demo's key: its cache is this
    index = GalleryIndex.open(args.images, digest, model.embed_dim, index_root=args.index_dir,
                              faiss_threshold=args.faiss_threshold)
    photos = PhotoIndex(index, getattr(args, "faces", "auto"), grayscale=model.cfg.grayscale)
    return model, preprocess, autocast_for(model.cfg, device)[0], photos


def cmd_build(args) -> int:
    from photos import failure_lines
    model, preprocess, autocast, index = _open_model(args)
    images = index.sources()
    if not images:
        raise UserError(f"{args.images}: no {'/'.join(sorted(IMAGE_EXTS))} images found")
    encode = make_encoder(model, preprocess, autocast=autocast, tta=args.tta == "flip")
    stats = index.update(images, encode, batch_size=args.batch_size)
    lines = failure_lines(stats)
    stats = {k: v for k, v in stats.items() if k not in ("failed_paths", "reasons", "photos_total", "faces_total")}
    print(f"{index.entries.dir}: {len(index)} entries indexed (faces and face-crop files) from {index.n_photos()} "
          "photos; " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    for line in lines:
        print("  " + line)
    return 0


def cmd_search(args) -> int:
    from embed import embed_texts
    from image_files import shown_path
    if not args.query.strip():
        raise UserError('--query is empty: describe an expression, e.g. --query "a wide smile"')
    model, _, autocast, index = _open_model(args)
    if len(index) == 0:
        flags = "".join(f" --{f.replace('_', '-')} {v}" for f in ("checkpoint", "index_dir", "tta")
                        if (v := getattr(args, f)) and v != "flip")
        raise UserError(f"{index.entries.dir}: no index for this checkpoint; run `python index.py build --images "
                        f"{args.images}{flags}` first")
    q = embed_texts(model, [args.query], autocast)  # [1, D]
    hits, stale = index.search_current(q, args.k, exact=args.exact)
    for rank, (p, s) in enumerate(hits, 1):                     # boxes in the file's pixels, as predict.py's
        e = index.entry(p)
        print(f"{rank:3d}  {s:+.4f}  {shown_path(e.photo)}"
              + (f"  face {e.face + 1} at {e.box}" if e.face is not None else ""))
    if stale:
        print(f"{stale} result(s) left out: moved, deleted or changed since the build; run build again", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build or search an embedding index of an image folder.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("build", "search"):
        p = sub.add_parser(name)
        p.add_argument("--images", required=True, help="gallery folder (searched recursively)")
        p.add_argument("--checkpoint", help="trained model (default: model_final.pth in the project root, else the "
                       "bundled model, as `python demo.py`)")
        p.add_argument("--device", default="auto")
        p.add_argument("--index-dir", default=None, help="where indexes live (default: IMAGES/.exprclip-index)")
        p.add_argument("--faiss-threshold", type=int, default=100_000, help="use FAISS from this many images")
        p.add_argument("--tta", choices=["flip", "none"], default="flip", help="as the demo's --tta: each face "
                       "averaged with its mirror image (build and search must agree)")
    sub.choices["build"].add_argument("--batch-size", type=int, default=64, help="face-crop files encoded at once")
    sub.choices["build"].add_argument("--faces", choices=("auto", "crops", "photos"), default="auto",
                                      help="auto: files of at most 160 px are face crops (one entry each), larger "
                                           "ones photos (one entry per face found); crops/photos force either")
    sub.choices["search"].add_argument("--query", required=True, help='a sentence, e.g. "a wide smile"')
    sub.choices["search"].add_argument("-k", type=int, default=10)
    sub.choices["search"].add_argument("--exact", action="store_true", help="exact search even above the threshold")
    args = ap.parse_args(argv)
    if min(getattr(args, "batch_size", 1), getattr(args, "k", 1)) < 1:
        raise UserError("-k must be at least 1" if args.cmd == "search" else "--batch-size must be at least 1")
    return cmd_build(args) if args.cmd == "build" else cmd_search(args)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
