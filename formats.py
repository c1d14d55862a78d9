"""Dataset readers for prepare.py: each read_<format>(source, image_root) -> (rows, skipped Counter).

Formats: fer2013-csv (the Kaggle pixels CSV), folder (SPLIT/CLASS/* or CLASS/*), ferplus (FER+ label votes), affectnet
(folder release or the CSV release with face boxes), rafdb (basic: list_patition_label.txt), ckplus (CK+: each
labelled sequence's peak frame). Rows name the source
image (or carry its pixels), the dataset's own label, the split, and optionally a face box and soft labels; prepare.py
harmonises labels, writes images and captions.csv.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from utils import IMAGE_EXTS, UserError, read_csv_checked, regular_or_broken, walk_files

FORMAT_HINT = "is --format right?"        # appended to a CSV error of a dataset reader
FER2013_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
AFFECTNET_NAMES = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
AFFECTNET_CSV_COLS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression")
CKPLUS_NAMES = ("neutral", "anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise")  # codes 0..7
RAFDB_NAMES = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")  # labels 1..7
FERPLUS_VOTES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF")
FERPLUS_DIRS = {"train": "FER2013Train", "val": "FER2013Valid", "test": "FER2013Test"}
USAGE_SPLITS = {"training": "train", "publictest": "val", "privatetest": "test"}
FER2013_BAD_USAGE = "Usage not Training, PublicTest, PrivateTest or empty"
SPLIT_NAMES = {**USAGE_SPLITS, "train": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


class Skip(Exception):
    """An item that cannot be used; the message is the reason counted in the report."""


# ----------------------------------------------------------------------------- small helpers

def safe_join(root: Path, rel: str) -> Path | None:
    """root/rel, or None when rel is absolute or climbs out of root (`../../etc/passwd`)."""
    rel = str(rel).strip().replace("\\", "/")
    if not rel or os.path.isabs(rel):
        return None
    path = Path(os.path.normpath(root / rel))
    return path if path.is_relative_to(root) and path != root else None


def whole(text) -> int:
    """'5', '5.0', ' 5.0000000e+00' -> 5; NaN, inf and non-numbers -> ValueError (a row's Skip, not a traceback)."""
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"{text!r} is not a finite number")
    return int(v)


def read_label_text(path: Path) -> str:
    """A plain-text label file as text: a byte-order mark (Windows Notepad) dropped, undecodable bytes replaced."""
    return path.read_text(encoding="utf-8-sig", errors="replace")


def first_existing(paths) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def posix_rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def first_row_per_file(df: pd.DataFrame, column: str = "path") -> tuple[pd.DataFrame, int, int]:
    """The first row naming each file (however its path is spelled) -> (rows, rows dropped, files whose rows
    disagree on the label)."""
    keys = pd.Series([os.path.realpath(p) for p in df[column]], index=df.index)
    dup = keys.duplicated().to_numpy()
    clash = int((df.groupby(keys)["label"].nunique() > 1).sum()) if dup.any() else 0
    return df[~dup].reset_index(drop=True), int(dup.sum()), clash


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
    """Kaggle fer2013.csv: emotion 0..6, pixels (2304 ints), optional Usage Training/PublicTest/PrivateTest ->
    train/val/test. No Usage column or an empty Usage: no split (split '', image under all/); any other Usage:
    the row is skipped and counted."""
    df = read_csv_checked(source, ["emotion", "pixels"], hint=FORMAT_HINT)
    emotion = pd.to_numeric(df["emotion"], errors="coerce")
    ok = emotion.isin(range(7))
    usage = df["Usage"].str.strip().str.lower() if "Usage" in df else pd.Series("", index=df.index)
    split = usage.map({**USAGE_SPLITS, "": ""})
    known = ok & split.notna()
    rows = pd.DataFrame({"src": "", "name": [f"{s or 'all'}/fer{i:05d}.png" for i, s in zip(df.index, split)],
                         "label": emotion.map(dict(enumerate(FER2013_NAMES))), "split": split, "pixels": df["pixels"]})
    return rows[known].reset_index(drop=True), Counter({"emotion not in 0..6": int((~ok).sum()),
                                                        FER2013_BAD_USAGE: int((ok & split.isna()).sum())})


FOLDER_WANTS = "--format folder wants SPLIT/CLASS/*.png or CLASS/*.png"


NOT_IMAGES = {".txt", ".csv", ".json", ".md", ".db", ".ini", ".xml", ".pdf", ".py", ".npy"}  # not counted as skipped


