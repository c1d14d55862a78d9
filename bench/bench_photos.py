"""Photo galleries (photos.py): photos and faces indexed per second, first launch and relaunch, and query latency
with 100k face entries (FAISS).

    python bench/bench_photos.py --photos 40 [--checkpoint models/exprclip-ferplus.pth] [--fer ../shared/data/fer2013]

Generated photos: a textured, tinted background of 1-12 MP (colour, some grey), 2-4 FER-2013 test faces pasted at
1/5-1/4 of the height (synth.py drawn faces when FER-2013 is absent), nested folders, some saved rotated with an
EXIF orientation tag, a few with no face, one corrupt file and one 0-byte file. Indexing goes through
retrieval.Engine.load, as `python demo.py --gallery DIR` does; the relaunch re-encodes nothing.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cli_types import positive_int  # noqa: E402

FER = ROOT.parent / "shared" / "data" / "fer2013"
MEGAPIXELS = (1, 2, 4, 8, 12)


def face_pool(fer: Path, n: int, seed: int) -> list[Image.Image]:
    """n grey faces: FER-2013 test faces if present, else synth.py drawn faces."""
    rng = np.random.default_rng(seed)
    paths = sorted((Path(fer) / "test").glob("*/*.png")) if fer else []
    if paths:
        return [Image.open(paths[i]).convert("L") for i in rng.choice(len(paths), min(n, len(paths)), replace=False)]
    from synth import LABELS, draw_face, sample_identity, sample_params
    return [draw_face(sample_identity(i, rng), sample_params(LABELS[i % 8], rng), rng, 160).convert("L")
            for i in range(n)]


def make_photo(faces: list[Image.Image], mp: float, rng: np.random.Generator, grey: bool = False) -> Image.Image:
    """A 4:3 photo of about `mp` megapixels with the faces side by side at ~1/4.5 of the height."""
    h = int(round((mp * 1e6 * 3 / 4) ** 0.5))
    w = h * 4 // 3
    small = cv2.GaussianBlur(rng.random((90, 120)).astype(np.float32), (0, 0), 3)
    bg = cv2.resize((small - small.min()) / (np.ptp(small) + 1e-6) * 150 + 50, (w, h))
    tint = np.array([1.0, 1.0, 1.0]) if grey else rng.uniform(0.7, 1.2, 3)
    canvas = Image.fromarray(np.clip(bg[..., None] * tint, 0, 255).astype(np.uint8), "RGB")
    side = int(h / rng.uniform(4.0, 5.0))
    for k, face in enumerate(faces):
        x = int(w * (k + 0.5) / len(faces) - side / 2 + rng.integers(-side // 8, side // 8 + 1))
        y = int(h / 3 + rng.integers(-side // 4, side // 4 + 1))
        canvas.paste(face.resize((side, side), Image.BICUBIC).convert("RGB"), (x, y))
    return canvas.convert("L") if grey else canvas


def save_with_orientation(im: Image.Image, path: Path) -> None:
    """Stored rotated 90 degrees with EXIF Orientation 6 (as a phone does): upright once EXIF is applied."""
    exif = Image.Exif()
    exif[0x0112] = 6
    im.transpose(Image.ROTATE_90).save(path, quality=90, exif=exif)


def make_photos(out: Path, n: int, fer: Path | None = FER, seed: int = 0, megapixels=MEGAPIXELS,
                faces_per=(2, 4), faceless: int = 2, bad: bool = True) -> dict:
    """Write n photos (plus `faceless` without a face, and a corrupt and a 0-byte file when bad) under out/ in
    nested folders -> {"photos": n + faceless, "faces": faces pasted, "bad": 2 or 0}."""
    out, rng = Path(out), np.random.default_rng(seed)
    counts = [int(rng.integers(faces_per[0], faces_per[1] + 1)) for _ in range(n)]
    pool = face_pool(fer, sum(counts), seed)
    at = 0
    for i, c in enumerate(counts):
        im = make_photo(pool[at:at + c], megapixels[i % len(megapixels)], rng, grey=i % 5 == 4)
        at += c
        path = out / f"trip{i % 3}" / ("day2" if i % 2 else "") / f"IMG_{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_with_orientation(im, path) if i % 4 == 3 else im.save(path, quality=90)
    for j in range(faceless):
        make_photo([], megapixels[j % len(megapixels)], rng).save(out / f"landscape_{j}.jpg", quality=90)
    if bad:
        (out / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
        (out / "empty.png").write_bytes(b"")
    return dict(photos=n + faceless, faces=sum(counts), bad=2 if bad else 0)


def query_latency(n: int, dim: int, queries: int = 50, seed: int = 0) -> tuple[float, float, int]:
    """(median ms per query through FAISS, build seconds, nlist) over n random face entries."""
    from index import GalleryIndex
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        ix = GalleryIndex(Path(d), Path(d) / "ix", "bench", dim, chunk_rows=8192, faiss_threshold=min(n, 100_000))
        vecs = rng.standard_normal((n, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        rows = pd.DataFrame({"path": [f"p{i // 3:06d}.jpg#{i % 3}" for i in range(n)], "size": 1, "mtime_ns": 1})
        t0 = time.perf_counter()
        ix._start()
        ix._flush([(vecs, rows)], final=True)          # as update() writes chunks, without encoding
        ix._load()
        index = ix._faiss()
        build = time.perf_counter() - t0
        q = rng.standard_normal((queries, dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        times = []
        for row in q:
            t = time.perf_counter()
            ix.search(row, k=12)
            times.append(time.perf_counter() - t)
        return float(np.median(times) * 1000), build, index.nlist


def launch(ckpt: Path, gallery: Path, cache: Path) -> tuple[float, dict, object]:
    from retrieval import Engine
    t = time.perf_counter()
    engine = Engine.load(ckpt, gallery, "cpu", cache, progress=False)
    return time.perf_counter() - t, engine.stats, engine


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=positive_int, default=40, help="photos with faces (2 faceless, 2 bad files added)")
    ap.add_argument("--checkpoint", default=str(ROOT / "models" / "exprclip-ferplus.pth"))
    ap.add_argument("--fer", default=str(FER))
    ap.add_argument("--entries", type=int, default=100_000, help="face entries for the query-latency figure")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    import torch
    with tempfile.TemporaryDirectory() as d:
        gal, cache = Path(d) / "photos", Path(d) / "cache"
        made = make_photos(gal, a.photos, Path(a.fer), a.seed)
        src = "FER-2013 test faces" if (Path(a.fer) / "test").is_dir() else "synth.py drawn faces"
        print(f"{made['photos']} photos ({', '.join(f'{m}' for m in MEGAPIXELS)} MP in turn), {made['faces']} "
              f"{src} pasted, {made['bad']} bad files; torch threads {torch.get_num_threads()}")
        first, stats, engine = launch(Path(a.checkpoint), gal, cache)
        n_ph, n_f = stats["added"], stats["faces"]
        print(f"first launch : {first:6.1f} s  {n_ph / first:5.2f} photos/s  {n_f / first:5.2f} faces/s  "
              f"({n_ph} photos, {n_f} faces found of {made['faces']} pasted, {stats['failed']} unreadable)")
        again, stats2, _ = launch(Path(a.checkpoint), gal, cache)
        print(f"relaunch     : {again:6.2f} s  (re-encoded {stats2['added'] + stats2['changed']}, "
              f"{stats2['unchanged']} reused; includes loading the model)")
    if a.entries:
        ms, build, nlist = query_latency(a.entries, engine.model.embed_dim)
        print(f"query        : {ms:6.2f} ms median over 50 queries, {a.entries:,} face entries, FAISS IVF "
              f"nlist {nlist} (built once in {build:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
