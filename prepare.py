"""Convert a face-expression dataset to DIR/captions.csv (image,caption,label,split[,soft_labels]).

  python prepare.py SOURCE --format fer2013-csv|folder|ferplus|affectnet|rafdb --out DIR [--copy] [--bank paper]
  python prepare.py PHOTOS --format folder --out DIR --detect-faces [--grayscale] [--no-face keep|skip]

Images that already are files are referenced in place (path relative to DIR when the file lies inside DIR, else
absolute) unless --copy. Pixels from a CSV, face crops, copies and images that had to be converted to 8-bit L/RGB
are written under DIR/images/<prefix>/ and listed relative to DIR. Running again onto the same DIR appends.
--detect-faces crops the largest face of every image (OpenCV cascades, faces.py) and writes the crops there too.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from captions import CANONICAL, SYNONYMS, caption_for, clean_name, load_caption_bank
from utils import UserError, read_csv_checked, run_cli

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
FER2013_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
AFFECTNET_NAMES = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
AFFECTNET_CSV_COLS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression")
RAFDB_NAMES = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")  # labels 1..7
FERPLUS_VOTES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF")
FERPLUS_DIRS = {"train": "FER2013Train", "val": "FER2013Valid", "test": "FER2013Test"}
USAGE_SPLITS = {"training": "train", "publictest": "val", "privatetest": "test"}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


class Skip(Exception):
    """An item that cannot be used; the message is the reason counted in the report."""


# ----------------------------------------------------------------------------- small helpers

def read_table(path: Path, required) -> pd.DataFrame:
    """CSV as strings; a UserError naming the file and any missing column."""
    return read_csv_checked(path, required, hint="is --format right?")


def safe_join(root: Path, rel: str) -> Path | None:
    """root/rel, or None when rel is absolute or climbs out of root (`../../etc/passwd`)."""
    rel = str(rel).strip().replace("\\", "/")
    if not rel or os.path.isabs(rel):
        return None
    path = Path(os.path.normpath(root / rel))
    return path if path.is_relative_to(root) and path != root else None


def first_existing(paths) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def posix_rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def collect(items, row_fn, skipped: Counter, columns) -> pd.DataFrame:
    """Apply row_fn to each item; rows that raise Skip are counted under their reason."""
    rows = []
    for item in items:
        try:
            rows.append(row_fn(*item))
        except Skip as e:
            skipped[str(e)] += 1
    return pd.DataFrame(rows, columns=columns)


# ----------------------------------------------------------------------------- readers
# Each read_<format>(source, image_root) -> (rows, skipped). rows: src (image file, '' for pixels), name (path under
# DIR/images/<prefix>/ if written), label (the dataset's own name), split, and optionally pixels, box, soft_labels.

def read_fer2013_csv(source: Path, image_root=None) -> tuple[pd.DataFrame, Counter]:
    """Kaggle fer2013.csv: emotion 0..6, pixels (2304 ints), optional Usage -> train/val/test."""
    df = read_table(source, ["emotion", "pixels"])
    emotion = pd.to_numeric(df["emotion"], errors="coerce")
    ok = emotion.isin(range(7))
    usage = df["Usage"].str.strip().str.lower() if "Usage" in df else pd.Series("", index=df.index)
    split = usage.map(USAGE_SPLITS).fillna(usage)
    rows = pd.DataFrame({"src": "", "name": [f"{s or 'all'}/fer{i:05d}.png" for i, s in zip(df.index, split)],
                         "label": emotion.map(dict(enumerate(FER2013_NAMES))), "split": split, "pixels": df["pixels"]})
    return rows[ok].reset_index(drop=True), Counter({"emotion not in 0..6": int((~ok).sum())})


def read_folder(source: Path, image_root=None) -> tuple[pd.DataFrame, Counter]:
    """SPLIT/CLASS/*.png|jpg (split folders train/val/test) or flat CLASS/*.png; class = folder name."""
    if not source.is_dir():
        raise UserError(f"{source}: not a folder; --format folder wants SPLIT/CLASS/*.png or CLASS/*.png")
    subdirs = sorted(d for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
    by_split = bool(subdirs) and all(d.name.lower() in SPLIT_NAMES for d in subdirs)
    groups = [(SPLIT_NAMES[d.name.lower()], d) for d in subdirs] if by_split else [("", source)]
    records, skipped = [], Counter()
    for split, top in groups:
        for entry in sorted(os.scandir(top), key=lambda e: e.name):
            is_image = Path(entry.name).suffix.lower() in IMAGE_EXTS
            if entry.is_dir() and not entry.name.startswith("."):
                files = sorted(f.path for f in os.scandir(entry.path)
                               if f.is_file() and Path(f.name).suffix.lower() in IMAGE_EXTS)
                records += [(p, posix_rel(p, source), entry.name, split) for p in files]
            elif is_image:
                skipped["image not inside a class folder"] += 1
    if not records:
        raise UserError(f"{source}: no images found; --format folder wants SPLIT/CLASS/*.png or CLASS/*.png")
    return pd.DataFrame(records, columns=["src", "name", "label", "split"]), skipped


def read_ferplus(source: Path, image_root=None) -> tuple[pd.DataFrame, Counter]:
    """FER+ fer2013new.csv (vote counts) + FER2013Train/Valid/Test image folders -> majority label, soft votes."""
    csv = source / "fer2013new.csv" if source.is_dir() else source
    df = read_table(csv, ["Usage", "Image name", *FERPLUS_VOTES])
    root = Path(image_root) if image_root else next(
        (p for p in (csv.parent, csv.parent / "data") if any((p / d).is_dir() for d in FERPLUS_DIRS.values())), None)
    if root is None:
        raise UserError(f"{csv}: no FER2013Train/FER2013Valid/FER2013Test folders next to it; make them with FER+'s "
                        "generate_training_data.py or pass --image-root")
    votes = df[list(FERPLUS_VOTES)].apply(pd.to_numeric, errors="coerce").to_numpy(float)  # [N, 10]

    def row(usage: str, name: str, v: np.ndarray):
        split = USAGE_SPLITS.get(usage.strip().lower())
        if not name.strip():
            raise Skip("no image name")
        if split is None:
            raise Skip("Usage not Training/PublicTest/PrivateTest")
        if np.isnan(v).any() or (v < 0).any() or v.sum() <= 0:
            raise Skip("bad vote counts")
        top = FERPLUS_VOTES[int(v.argmax())]  # ties: first column wins
        if top in ("unknown", "NF"):
            raise Skip("majority vote unknown/NF")
        path = safe_join(root / FERPLUS_DIRS[split], name)
        if path is None:
            raise Skip("path outside the dataset root")
        if not path.is_file():
            raise Skip("missing image")
        soft = {k: round(float(x) / v[:8].sum(), 4) for k, x in zip(FERPLUS_VOTES[:8], v[:8])}
        return str(path), posix_rel(path, root), top, split, json.dumps(soft, separators=(",", ":"))

    skipped = Counter()
    rows = collect(zip(df["Usage"], df["Image name"], votes), row, skipped,
                   ["src", "name", "label", "split", "soft_labels"])
    return rows, skipped


def _affectnet_folder(set_dirs: list[Path], skipped: Counter) -> pd.DataFrame:
    """train_set/images/N.jpg + train_set/annotations/N_exp.npy (0..7; 8+ dropped)."""
    def row(img: Path, split: str, base: Path):
        ann = img.parent.parent / "annotations" / f"{img.stem}_exp.npy"
        if not ann.is_file():
            raise Skip("missing annotation")
        try:
            exp = int(float(np.load(ann, allow_pickle=False).reshape(-1)[0]))
        except (ValueError, OSError, IndexError):
            raise Skip("unreadable annotation")
        if not 0 <= exp < len(AFFECTNET_NAMES):
            raise Skip("expression not 0..7 (none/uncertain/no face)")
        return str(img), posix_rel(img, base), AFFECTNET_NAMES[exp], split

    items = [(img, SPLIT_NAMES.get(d.name.lower().removesuffix("_set"), ""), d.parent)
             for d in set_dirs for img in sorted((d / "images").iterdir()) if img.suffix.lower() in IMAGE_EXTS]
    return collect(items, row, skipped, ["src", "name", "label", "split"])


def _affectnet_csv(csvs: list[Path], image_root, skipped: Counter) -> pd.DataFrame:
    """training.csv/validation.csv (subDirectory_filePath, face box, expression) + Manually_Annotated_Images/."""
    def row(rel: str, x: str, y: str, w: str, h: str, exp: str, root: Path, split: str):
        try:
            exp_i, box = int(float(exp)), tuple(int(float(v)) for v in (x, y, w, h))
        except ValueError:
            raise Skip("bad expression or face box value")
        if not 0 <= exp_i < len(AFFECTNET_NAMES):
            raise Skip("expression not 0..7 (none/uncertain/no face)")
        path = safe_join(root, rel)
        if path is None:
            raise Skip("path outside the dataset root")
        if not path.is_file():
            raise Skip("missing image")
        return str(path), posix_rel(path, root), AFFECTNET_NAMES[exp_i], split, box

    frames = []
    for csv in csvs:
        df = read_table(csv, AFFECTNET_CSV_COLS)
        root = Path(image_root) if image_root else first_existing(
            [csv.parent / "Manually_Annotated_Images", csv.parent.parent / "Manually_Annotated_Images"])
        split = {"training": "train", "validation": "val"}.get(csv.stem.lower(), "")
        items = zip(*(df[c] for c in AFFECTNET_CSV_COLS), [root or csv.parent] * len(df), [split] * len(df))
        frames.append(collect(items, row, skipped, ["src", "name", "label", "split", "box"]))
    return pd.concat(frames, ignore_index=True)


def read_affectnet(source: Path, image_root=None) -> tuple[pd.DataFrame, Counter]:
    """AffectNet folder release (train_set/, val_set/) or CSV release (a training.csv/validation.csv, or their folder)."""
    skipped = Counter()
    if source.is_file():
        return _affectnet_csv([source], image_root, skipped), skipped
    sets = [d for d in (source / "train_set", source / "val_set") if (d / "images").is_dir()]
    sets = sets or ([source] if (source / "images").is_dir() else [])
    if sets:
        return _affectnet_folder(sets, skipped), skipped
    csvs = [p for d in (source, source / "Manually_Annotated_file_lists")
            for p in (d / "training.csv", d / "validation.csv") if p.is_file()]
    if not csvs:
        raise UserError(f"{source}: no AffectNet train_set/images, val_set/images, training.csv or validation.csv found")
    return _affectnet_csv(csvs, image_root, skipped), skipped


def read_rafdb(source: Path, image_root=None) -> tuple[pd.DataFrame, Counter]:
    """RAF-DB basic: EmoLabel/list_patition_label.txt (`train_00001.jpg 5`) + Image/aligned/*_aligned.jpg."""
    names = ("list_patition_label.txt", "list_partition_label.txt")
    lst = source if source.is_file() else first_existing(source / sub / n for sub in ("EmoLabel", ".") for n in names)
    if lst is None:
        raise UserError(f"{source}: no EmoLabel/list_patition_label.txt; point SOURCE at RAF-DB's basic/ folder")
    base = lst.parent.parent if lst.parent.name == "EmoLabel" else lst.parent
    dirs = [Path(image_root)] if image_root else [base / "Image" / "aligned", base / "aligned",
                                                  base / "Image" / "original", base / "original"]

    def row(line: str):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= len(RAFDB_NAMES):
            raise Skip("malformed line or label not 1..7")
        stem, ext = os.path.splitext(parts[0])
        found = [(d, safe_join(d, n)) for d in dirs for n in (f"{stem}_aligned{ext}", parts[0])]
        if any(p is None for _, p in found):
            raise Skip("path outside the dataset root")
        d, path = next(((d, p) for d, p in found if p.is_file()), (None, None))
        if path is None:
            raise Skip("missing image")
        split = SPLIT_NAMES.get(parts[0].split("_")[0].lower(), "")
        return str(path), posix_rel(path, d.parent), RAFDB_NAMES[int(parts[1]) - 1], split

    skipped = Counter()
    lines = [(ln,) for ln in lst.read_text(errors="replace").splitlines() if ln.strip()]
    return collect(lines, row, skipped, ["src", "name", "label", "split"]), skipped


READERS = {"fer2013-csv": read_fer2013_csv, "folder": read_folder, "ferplus": read_ferplus,
           "affectnet": read_affectnet, "rafdb": read_rafdb}


# ----------------------------------------------------------------------------- labels

def harmonise_label(name, label_map: dict[str, str] | None = None, known=CANONICAL) -> str | None:
    """Dataset class name -> canonical name (--label-map first, then synonyms); None when mapped to ''."""
    key = clean_name(name)
    mapped = {clean_name(k): v for k, v in (label_map or {}).items()}
    if key in mapped:
        if not str(mapped[key]).strip():
            return None
        key = clean_name(mapped[key])
    key = SYNONYMS.get(key, key)
    if key not in known:
        raise UserError(f"unknown class name {name!r}; known: {', '.join(known)}; pass --label-map {name}=NEW")
    return key


def harmonise_labels(labels: pd.Series, label_map=None, known=CANONICAL, where: str = "") -> pd.Series:
    """harmonise_label over a column; one UserError listing every unknown name."""
    mapping, unknown = {}, []
    for name in pd.unique(labels):
        try:
            mapping[name] = harmonise_label(name, label_map, known)
        except UserError:
            unknown.append(str(name))
    if unknown:
        raise UserError(f"{where}: unknown class name(s) {', '.join(unknown)}; known: {', '.join(known)}; "
                        f"pass --label-map OLD=NEW (e.g. --label-map {unknown[0]}={known[0]}, or {unknown[0]}= to drop)")
    return labels.map(mapping)


# ----------------------------------------------------------------------------- images

def to_8bit(im: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit L or RGB image, and a note naming the conversion (None when none was needed)."""
    if im.mode in ("L", "RGB"):
        return im, None
    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit grey: scale 0..65535 to 0..255
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or a.max() > 255:
            a = a / 257.0
        return Image.fromarray(a.round().clip(0, 255).astype(np.uint8), "L"), f"converted {im.mode} (16-bit) to L"
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:  # as faces.py: onto white
        flat = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
        return flat.convert("L" if im.mode.startswith("L") else "RGB"), f"flattened {im.mode} onto white"
    if im.mode == "1":
        return im.convert("L"), "converted 1-bit to L"
    return im.convert("RGB"), "converted palette to RGB" if im.mode == "P" else f"converted {im.mode} to RGB"


def load_image(path) -> tuple[Image.Image, str | None]:
    """Fully decoded 8-bit L/RGB image (see to_8bit); Skip for unreadable or truncated files."""
    try:
        im = Image.open(path)
    except Exception:
        raise Skip("unreadable image (not an image file)")
    try:
        with im:
            im.load()
            return to_8bit(im)
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


def save(im: Image.Image, dst: Path, out: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    im.save(dst, quality=95)
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


def place(r, out: Path, prefix: str, copy: bool, verify: bool, notes: Counter, crop=None) -> str:
    """Write or reference one row's image (face-cropped by `crop` when given); its captions.csv path. Raises Skip."""
    dst = out / "images" / prefix / r.name
    if isinstance(getattr(r, "pixels", None), str):
        im = Image.fromarray(decode_pixels(r.pixels), "L")
        return save(crop(im, notes) if crop else im, dst, out)
    if isinstance(getattr(r, "box", None), tuple) or crop is not None:
        im, note = load_image(r.src)
        if note:
            notes[note] += 1
        im = crop_box(im, r.box) if isinstance(getattr(r, "box", None), tuple) else im
        return save(crop(im, notes) if crop else im, dst, out)
    if verify:
        im, note = load_image(r.src)
        if note:
            notes[note] += 1
            return save(im, dst.with_suffix(".png"), out)
    if copy:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return table, int(already.sum())


def convert(source, fmt: str, out, copy: bool = False, label_map: dict[str, str] | None = None,
            bank: str = "paper", sampling: str = "random", seed: int = 0, verify: bool = True,
            image_root=None, detect_faces: bool = False, no_face: str = "skip", grayscale: bool = False,
            face_margin: float = 0.25) -> pd.DataFrame:
    """Read SOURCE as `fmt`, write images, merge into OUT/captions.csv; returns the whole table (report in .attrs).
    detect_faces: write the largest face of each image instead (no face: `no_face` = skip or keep)."""
    if fmt not in READERS:
        raise UserError(f"--format {fmt!r}: use one of {', '.join(READERS)}")
    if no_face not in ("skip", "keep") or face_margin < 0 or (grayscale and not detect_faces):
        raise UserError("--no-face is keep or skip, --face-margin >= 0, and --grayscale goes with --detect-faces")
    crop = face_cropper(face_margin, grayscale, no_face) if detect_faces else None
    source, out = Path(os.path.abspath(source)), Path(os.path.abspath(out))
    if not source.exists():
        raise UserError(f"{source}: no such file or folder")
    sentences = load_caption_bank(bank)
    listed = out / "captions.csv"
    old = read_table(listed, ["image", "caption"]) if listed.is_file() else None  # fail before writing images
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
    notes, images = Counter(), []
    for r in rows.itertuples(index=False):
        try:
            images.append(place(r, out, prefix, copy, verify, notes, crop))
        except Skip as e:
            skipped[str(e)] += 1
            images.append(None)
    rng = np.random.default_rng(seed)
    new = pd.DataFrame({"image": images, "caption": [caption_for(lb, sentences, rng, sampling) for lb in rows["label"]],
                        "label": rows["label"], "split": rows["split"]})
    if "soft_labels" in rows:
        new["soft_labels"] = rows["soft_labels"]
    new = new[new["image"].notna()]
    table, already = merge_captions(listed, old, new)
    table.attrs["report"] = {"path": str(listed), "added": len(new) - already, "already": already,
                             "skipped": {k: v for k, v in skipped.items() if v}, "converted": dict(notes)}
    return table


def format_report(table: pd.DataFrame) -> str:
    """Counts per class and split of the whole captions.csv, plus what this run added, skipped and converted."""
    rep = table.attrs["report"]
    lines = [f"{rep['path']}: added {rep['added']} rows ({rep['already']} already listed), {len(table)} in total"]
    lines += [f"  skipped {n}: {why}" for why, n in sorted(rep["skipped"].items())]
    lines += [f"  {why}: {n}" for why, n in sorted(rep["converted"].items())]
    if len(table) and "label" in table:
        split = table["split"].replace("", "-") if "split" in table else pd.Series("-", index=table.index)
        lines.append(pd.crosstab(table["label"], split, margins=True, margins_name="total").to_string())
    return "\n".join(lines)


def parse_label_map(items) -> dict[str, str]:
    """['old=new', ...] -> {old: new}; 'old=' drops the class."""
    bad = [s for s in items or [] if "=" not in s or not s.split("=", 1)[0].strip()]
    if bad:
        raise UserError(f"--label-map {bad[0]!r}: expected OLD=NEW, e.g. --label-map angry=anger (OLD= drops a class)")
    return dict(s.split("=", 1) for s in items or [])


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
                   "affectnet CSV, rafdb)")
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
    print(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