def _not_data(d: Path, outputs: set | None = None) -> bool:
    """Folders a dataset layout never means: hidden ones, a Mac zip's __MACOSX, and prepare.py's own output (a folder
    holding a captions.csv, or the images/ beside one), so --out inside SOURCE can be prepared again. Output folders
    are added to `outputs` (counted)."""
    if (d / "captions.csv").is_file() and not d.name.startswith(".") and outputs is not None:
        outputs.add(str(d))
    return (d.name.startswith(".") or d.name == "__MACOSX" or (d / "captions.csv").is_file()
            or (d.name == "images" and (d.parent / "captions.csv").is_file()))


def class_images(folder: Path, wants: str, outputs: set | None = None, other: Counter | None = None) -> list[str]:
    """Image files anywhere below a class folder (CLASS/subject/*.png too: the label is the class folder), sorted
    folder by folder; folders _not_data skipped (output folders added to `outputs`), other file types counted by
    extension in `other` (hidden files and NOT_IMAGES left out). A split folder right inside a class folder (SOURCE
    one level too high, which would label every image with the dataset's name) -> UserError."""
    out = []
    for dirpath, dirnames, filenames in walk_files(folder, lambda root, n: not _not_data(Path(root, n), outputs)):
        here = Path(dirpath)
        split = next((n for n in dirnames if n.lower() in SPLIT_NAMES), None) if here == folder else None
        if split:
            raise UserError(f"{here / split}: a split folder inside the class folder {folder.name}; point at "
                            f"{here} instead; {wants}")
        out += [str(here / n) for n in filenames
                if Path(n).suffix.lower() in IMAGE_EXTS and regular_or_broken(dirpath, n)]
        if other is not None:
            other.update(Path(n).suffix.lower() or "(none)" for n in filenames if not n.startswith(".")
                         and Path(n).suffix.lower() not in IMAGE_EXTS | NOT_IMAGES)
    return out


def refuse_out_in_class_folder(out: Path, source: Path) -> None:
    """--out at or below a split or class folder of a folder SOURCE -> UserError: later runs would skip that whole
    folder as prepare.py's output. SOURCE itself or a new folder in it is fine."""
    where, top = Path(os.path.abspath(out)).resolve(), source.resolve()
    rel = where.relative_to(top).parts if where.is_relative_to(top) else ()
    if not rel or rel[0].startswith(".") or not (top / rel[0]).is_dir():
        return
    first = top / rel[0]
    if rel[0].lower() in SPLIT_NAMES or class_images(first, FOLDER_WANTS):
        kind = "split" if rel[0].lower() in SPLIT_NAMES else "class"
        raise UserError(f"--out {out}: inside the {kind} folder {first}, which later runs would skip as output; "
                        f"give {source} itself, a new folder in it (e.g. {source / 'prepared'}) or one outside it")


def refuse_output_inside(out, flag: str, folders, reads: str) -> None:
    """An output path inside (or equal to) one of `folders`, inputs whose every image is read -> UserError before
    any work: the next run over that folder would read what this one wrote (`reads`: as what). Hidden folders
    inside it are never read: an output there is fine."""
    where = Path(os.path.abspath(out)).resolve()
    for folder in folders:
        top = Path(folder).resolve()
        if where.is_relative_to(top) and not any(part.startswith(".") for part in where.relative_to(top).parts):
            name = where.name if where != top else f"{where.name}_{flag.strip('-')}"
            raise UserError(f"{flag} {out}: inside the input folder {folder}, whose images are all read, so a "
                            f"later run would read it {reads}; give a path outside it (e.g. "
                            f"{Path(os.path.relpath(top.parent / name))})")


def read_folder(source: Path, image_root=None, wants: str = FOLDER_WANTS) -> tuple[pd.DataFrame, Counter]:
    """SPLIT/CLASS/*.png|jpg (split folders train/val/test) or flat CLASS/*.png, images in folders below a class
    folder included (CLASS/subject/*.png); class = the class folder's name. `wants`
    ends the error line: what the calling tool accepts."""
    if not source.is_dir():
        raise UserError(f"{source}: not a folder; {wants}")
    subdirs = sorted(d for d in source.iterdir() if d.is_dir() and not _not_data(d))
    by_split = any(d.name.lower() in SPLIT_NAMES for d in subdirs)      # other folders beside them: skipped, counted
    groups = [(SPLIT_NAMES[d.name.lower()], d) for d in subdirs if d.name.lower() in SPLIT_NAMES] if by_split \
        else [("", source)]
    records, skipped, outputs, other, empty = [], Counter(), set(), Counter(), []
    skipped["folder beside the split folders, not a split"] += sum(by_split and d.name.lower() not in SPLIT_NAMES
                                                                  for d in subdirs)
    for split, top in groups:
        for entry in sorted(os.scandir(top), key=lambda e: e.name):
            is_image = Path(entry.name).suffix.lower() in IMAGE_EXTS
            if entry.is_dir() and not _not_data(Path(entry.path), outputs):
                files = class_images(Path(entry.path), wants, outputs, other)
                records += [(p, posix_rel(p, source), entry.name, split) for p in files]
                empty += [] if files else [posix_rel(Path(entry.path), source)]
            elif is_image:
                skipped["image not inside a class folder"] += 1
    _count_folder_skips(skipped, sorted(posix_rel(Path(d), source) for d in outputs), other, empty)
    if not records:
        raise UserError(f"{source}: no images inside class folders ({_why_none(skipped) or 'none found'}); {wants}")
    return pd.DataFrame(records, columns=["src", "name", "label", "split"]), skipped


