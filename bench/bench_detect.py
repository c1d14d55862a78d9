"""Face detection benchmark: MTCNN vs Haar on real faces, latency on big photos, and what alignment buys a model.

    python bench/bench_detect.py                          # recall/false boxes on 200 PublicTest faces + latency
    python bench/bench_detect.py --checkpoint model_final.pth --n-acc 500   # + accuracy: aligned crops vs 48x48
    python bench/bench_detect.py --checkpoint M --acc-data runs/ferplus/data_sample --n-acc 852  # on the val split
    python bench/bench_detect.py --checkpoint M --n 0 --photo --source-sides 0,48   # photo-like scenes, 2 sides
    python bench/bench_detect.py --checkpoint M --n 0 --photo --roll 25   # tilted heads: what alignment buys
    python bench/bench_detect.py --write-folder /tmp/pe --n-acc 300   # photos + crops folders for evaluate.py
    python bench/bench_detect.py --tune                   # MIN_PROB choice on train faces (validation, not test)
    python bench/bench_detect.py --template               # FER_TEMPLATE: median landmarks of train faces

Scenes: each FER-2013 face (48x48, seeded choice over all classes) is upscaled (bicubic) to a side drawn from
96-192 px and pasted at a random place on a 480x360 background: flat grey (`grey`) or blurred noise (`texture`).
A face is found when a box's centre lies within a quarter side of the face's centre and its larger side is 0.5-2x
the face's (FER crops are tight: a box may reach past the chin); every other box is false. Skips (exit 0) when
../shared/data/fer2013 is absent.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

import faces  # noqa: E402
from cli_types import choice_list, int_list, nonneg_int, positive_int  # noqa: E402,F401  (bench_detect.int_list)
from faces import Box, annotate, detect_faces, faces_or_whole  # noqa: E402
from checkpoint import load_checkpoint  # noqa: E402
from image_files import safe_open_image  # noqa: E402
from utils import UserError, run_cli  # noqa: E402

FER = ROOT.parent / "shared" / "data" / "fer2013"
CANVAS = (480, 360)


def fer_skip(fer: Path, splits: tuple[str, ...] = ("train", "test")) -> str | None:
    """The one skip line when the FER-2013 folder layout lacks one of `splits`, else None."""
    if all((fer / s).is_dir() for s in splits):
        return None
    return f"skipped: FER-2013 not found at {fer} (expected {' and '.join(s + '/' for s in splits)}; pass --fer DIR)"


def pick_faces(fer: Path, split: str, n: int, seed: int) -> list[tuple[Path, str]]:
    """n (path, class) pairs drawn without replacement from fer/split/CLASS/*.png, seeded."""
    paths = sorted((fer / split).glob("*/*.png"))
    idx = np.random.default_rng(seed).choice(len(paths), size=min(n, len(paths)), replace=False)
    return [(paths[i], paths[i].parent.name) for i in sorted(idx)]


def labelled_split(data: Path, split: str, n: int, seed: int) -> list[tuple[Path, str]]:
    """n (path, label) pairs of one split of a captions.csv folder (e.g. the FER+ validation carve-out), seeded."""
    import evaluate
    try:
        table, _ = evaluate.read_data(str(data))
    except UserError as e:
        raise UserError(f"--acc-data {e}") from None
    rows = table[((table["split"] == split) | (split == "all")) & (table["label"] != "")]
    if rows.empty:
        raise UserError(f"{data}: no labelled `{split}` rows (--acc-split train, val, test or all)")
    idx = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
    return [(Path(rows["path"].iloc[i]), rows["label"].iloc[i]) for i in sorted(idx)]


