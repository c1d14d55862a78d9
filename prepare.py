"""Convert a face-expression dataset to DIR/captions.csv (image,caption,label,split[,soft_labels]).

  python prepare.py SOURCE --format fer2013-csv|folder|ferplus|affectnet|rafdb|ckplus --out DIR [--copy] [--bank paper]
  python prepare.py PHOTOS --format folder --out DIR --detect-faces [--grayscale] [--no-face keep|skip]

Images that already are files are referenced in place (path relative to DIR when the file lies inside DIR, else
absolute) unless --copy. Pixels from a CSV, face crops, copies and images that had to be converted to 8-bit L/RGB
are written under DIR/images/<prefix>/ and listed relative to DIR. Running again onto the same DIR appends.
--detect-faces crops the largest face of every image (OpenCV cascades, faces.py) and writes the crops there too.
The per-dataset readers live in formats.py.
"""
from __future__ import annotations

import argparse
import filecmp
import io
import os
import shlex
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from captions import CANONICAL, SYNONYMS, canonical_name, caption_for, clean_name, load_caption_bank
from formats import (FERPLUS_DIRS, FERPLUS_VOTES, READERS, USAGE_SPLITS, Skip, read_folder,  # noqa: F401 (re-exported)
                     refuse_out_in_class_folder)
from image_files import float_to_8bit, upright
from logs import get_logger
from utils import UserError, atomic_write, read_csv_checked, run_cli

log = get_logger(__name__)


# ----------------------------------------------------------------------------- labels

def check_label_map(label_map: dict[str, str] | None, known=CANONICAL) -> None:
    """UserError naming the first --label-map pair whose NEW name is not a class (after synonyms)."""
    for old, new in (label_map or {}).items():
        if str(new).strip() and canonical_name(new) not in known:
            raise UserError(f"--label-map {old}={new}: {new} is not a class; use one of {', '.join(known)} "
                            f"(or {old}= to drop the class)")


def harmonise_label(name, label_map: dict[str, str] | None = None, known=CANONICAL) -> str | None:
    """Dataset class name -> canonical name (--label-map first, then synonyms); None when mapped to ''."""
    check_label_map(label_map, known)
    key = clean_name(name)
    mapped = {clean_name(k): v for k, v in (label_map or {}).items()}
    if key in mapped:
        if not str(mapped[key]).strip():
            return None
        key = clean_name(mapped[key])
    key = SYNONYMS.get(key, key)
    if key not in known:
        raise UserError(f"unknown class name {name!r}; known: {', '.join(known)}; pass --label-map "
                        f"{shlex.quote(f'{name}=NEW')}")
    return key


def harmonise_labels(labels: pd.Series, label_map=None, known=CANONICAL, where: str = "") -> pd.Series:
    """harmonise_label over a column; one UserError listing every unknown name (a bad NEW name first)."""
    check_label_map(label_map, known)
    mapping, unknown = {}, []
    for name in pd.unique(labels):
        try:
            mapping[name] = harmonise_label(name, label_map, known)
        except UserError:
            unknown.append(str(name))
    if unknown:
        raise UserError(f"{where}: unknown class name(s) {', '.join(unknown)}; known: {', '.join(known)}; "
                        f"pass --label-map OLD=NEW (e.g. --label-map {shlex.quote(f'{unknown[0]}={known[0]}')}, or "
                        f"{shlex.quote(f'{unknown[0]}=')} to drop)")
    return labels.map(mapping)


# ----------------------------------------------------------------------------- images