def _count_folder_skips(skipped: Counter, outputs: list[str], other: Counter, empty: list[str]) -> None:
    """One skipped line each: output folders, files of a type not read (by extension), class folders left empty."""
    def some(names):
        return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    if outputs:
        skipped[f"folder holding a captions.csv (prepare.py output), not read ({some(outputs)})"] += len(outputs)
    if other:
        skipped[f"file type not read ({some(sorted(other))})"] += sum(other.values())
    if empty:
        skipped[f"class folder with no image read ({some(empty)})"] += len(empty)


def _why_none(skipped: Counter) -> str:
    return "; ".join(f"skipped {n}: {why}" for why, n in sorted(skipped.items()) if n)


def read_ferplus(source: Path, image_root=None) -> tuple[pd.DataFrame, Counter]:
    """FER+ fer2013new.csv (vote counts) + FER2013Train/Valid/Test image folders -> majority label, soft votes."""
    csv = source / "fer2013new.csv" if source.is_dir() else source
    df = read_csv_checked(csv, ["Usage", "Image name", *FERPLUS_VOTES], hint=FORMAT_HINT)
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
        if not np.isfinite(v.sum()) or (v < 0).any() or v.sum() <= 0:       # NaN, inf, 1e400
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
            exp = whole(np.load(ann, allow_pickle=False).reshape(-1)[0])
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
            exp_i, box = whole(exp), tuple(whole(v) for v in (x, y, w, h))
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
        df = read_csv_checked(csv, AFFECTNET_CSV_COLS, hint=FORMAT_HINT)
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
        if len(parts) != 2 or not parts[1].isdecimal() or not 1 <= int(parts[1]) <= len(RAFDB_NAMES):
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
    lines = [(ln,) for ln in read_label_text(lst).splitlines() if ln.strip()]
    return collect(lines, row, skipped, ["src", "name", "label", "split"]), skipped


def read_ckplus(source: Path, image_root=None) -> tuple[pd.DataFrame, Counter]:
    """CK+ (Lucey et al. 2010): Emotion/S005/001/S005_001_00000011_emotion.txt (one code, 1..7 = anger, contempt,
    disgust, fear, happy, sadness, surprise) labels the peak frame cohn-kanade-images/S005/001/S005_001_00000011.png
    of its sequence: one row per labelled sequence (327 in the release), no split (choose one by subject)."""
    emo = first_existing(d for d in (source / "Emotion", source / "Emotion_labels" / "Emotion",
                                     source / "Emotion_labels") if (d.is_dir() and any(d.glob("S*"))))
    images = Path(image_root) if image_root else first_existing(source / n for n in ("cohn-kanade-images",
                                                                                     "extended-cohn-kanade-images"))
    if emo is None or images is None:
        raise UserError(f"{source}: no Emotion/ and cohn-kanade-images/ folders; point SOURCE at the CK+ release "
                        "folder that holds both (or pass --image-root for the frames)")

    def row(label_file: Path):
        try:
            code = float(read_label_text(label_file).split()[0])
        except (ValueError, IndexError, OSError):
            raise Skip("malformed emotion file") from None
        if not math.isfinite(code) or code != int(code) or not 1 <= code <= 7:
            raise Skip("emotion code not 1..7")
        rel = label_file.relative_to(emo).parent / label_file.name.replace("_emotion.txt", "")
        frame = first_existing(images / rel.with_suffix(ext) for ext in (".png", ".jpg"))
        if frame is None or not frame.resolve().is_relative_to(images.resolve()):
            raise Skip("missing image")
        return str(frame), posix_rel(frame, images), CKPLUS_NAMES[int(code)], ""

    skipped = Counter()
    files = [(f,) for f in sorted(emo.glob("S*/*/*_emotion.txt"))]
    if not files:
        raise UserError(f"{emo}: no S*/NNN/*_emotion.txt label files; is this the CK+ Emotion folder?")
    return collect(files, row, skipped, ["src", "name", "label", "split"]), skipped


READERS = {"fer2013-csv": read_fer2013_csv, "folder": read_folder, "ferplus": read_ferplus,
           "affectnet": read_affectnet, "rafdb": read_rafdb, "ckplus": read_ckplus}