def background(kind: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H,W]: flat grey or blurred noise stretched to 40-220 (edges and blobs, no faces)."""
    W, H = CANVAS
    if kind == "grey":
        return np.full((H, W), 128, np.uint8)
    a = cv2.GaussianBlur(rng.random((H, W)).astype(np.float32), (0, 0), 6)
    a = (a - a.min()) / (np.ptp(a) + 1e-6) * 180 + 40
    return np.clip(a + rng.normal(0, 6, a.shape), 0, 255).astype(np.uint8)


def camera(scene: Image.Image, rng: np.random.Generator) -> Image.Image:
    """What a phone adds at the photo's own resolution: sensor noise (sigma 6 of 255), then JPEG at quality 80."""
    a = np.asarray(scene, np.float32) + rng.normal(0, 6, (scene.height, scene.width, 1))
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=80)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def make_scene(face: Image.Image, kind: str, rng: np.random.Generator, photo: bool = False,
               roll: float = 0.0) -> tuple[Image.Image, tuple[int, int, int]]:
    """(RGB scene, (x, y, side) of the pasted face). photo: the face sharpened at its pasted size (detail finer than
    FER's 48 px, as a real photo has) and the scene put through camera(). roll: the face turned in the image plane by
    up to this many degrees either way (a tilted head), corners filled grey."""
    side = int(rng.integers(96, 193))
    x, y = int(rng.integers(0, CANVAS[0] - side + 1)), int(rng.integers(0, CANVAS[1] - side + 1))
    canvas = Image.fromarray(background(kind, rng))
    big = face.convert("L").resize((side, side), Image.BICUBIC)
    if roll:
        big = big.rotate(float(rng.uniform(-roll, roll)), Image.BICUBIC, fillcolor=128)
    canvas.paste(big.filter(ImageFilter.UnsharpMask(2, 150, 2)) if photo else big, (x, y))
    return (camera(canvas.convert("RGB"), rng) if photo else canvas.convert("RGB")), (x, y, side)


def matches(box: Box, truth: tuple[int, int, int]) -> bool:
    x, y, side = truth
    cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    near = abs(cx - x - side / 2) <= side / 4 and abs(cy - y - side / 2) <= side / 4
    return near and 0.5 * side <= max(box.w, box.h) <= 2.0 * side


def scenes(items, kind: str, seed: int, photo: bool = False,
           roll: float = 0.0) -> list[tuple[Image.Image, tuple[int, int, int]]]:
    rng = np.random.default_rng(seed)
    return [make_scene(Image.open(p), kind, rng, photo, roll) for p, _ in items]


def recall_false(sc, detector: str) -> tuple[int, int, list[list[Box]]]:
    """(faces found, false boxes, boxes per scene) over scenes `sc`."""
    found, false, all_boxes = 0, 0, []
    for image, truth in sc:
        boxes = detect_faces(image, detector=detector)
        hit = [matches(b, truth) for b in boxes]
        found += any(hit)
        false += len(hit) - sum(hit)
        all_boxes.append(boxes)
    return found, false, all_boxes


def tune(sc) -> None:
    """Recall / false boxes of MTCNN at each probability threshold (boxes below it dropped)."""
    faces.MIN_PROB = 0.0
    _, _, per_scene = recall_false(sc, "mtcnn")
    for t in (0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995):
        found = sum(any(matches(b, tr) and b.score >= t for b in bs) for bs, (_, tr) in zip(per_scene, sc))
        false = sum(not matches(b, tr) and b.score >= t for bs, (_, tr) in zip(per_scene, sc) for b in bs)
        print(f"  MIN_PROB {t:<6} found {found}/{len(sc)}  false {false}")


def template(items) -> None:
    """Median MTCNN landmarks of FER faces in the unit square (face upscaled to 192 px on a replicated border)."""
    pts = []
    for p, _ in items:
        a = cv2.copyMakeBorder(np.asarray(Image.open(p).convert("L").resize((192, 192), Image.BICUBIC)),
                               48, 48, 48, 48, cv2.BORDER_REPLICATE)
        boxes = [b for b in detect_faces(Image.fromarray(a), detector="mtcnn") if b.score >= 0.95]
        if boxes:
            pts.append((np.array(boxes[0].landmarks) - 48) / 192)
    med = np.median(np.array(pts), 0)                                 # [5,2]
    print(f"  {len(pts)}/{len(items)} faces; median landmarks (x, y): {np.round(med, 3).tolist()}")