def to_8bit(im: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit L or RGB image, and a note naming the conversion (None when none was needed)."""
    if im.mode in ("L", "RGB"):
        return im, None
    if im.mode == "F":
        return float_to_8bit(np.asarray(im, dtype=np.float64)), "converted F (32-bit float) to L"
    if im.mode.startswith("I"):  # 16/32-bit integer grey: scale 0..65535 to 0..255
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or a.max() > 255:
            a = a / 257.0
        bits = "16-bit" if im.mode.startswith("I;16") else "32-bit integer"
        return Image.fromarray(a.round().clip(0, 255).astype(np.uint8), "L"), f"converted {im.mode} ({bits}) to L"
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:  # as faces.py: onto white
        flat = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
        return flat.convert("L" if im.mode.startswith("L") else "RGB"), f"flattened {im.mode} onto white"
    if im.mode == "1":
        return im.convert("L"), "converted 1-bit to L"
    return im.convert("RGB"), "converted palette to RGB" if im.mode == "P" else f"converted {im.mode} to RGB"


def load_image(path) -> tuple[Image.Image, str | None]:
    """Fully decoded 8-bit L/RGB image, upright by its EXIF Orientation (see to_8bit); Skip for unreadable or
    truncated files."""
    try:
        im = Image.open(path)
    except Exception:
        raise Skip("unreadable image (not an image file)")
    try:
        with im:
            im.load()
            return to_8bit(upright(im))
    except Exception:
        raise Skip("unreadable image (truncated or corrupt)")


def decode_pixels(text: str) -> np.ndarray:
    """FER-2013 'pixels' string -> [48, 48] uint8."""
    try:
        a = np.array(str(text).split(), dtype=np.int64)
    except ValueError:
        raise Skip("bad pixels (not 2304 ints in 0..255)")
    if a.size != 48 * 48 or a.min() < 0 or a.max() > 255:
        raise Skip("bad pixels (not 2304 ints in 0..255)")
    return a.astype(np.uint8).reshape(48, 48)


def crop_box(im: Image.Image, box) -> Image.Image:
    """Crop (x, y, w, h), clamped to the image."""
    x, y, w, h = box
    left, top, right, bottom = max(0, x), max(0, y), min(im.width, x + w), min(im.height, y + h)
    if right <= left or bottom <= top:
        raise Skip("face box outside the image")
    return im.crop((left, top, right, bottom))


def listed_path(path: Path, out: Path) -> str:
    """How captions.csv names an image: relative to DIR when inside it, else absolute (posix slashes)."""
    path = Path(os.path.abspath(path))
    return path.relative_to(out).as_posix() if path.is_relative_to(out) else path.as_posix()


def unclaimed(dst: Path, out: Path, taken: set, same) -> Path:
    """dst, or dst-1, dst-2, ...: the first name that no listed face (`taken`: captions.csv's and this run's) holds,
    or that holds this very face (same(path)). A second source's fer00000.png, or face1.jpg converted beside a
    face1.png, never replaces a face already listed under that name; a rerun finds its own files again."""
    cand, k = dst, 0
    while listed_path(cand, out) in taken and cand.is_file() and not same(cand):
        k += 1
        cand = dst.with_name(f"{dst.stem}-{k}{dst.suffix}")
    return cand


def save(im: Image.Image, dst: Path, out: Path, taken: set) -> str:
    """Encode `im` for dst's extension and write it under the first unclaimed name; its captions.csv path."""
    buf = io.BytesIO()
    im.save(buf, format=Image.registered_extensions().get(dst.suffix.lower(), "PNG"), quality=95)
    data = buf.getvalue()
    dst = unclaimed(dst, out, taken, lambda p: p.read_bytes() == data)
    if listed_path(dst, out) not in taken or not dst.is_file():     # else unclaimed found this very face there
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
    return listed_path(dst, out)


def face_cropper(margin: float = 0.25, grayscale: bool = False, no_face: str = "skip"):
    """crop(im, notes) -> the largest face of `im` with `margin` (faces.py); no face: Skip, or `im` when 'keep'."""
    from faces import crop_face, detect_faces

    def crop(im: Image.Image, notes: Counter) -> Image.Image:
        boxes = detect_faces(im, max_faces=1)
        if boxes:
            notes["face detected and cropped"] += 1
            im = crop_face(im, boxes[0], margin, grayscale)
        elif no_face == "skip":
            raise Skip("no face found (--no-face skip)")
        else:
            notes["no face found, kept whole (--no-face keep)"] += 1
        return im.convert("L") if grayscale or im.mode == "L" else im
    return crop


def listed_before(r, out: Path, prefix: str, old_images: set, crop=None) -> bool:
    """The row's file is already in captions.csv as a reference, or as a copy with the same bytes (a run with --copy
    after one without, or the other way round): the same face, not listed again. Pixels and crops: see save."""
    if isinstance(getattr(r, "pixels", None), str) or isinstance(getattr(r, "box", None), tuple) or crop is not None:
        return False
    copied = out / "images" / prefix / r.name
    return listed_path(Path(r.src), out) in old_images or (
        listed_path(copied, out) in old_images and copied.is_file() and filecmp.cmp(r.src, copied, shallow=False))


def place(r, out: Path, prefix: str, copy: bool, verify: bool, notes: Counter, taken: set, crop=None) -> str:
    """Write or reference one row's image (face-cropped by `crop` when given); its captions.csv path. Raises Skip.
    taken: the paths captions.csv and this run list (what is written never replaces one of those faces)."""
    dst = out / "images" / prefix / r.name
    if isinstance(getattr(r, "pixels", None), str):
        im = Image.fromarray(decode_pixels(r.pixels), "L")
        return save(crop(im, notes) if crop else im, dst, out, taken)
    if isinstance(getattr(r, "box", None), tuple) or crop is not None:
        im, note = load_image(r.src)
        if note:
            notes[note] += 1
        im = crop_box(im, r.box) if isinstance(getattr(r, "box", None), tuple) else im
        return save(crop(im, notes) if crop else im, dst, out, taken)
    if verify:
        im, note = load_image(r.src)
        if note:
            notes[note] += 1
            return save(im, dst.with_suffix(".png"), out, taken)
    if copy:
        dst = unclaimed(dst, out, taken, lambda p: filecmp.cmp(r.src, p, shallow=False))
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(r.src, dst)
        return listed_path(dst, out)
    return listed_path(Path(r.src), out)


# ----------------------------------------------------------------------------- convert + merge

def merge_captions(path: Path, old: pd.DataFrame | None, new: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Append `new` to `old` (rows whose image is already listed are not added); write to `path` atomically."""
    already = new["image"].isin(set(old["image"]) if old is not None else set())
    table = (new if old is None else pd.concat([old, new[~already]], ignore_index=True)).fillna("")
    first = [c for c in ("image", "caption", "label", "split") if c in table]
    table = table[first + [c for c in table if c not in first]]
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
    return table, int(already.sum())


def kept_labels(rows: pd.DataFrame, out: Path, prefix: str, old: pd.DataFrame | None) -> tuple[int, str]:
    """Files this run reads that captions.csv already lists under ANOTHER label (a rerun with a new --label-map):
    how many, and the first as 'path: old there, new now'. They keep their row; merge never relabels."""
    if old is None or "label" not in old or "src" not in rows:
        return 0, ""
    before = dict(zip(old["image"], old["label"]))
    n, first = 0, ""
    for src, name, label in zip(rows["src"], rows["name"], rows["label"]):
        for key in (listed_path(Path(src), out), listed_path(out / "images" / prefix / name, out)):
            if key in before and before[key] != label:
                n, first = n + 1, first or f"{key}: {before[key]} there, {label} now"
                break
    return n, first


def existing_table(out: Path) -> pd.DataFrame | None:
    """OUT's captions.csv, when there is one; OUT a file, or captions.csv a folder: one line, before any image."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder (captions.csv and images/ go inside it)")
    listed = out / "captions.csv"
    if listed.is_dir():
        raise UserError(f"{listed}: is a folder; move it out of the way (prepare.py writes captions.csv there)")
    return read_csv_checked(listed, ["image", "caption"]) if listed.is_file() else None


def nothing_listed(source: Path, fmt: str, skipped: Counter) -> UserError:
    """Every row skipped: the main reason, and the likely cause (a wrong --format, images elsewhere)."""
    n, why = sum(skipped.values()), max(skipped, key=skipped.get) if any(skipped.values()) else "none found"
    hint = "pass --image-root DIR (the folder holding the images)" if why == "missing image" else \
        f"is --format {fmt} right for it? (see --help)"
    return UserError(f"{source}: no face could be listed ({n} rows skipped, {skipped[why]} for: {why}); {hint}; "
                     "nothing written")


def convert(source, fmt: str, out, copy: bool = False, label_map: dict[str, str] | None = None,
            bank: str = "paper", sampling: str = "random", seed: int = 0, verify: bool = True,
            image_root=None, detect_faces: bool = False, no_face: str = "skip", grayscale: bool = False,
            face_margin: float = 0.25) -> pd.DataFrame:
    """Read SOURCE as `fmt`, write images, merge into OUT/captions.csv; returns the whole table (report in .attrs).
    detect_faces: write the largest face of each image instead (no face: `no_face` = skip or keep)."""
    if fmt not in READERS:
        raise UserError(f"--format {fmt!r}: use one of {', '.join(READERS)}")
    for bad, why in ((no_face not in ("skip", "keep"), f"--no-face {no_face!r}: use keep or skip"),
                     (face_margin < 0, f"--face-margin {face_margin}: must be >= 0"),
                     (bool(image_root) and not Path(image_root or "").is_dir(),
                      f"--image-root {image_root}: no such folder; give the folder holding the images"),
                     (grayscale and not detect_faces, "--grayscale goes with --detect-faces (it turns the face "
                                                      "crops grey); add --detect-faces or drop --grayscale")):
        if bad:
            raise UserError(why)
    crop = face_cropper(face_margin, grayscale, no_face) if detect_faces else None
    source, out = Path(os.path.abspath(source)), Path(os.path.abspath(out))
    if not source.exists():
        raise UserError(f"{source}: no such file or folder")
    if fmt == "folder":
        refuse_out_in_class_folder(out, source)
    sentences = load_caption_bank(bank)
    listed, old = out / "captions.csv", existing_table(out)                       # fail before writing images
    rows, skipped = READERS[fmt](source, image_root and Path(os.path.abspath(image_root)))
    known = tuple(dict.fromkeys([*CANONICAL, *sentences]))
    rows["label"] = harmonise_labels(rows["label"], label_map, known, where=str(source))
    skipped["dropped by --label-map"] += int(rows["label"].isna().sum())
    rows = rows[rows["label"].notna()]
    skipped["duplicate (same file listed twice; first kept)"] += int(rows["name"].duplicated().sum())
    rows = rows.drop_duplicates("name").reset_index(drop=True)
    lacking = sorted(set(rows["label"]) - set(sentences))
    if lacking:
        raise UserError(f"caption bank {bank!r} has no sentence for {', '.join(lacking)}; add rows to the bank CSV")
    prefix = source.name if fmt == "folder" else {"fer2013-csv": "fer2013"}.get(fmt, fmt)
    notes, images, old_images, aliases = Counter(), [], set(old["image"]) if old is not None else set(), 0
    taken = set(old_images)
    for r in rows.itertuples(index=False):
        if listed_before(r, out, prefix, old_images, crop):
            aliases += 1
            images.append(None)
            continue
        try:
            images.append(place(r, out, prefix, copy, verify, notes, taken, crop))
            taken.add(images[-1])
        except Skip as e:
            skipped[str(e)] += 1
            images.append(None)
    rng = np.random.default_rng(seed)
    new = pd.DataFrame({"image": images, "caption": [caption_for(lb, sentences, rng, sampling) for lb in rows["label"]],
                        "label": rows["label"], "split": rows["split"]})
    if "soft_labels" in rows:
        new["soft_labels"] = rows["soft_labels"]
    new = new[new["image"].notna()]
    if new.empty and not aliases:
        raise nothing_listed(source, fmt, skipped)
    table, already = merge_captions(listed, old, new)
    table.attrs["report"] = {"path": str(listed), "added": len(new) - already, "already": already + aliases,
                             "skipped": {k: v for k, v in skipped.items() if v}, "converted": dict(notes),
                             "kept_labels": kept_labels(rows, out, prefix, old)}
    return table


def format_report(table: pd.DataFrame) -> str:
    """Counts per class and split of the whole captions.csv, plus what this run added, skipped and converted."""
    rep = table.attrs["report"]
    lines = [f"{rep['path']}: added {rep['added']} rows ({rep['already']} already listed), {len(table)} in total"]
    lines += [f"  skipped {n}: {why}" for why, n in sorted(rep["skipped"].items())]
    lines += [f"  {why}: {n}" for why, n in sorted(rep["converted"].items())]
    if (kept := rep.get("kept_labels", (0, "")))[0]:
        lines.append(f"  {kept[0]} already listed under another label kept it (e.g. {kept[1]}); captions.csv is never "
                     "relabelled: prepare into a new --out, or edit its label column")
    if len(table) and "label" in table:
        split = table["split"].replace("", "-") if "split" in table else pd.Series("-", index=table.index)
        lines.append(pd.crosstab(table["label"], split, margins=True, margins_name="total").to_string())
    return "\n".join(lines)


def parse_label_map(items) -> dict[str, str]:
    """['old=new', ...] -> {old: new}; 'old=' drops the class. Malformed pairs and two NEW names for one OLD
    name (case and spacing ignored, synonyms alike) are refused."""
    bad = [s for s in items or [] if s.count("=") != 1 or not s.split("=", 1)[0].strip()]
    if bad:
        raise UserError(f"--label-map {bad[0]!r}: expected one OLD=NEW pair with a single '=', e.g. "
                        "--label-map angry=anger (OLD= drops a class)")
    pairs, seen = {}, {}
    for s in items or []:
        old, new = s.split("=", 1)
        first = seen.setdefault(clean_name(old), s)
        if canonical_name(first.split("=", 1)[1]) != canonical_name(new):
            raise UserError(f"--label-map {first} {s}: two new names for {old.strip()}; keep one of them")
        pairs[old] = new
    return pairs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="dataset file or folder (see --format)")
    p.add_argument("--format", required=True, choices=list(READERS), help="layout of SOURCE")
    p.add_argument("--out", required=True, help="dataset root: DIR/captions.csv (+ DIR/images/); appends if present")
    p.add_argument("--copy", action="store_true", help="copy image files into DIR/images instead of referencing them")
    p.add_argument("--label-map", nargs="+", action="extend", default=[], metavar="OLD=NEW",
                   help="rename classes (OLD= drops a class); put it after SOURCE")
    p.add_argument("--bank", default="paper", help="caption bank: paper, rich or a CSV with columns label,caption")
    p.add_argument("--caption-sampling", default="random", choices=["random", "first"],
                   help="per row: a random sentence of the class (seeded) or always its first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-verify", action="store_true",
                   help="trusted folders: do not open image files (no check or 8-bit conversion; much faster)")
    p.add_argument("--image-root", help="image folder when it is not where the format expects it (ferplus, "
                   "affectnet CSV, rafdb, ckplus)")
    p.add_argument("--detect-faces", action="store_true", help="uncropped photos: write the largest face of each "
                   "image (OpenCV cascades) to DIR/images/<prefix>/")
    p.add_argument("--no-face", default="skip", choices=["skip", "keep"],
                   help="with --detect-faces: images without a face are skipped (default) or kept whole; counted")
    p.add_argument("--grayscale", action="store_true", help="with --detect-faces: write the crops in grey")
    p.add_argument("--face-margin", type=float, default=0.25, help="with --detect-faces: crop side = face side * "
                   "(1 + margin)")
    args = p.parse_args(argv)
    t0 = time.time()
    table = convert(args.source, args.format, args.out, copy=args.copy, label_map=parse_label_map(args.label_map),
                    bank=args.bank, sampling=args.caption_sampling, seed=args.seed, verify=not args.no_verify,
                    image_root=args.image_root, detect_faces=args.detect_faces, no_face=args.no_face,
                    grayscale=args.grayscale, face_margin=args.face_margin)
    print(format_report(table))
    log.info(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
