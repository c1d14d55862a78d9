"""predict.py on videos of two people: does each face keep its person number, and does each person's overall line
read that person's expression?

    python bench/bench_video.py [--n 40] [--frames 16] [--checkpoint models/exprclip-ferplus.pth]

Each video pastes two FER-2013 PublicTest faces (`test/`) of different classes into a 640x360 textured scene, left
and right, sharpened and put through bench_detect.camera (sensor noise, JPEG) frame by frame. The left face shrinks from 190 to
100 px while the right one grows from 100 to 190, so "the largest face" changes hands halfway, and both jitter by a
few pixels. predict.predict_video reads --frames frames (the paper's sentence per class, flip), as predict.py does.

Printed: faces found; how often a person number stays on one side (sequence.track_faces) against numbering by size
(face 1, face 2 of each frame, what predict did before); and each person's overall top-1 (sequence_scores, decay 1:
the plain mean) against its face's folder, for the tracked persons and for the by-size groups.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

import evaluate  # noqa: E402
import predict  # noqa: E402
from bench_detect import FER, background, camera, fer_skip, pick_faces  # noqa: E402
from captions import canonical_name  # noqa: E402
from cli_types import positive_int  # noqa: E402
from sequence import sequence_scores  # noqa: E402

W, H = 640, 360


def write_video(a: Image.Image, b: Image.Image, path: Path, frames: int, rng: np.random.Generator) -> None:
    """Face a on the left shrinking 190 -> 100 px, face b on the right growing 100 -> 190 px (MJPG, 10 fps)."""
    back = cv2.resize(background("texture", rng), (W, H))            # [H,W]: the same room in every frame
    back = np.stack([back] * 3, axis=-1)                             # [H,W,3]
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (W, H))
    for t in np.linspace(0, 1, frames):
        canvas = Image.fromarray(back)
        for face, side, x in ((a, 190 - 90 * t, 60), (b, 100 + 90 * t, 390)):
            side = int(side)
            big = face.convert("L").resize((side, side), Image.BICUBIC).filter(ImageFilter.UnsharpMask(2, 150, 2))
            jx, jy = rng.integers(-6, 7, 2)
            canvas.paste(big.convert("RGB"), (int(x + jx), int((H - side) / 2 + jy)))
        out.write(cv2.cvtColor(np.asarray(camera(canvas, rng)), cv2.COLOR_RGB2BGR))
    out.release()


def groups(rows: list[dict], key: str) -> list[list[dict]]:
    """Rows with a face box, grouped by `key` (person: tracked; face: numbered by size within each frame)."""
    got = [r for r in rows if r["how"] == "face" and r[key] is not None]
    return [[r for r in got if r[key] == k] for k in sorted({r[key] for r in got})]


def score(group: list[dict], names: list[str], truth: dict[str, str]) -> tuple[int, int, bool]:
    """(rows on the group's main side, rows, whether its plain-mean overall top-1 is that side's class)."""
    sides = ["left" if (r["x0"] + r["x1"]) / 2 < W / 2 else "right" for r in group]
    side = max(set(sides), key=sides.count)
    overall, _ = sequence_scores([[r[n] for n in names] for r in group], 1.0)      # [C]
    return sides.count(side), len(sides), names[int(np.argmax(overall))] == truth[side]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=positive_int, default=40, help="videos")
    ap.add_argument("--frames", type=positive_int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fer", default=str(FER), help="a FER-2013 folder layout: its test/CLASS/*.png faces are used")
    ap.add_argument("--checkpoint", default=None, help="default: the bundled model")
    a = ap.parse_args(argv)
    if skip := fer_skip(Path(a.fer), ("test",)):
        print(skip)
        return 0
    from retrieval import Engine
    from served_model import choose_checkpoint
    items = pick_faces(Path(a.fer), "test", 4 * a.n, a.seed)                # sorted by class folder: shuffled to pair
    items = [items[i] for i in np.random.default_rng(a.seed).permutation(len(items))]
    pairs = [(x, y) for x, y in zip(items[::2], items[1::2]) if x[1] != y[1]][:a.n]
    if not pairs:
        print(f"skipped: no two faces of different classes under {a.fer}/test/CLASS/*.png (pass --fer DIR)")
        return 0
    classes = evaluate.class_order(canonical_name(c) for c in {c for _, c in items})
    folder = {canonical_name(c): c for _, c in items}
    bank = evaluate.get_bank("paper", None)
    names, sentences = [folder[c] for c in classes], [bank[c][0] for c in classes]
    engine = Engine.load(choose_checkpoint(a.checkpoint)[0], None, "auto", tta=True)
    rng = np.random.default_rng(a.seed)
    tally = {"person": np.zeros(4), "face": np.zeros(4)}              # same-side rows, rows, right, groups
    found = expected = 0
    with tempfile.TemporaryDirectory() as tmp:
        for k, ((pa, ca), (pb, cb)) in enumerate(pairs):
            path = Path(tmp) / f"v{k}.avi"
            write_video(Image.open(pa), Image.open(pb), path, a.frames, rng)
            rows = predict.predict_video(engine, path, names, sentences, max_frames=a.frames)
            found += sum(r["how"] == "face" for r in rows)
            expected += 2 * a.frames
            for key in tally:
                for g in groups(rows, key):
                    same, n, right = score(g, names, {"left": ca, "right": cb})
                    tally[key] += (same, n, right, 1)
    print(f"{len(pairs)} videos x {a.frames} frames, two faces each ({expected} faces): {found} face boxes")
    for key, label in (("person", "tracked persons (sequence.track_faces)"), ("face", "numbered by size")):
        same, n, right, g = tally[key]
        if not g:                                                    # no face found at all: no percentage over 0
            print(f"{label}: 0 groups (no face box found)")
            continue
        print(f"{label}: {int(g)} groups, rows on the group's own side {100 * same / n:.1f}%, "
              f"overall top-1 right {100 * right / g:.1f}% ({int(right)}/{int(g)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