def photo(side_w: int, side_h: int, items, seed: int = 0) -> Image.Image:
    """A big RGB 'photo': textured background with 4 faces of ~1/6 of the height."""
    rng = np.random.default_rng(seed)
    bg = cv2.resize(background("texture", rng), (side_w, side_h), interpolation=cv2.INTER_LINEAR)
    canvas, s = Image.fromarray(bg), side_h // 6
    for k, (p, _) in enumerate(items[:4]):
        canvas.paste(Image.open(p).convert("L").resize((s, s), Image.BICUBIC), (s // 2 + k * side_w // 4, side_h // 3))
    return canvas.convert("RGB")


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """(median wall s, median CPU s of this process, last result) over `repeat` calls."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return float(np.median(walls)), float(np.median(cpus)), out


def latency(items, repeat: int) -> None:
    big = photo(4000, 3000, items)
    for det in ("haar", "mtcnn"):
        wall, cpu, boxes = timed(lambda: detect_faces(big, detector=det), repeat)
        print(f"  12 MP (4000x3000) detect_faces {det:5s}: {wall:.3f} s wall, {cpu:.3f} s CPU, {len(boxes)} faces")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "36mp.jpg"
        photo(7360, 4912, items).save(path, quality=90)
        for max_side in (None, faces.DECODE_SIDE):
            def answer():
                im = safe_open_image(path, max_side=max_side)
                crops, boxes, found = faces_or_whole(im, max_faces=6)
                buf = io.BytesIO()
                annotate(im, boxes if found else []).save(buf, "PNG")
                return im.size, len(boxes), buf.tell()
            wall, cpu, (size, n, nbytes) = timed(answer, max(repeat // 2, 1))
            how = "full decode" if max_side is None else f"JPEG draft (max_side {max_side})"
            print(f"  36 MP JPEG end to end, {how}: {wall:.2f} s wall, {cpu:.2f} s CPU; decoded {size[0]}x{size[1]},"
                  f" {n} faces, annotated PNG {nbytes / 1e3:.0f} kB")


@contextmanager
def retry_pad(pad: float):
    """faces.MTCNN_RETRY_PAD set to `pad` inside the block (0: MTCNN's single search, as before the retry)."""
    old, faces.MTCNN_RETRY_PAD = faces.MTCNN_RETRY_PAD, pad
    try:
        yield
    finally:
        faces.MTCNN_RETRY_PAD = old


def write_folder(items, out: Path, seed: int, photo: bool = True) -> None:
    """The faces as a labelled folder of photos (out/photos/CLASS/*.jpg: each face in a textured scene, photo-like)
    and of the originals (out/crops/CLASS/*.png), to score with `evaluate.py --data out/photos` (--faces)."""
    rng = np.random.default_rng(seed)
    for path, cls in items:
        scene, _ = make_scene(Image.open(path), "texture", rng, photo)
        for sub, im, name in (("photos", scene, path.stem + ".jpg"), ("crops", Image.open(path), path.name)):
            (out / sub / cls).mkdir(parents=True, exist_ok=True)
            im.save(out / sub / cls / name, **({"quality": 90} if name.endswith(".jpg") else {}))
    print(f"wrote {len(items)} faces to {out}/photos (scenes) and {out}/crops (originals)")


def tight_rows(originals: list[Image.Image], side: int) -> dict[str, list[Image.Image]]:
    """The faces upscaled to `side` px (tight crops over faces.CROP_MAX_SIDE: what a folder of big face crops or
    a close selfie gives), read whole and searched by MTCNN with and without the padded retry."""
    from retrieval import largest_face
    big = [im.resize((side, side), Image.BICUBIC) for im in originals]
    rows = {f"{side} px tight crops, read whole": big}
    for pad in (0.0, faces.MTCNN_RETRY_PAD):
        with retry_pad(pad):
            out = [largest_face(im) for im in big]
        found = sum(how == "face" for _, how in out)
        rows[f"{side} px tight crops, MTCNN, retry pad {pad:g} ({found} found)"] = [im for im, _ in out]
    return rows


def alignment_accuracy(ckpt: str, items, kind: str, seed: int, photo: bool = False, sides=(),
                       roll: float = 0.0, tight: int = 0) -> None:
    """Top-1 over the 7 FER classes (paper sentences) of 48x48 originals vs pipeline crops of the same faces;
    photo: scenes as make_scene(photo=True) draws them; sides: the MTCNN crops again under each --source-side."""
    from dataclasses import replace
    from transform import Preprocess
    import evaluate
    import metrics
    from captions import canonical_name
    from embed import classifier_logits, text_prototypes
    from metrics import zero_shot_scores
    from retrieval import Engine
    engine = Engine.load(ckpt, None, "cpu")
    classes = evaluate.class_order(canonical_name(c) for _, c in items)
    if engine.cfg.objective == "ce":
        known = [canonical_name(c) for c in engine.model.class_names]
        if missing := [c for c in classes if c not in known]:
            raise UserError(f"{ckpt}: a classifier checkpoint without class(es) {', '.join(missing)}")
        score = lambda ims: classifier_logits(engine.model, engine.embed_images(ims))[:, [known.index(c) for c in classes]]  # noqa: E731
    else:
        protos = text_prototypes(engine.model, evaluate.get_bank("paper", None), classes)   # [C,D]
        score = lambda ims: zero_shot_scores(engine.embed_images(ims), protos)  # noqa: E731
    y = np.array([classes.index(canonical_name(c)) for _, c in items])
    sc = scenes(items, kind, seed, photo, roll)
    rows = {"48x48 originals": [Image.open(p).convert("RGB") for p, _ in items]}
    with retry_pad(0.0):
        rows["48x48 originals searched by MTCNN (uploads, before)"] = [faces_or_whole(im, 1)[0][0]
                                                                        for im in rows["48x48 originals"]]
    rows.update(tight_rows(rows["48x48 originals"], tight) if tight else {})
    for det in ("mtcnn", "haar"):
        rows[f"{det} crops (no face: centre square)"] = [faces_or_whole(im, 1, detector=det)[0][0] for im, _ in sc]
    with retry_pad(0.0):
        rows["mtcnn crops, no padded retry (before)"] = [faces_or_whole(im, 1)[0][0] for im, _ in sc]
    boxes = [detect_faces(im, 1, detector="mtcnn") for im, _ in sc]
    rows["mtcnn boxes, square crop (no alignment)"] = [
        faces.crop_face(im, Box(*(b[0].x0, b[0].y0, b[0].x1, b[0].y1))) if b else faces_or_whole(im, 1)[0][0]
        for (im, _), b in zip(sc, boxes)]
    hit = np.array([bool(b) and matches(b[0], tr) for b, (_, tr) in zip(boxes, sc)])
    def report(name: str, pred: np.ndarray, note: str) -> None:
        uar = metrics.uar(metrics.confusion_matrix(y, pred, len(classes)))
        said = {c: np.mean(pred == classes.index(c)) for c in ("neutral",) if c in classes}
        print(f"  {name:42s} top-1 {np.mean(pred == y):.3f}  UAR {uar:.3f}" + "".join(
            f"  {c} said {v:.1%} (truth {np.mean(y == classes.index(c)):.1%})" for c, v in said.items()) + note)
    for name, ims in rows.items():
        pred = score(ims).argmax(1)
        report(name, pred, f"  (on the {hit.sum()} faces MTCNN found: {np.mean(pred[hit] == y[hit]):.3f})")
    own, crops = engine.cfg.source_side, rows["mtcnn crops (no face: centre square)"]
    for side in sides:
        engine.preprocess = Preprocess(replace(engine.cfg, source_side=side))
        report(f"mtcnn crops, --source-side {side}", score(crops).argmax(1), f"  (the file's own: {own})")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fer", default=str(FER), help="FER-2013 folder layout (the benchmark is skipped without it)")
    ap.add_argument("--n", type=nonneg_int, default=200,
                    help="test faces for recall / false boxes (0: skip them and latency)")
    ap.add_argument("--seed", type=nonneg_int, default=0)
    ap.add_argument("--backgrounds", type=choice_list("grey", "texture"), default=["grey", "texture"],
                    help="comma-separated scene backgrounds: grey, texture")
    ap.add_argument("--repeat", type=positive_int, default=5, help="latency: median of this many calls")
    ap.add_argument("--checkpoint", default=None, help="also measure accuracy on aligned crops vs 48x48 originals")
    ap.add_argument("--n-acc", type=positive_int, default=500, help="test faces for --checkpoint")
    ap.add_argument("--acc-data", help="--checkpoint accuracy on this captions.csv folder's --acc-split rows instead "
                    "of FER-2013 test faces (a validation split, to choose a model by the photo path)")
    ap.add_argument("--acc-split", default="val", help="split of --acc-data (train, val, test or all)")
    ap.add_argument("--photo", action="store_true", help="--checkpoint accuracy on photo-like scenes: each face "
                    "sharpened at its pasted size, sensor noise and JPEG 80 on the scene")
    ap.add_argument("--roll", type=float, default=0.0, help="scenes: each face turned in the image plane by up to "
                    "this many degrees either way (a tilted head; alignment levels it)")
    ap.add_argument("--source-sides", type=int_list, default=[], help="e.g. 0,48: also score the MTCNN crops with each "
                    "--source-side (0: off), side by side")
    ap.add_argument("--tight", type=nonneg_int, default=224, help="--checkpoint: also score the faces upscaled to "
                    "this many px (tight crops over 160 px), read whole and searched by MTCNN (0: skip)")
    ap.add_argument("--write-folder", metavar="DIR", help="write --n-acc test faces as DIR/photos/CLASS/*.jpg "
                    "(photo-like scenes) and DIR/crops/CLASS/*.png (originals) for evaluate.py, then stop")
    ap.add_argument("--tune", action="store_true", help="MIN_PROB sweep on --n train faces (validation)")
    ap.add_argument("--template", action="store_true", help="median landmarks of --n train faces")
    ap.add_argument("--threads", type=nonneg_int, default=0, help="torch.set_num_threads (0: leave as is)")
    a = ap.parse_args(argv)
    needs = [f for f, on in (("--acc-data", a.acc_data), ("--source-sides", a.source_sides),
                             ("--acc-split", a.acc_split != "val")) if on]
    if needs and not a.checkpoint:
        ap.error(f"{', '.join(needs)}: only with --checkpoint (they choose what its accuracy is measured on)")
    if a.acc_split != "val" and not a.acc_data:
        ap.error("--acc-split: only with --acc-data (without it, accuracy is on FER-2013's test faces)")
    if a.n == 0 and (a.tune or a.template or not (a.checkpoint or a.write_folder)):
        ap.error("--n 0 leaves nothing to measure here: pass --n >= 1, or --checkpoint for accuracy only")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    fer = Path(a.fer)
    if skip := fer_skip(fer):
        print(skip)
        return 0
    if a.checkpoint:                  # a wrong or damaged file fails now, not after minutes of detection
        load_checkpoint(a.checkpoint)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    kinds = a.backgrounds
    if a.template or a.tune:
        train = pick_faces(fer, "train", a.n, a.seed)
        if a.template:
            print(f"template on {len(train)} train faces:")
            template(train)
        for kind in kinds if a.tune else []:
            print(f"MIN_PROB sweep on {len(train)} train faces, {kind} background:")
            tune(scenes(train, kind, a.seed))
        return 0
    if a.write_folder:
        try:
            write_folder(pick_faces(fer, "test", a.n_acc, a.seed + 1), Path(a.write_folder), a.seed + 1)
        except OSError as e:
            raise UserError(f"--write-folder {a.write_folder}: {e.strerror or e}") from None
        return 0
    acc_items = None
    if a.checkpoint:                  # read first: a bad --acc-data fails before the minutes of detection below
        acc_items = (labelled_split(Path(a.acc_data), a.acc_split, a.n_acc, a.seed + 1) if a.acc_data
                     else pick_faces(fer, "test", a.n_acc, a.seed + 1))
    items = pick_faces(fer, "test", a.n, a.seed)
    for kind in kinds if items else []:                             # --n 0: accuracy only
        sc = scenes(items, kind, a.seed, a.photo, a.roll)
        for det in ("haar", "mtcnn"):
            t = time.perf_counter()
            found, false, _ = recall_false(sc, det)
            print(f"{kind:7s} {det:5s}: found {found}/{len(sc)} ({found / len(sc):.1%}), {false} false boxes, "
                  f"{(time.perf_counter() - t) / len(sc) * 1e3:.0f} ms/scene")
    if items:
        print("latency:")
        latency(items, a.repeat)
    if acc_items is not None:
        where = f"{a.acc_data} {a.acc_split}" if a.acc_data else "test"
        print(f"accuracy on {len(acc_items)} {where} faces ({kinds[-1]} background{', photo-like' if a.photo else ''}"
              f"{f', roll up to {a.roll:g} deg' if a.roll else ''}),"
              " paper sentences:")
        alignment_accuracy(a.checkpoint, acc_items, kinds[-1], a.seed + 1, a.photo, a.source_sides, a.roll,
                           a.tight)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
