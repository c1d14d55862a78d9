"""Read the expressions of your own photos from the command line: every face of every image, its top expressions.

    python predict.py group.jpg                                      # each face's top 3 of the paper's eight
    python predict.py ~/Pictures --vocab fine_grained --out faces.csv   # every image below the folder, a row per face
    python predict.py face.png --vocab korean --top 5                # the shipped Korean list (or a name: sentence file)
    python predict.py interview.mp4 --max-frames 64 --out frames.csv # a video: its faces, frame by frame
    python predict.py interview.mp4 --plots plots/                   # and a timeline PNG per person

Each image is read as the demo's *Face -> expressions* reads an upload: MTCNN finds and aligns each face (largest
first, at most --max-faces); an image of at most 160 px is a face crop already and is read whole; with no face found
the centre square is scored and the row says so. Probabilities are the softmax over the expression list at the
model's temperature, each face averaged with its mirror image (--tta flip, the demo's default). Boxes are in the
file's own pixels (after its EXIF rotation). A video is read as the demo's *Sequence* reads one: --max-frames frames
spaced evenly, each frame's faces scored and numbered by person (a face keeps its number from frame to frame), then
an overall line per person seen in two frames or more, turn-weighted with --decay. Files that cannot be read are
skipped, one line each; nothing is written but --out and --plots.
"""
from __future__ import annotations

import argparse
import functools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from formats import refuse_output_inside
from image_files import shown_path
from logs import get_logger
from utils import IMAGE_EXTS, UserError, atomic_write, atomic_write_text, check_output_file, first_line, run_cli

log = get_logger(__name__)
OUT_FORMATS = (".csv", ".json")
COLUMNS = ("file", "frame", "time_s", "face", "person", "how", "more_faces", "x0", "y0", "x1", "y1", "detector_score")
INT_COLUMNS = ("frame", "face", "person", "x0", "y0", "x1", "y1")
HOW = {"face": "face", "crop": "face crop", "no face": "no face (centre square scored)",
       "whole": "whole image (detection off)"}


def image_paths(inputs: list[str]) -> list[Path]:
    """Files as given (any name: a non-image is skipped later with its reason) and the images and videos below
    each folder (recursive, sorted), each file once however it is named (the first name given is kept); a path that
    does not exist, or folders without any, -> UserError."""
    from index import list_images
    from video import VIDEO_EXTS
    out = []
    for given in inputs:
        p = Path(given).expanduser()
        if p.is_dir():
            out += list_images(p, IMAGE_EXTS | VIDEO_EXTS)
        elif p.is_file():
            out.append(p)
        elif p.exists():                                                # a FIFO or device: opening it blocks
            raise UserError(f"{given}: not a regular file (a pipe, device or socket); pass image files or folders")
        else:
            raise UserError(f"{given}: no such file or folder; pass image files or folders of images")
    if not out:
        raise UserError(f"no {'/'.join(sorted(IMAGE_EXTS))} images (or videos) in {', '.join(inputs)}")
    once: dict[Path, Path] = {}
    for p in out:
        once.setdefault(p.resolve(), p)                                  # one file named two ways: read once
    return list(once.values())


@functools.cache
def is_video(path: Path) -> bool:
    """Read as a video: a video extension, except a still GIF (one frame), which is a picture."""
    from video import VIDEO_EXTS
    if path.suffix.lower() != ".gif":
        return path.suffix.lower() in VIDEO_EXTS
    import warnings

    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)      # image_files' limit applies
            with Image.open(path) as im:
                return bool(getattr(im, "is_animated", False))
    except Exception:  # noqa: BLE001 -- unreadable: the video reader says why
        return True


def face_rows(res, file: Path, scale: float, names: list[str], detect: bool, frame=None, time_s=None) -> list[dict]:
    """retrieval.FaceScores -> one dict per face read (see predict_image); `scale`: decoded -> file pixels."""
    how = "crop" if res.crop else "face" if res.found else "no face" if detect else "whole"
    rows = []
    for i, (box, p) in enumerate(zip(res.boxes if res.found else [None], res.probs), 1):    # res.probs: [F, C]
        row = dict(file=str(file), frame=frame, time_s=time_s, face=i, person=None, how=how, more_faces=res.more)
        row.update(zip(("x0", "y0", "x1", "y1"), [round(v * scale) for v in (box.x0, box.y0, box.x1, box.y1)]
                       if box else [None] * 4))
        row["detector_score"] = round(float(box.score), 4) if box else None
        row.update(zip(names, (round(float(v), 5) for v in p)))
        rows.append(row)
    return rows


def predict_image(engine, path: Path, names: list[str], sentences: list[str], detect: bool = True,
                  max_faces: int = 5) -> list[dict]:
    """One dict per face read in the image at `path` (largest first; one row when none is found or the file is a
    face crop): file, face (1, 2, ...), how, the box in file pixels (None when the whole image or its centre
    square was read without a face), a probability per expression name. Unreadable -> UserError."""
    from faces import DECODE_SIDE
    from image_files import safe_open_image
    from retrieval import rank_faces
    photo = safe_open_image(path, max_side=DECODE_SIDE)
    res = rank_faces(engine, photo, sentences, detect=detect, max_faces=max_faces, name=str(path))
    return face_rows(res, path, photo.info["file_size"][0] / photo.width, names, detect)   # decoded -> file


def predict_video(engine, path: Path, names: list[str], sentences: list[str], detect: bool = True,
                  max_faces: int = 5, max_frames: int = 32) -> list[dict]:
    """predict_image for each of up to max_frames frames spaced evenly over the video, with its frame index and
    time, boxes in the video's pixels, and a `person` number that follows each face from frame to frame
    (sequence.track_faces; a frame read whole is person 1, a frame without a face has none). Unreadable ->
    UserError."""
    from retrieval import rank_faces
    from video import video_frames
    from sequence import track_faces
    rows, notes = [], []
    sampled = video_frames(path, max_frames, notes=notes)
    for note in notes:                                                # cut short: sampled from what is there
        log.warning(note)
    for f in sampled:
        res = rank_faces(engine, f.image, sentences, detect=detect, max_faces=max_faces)
        rows += face_rows(res, path, f.size[0] / f.image.width, names, detect, f.index, f.time_s)
    frames = sorted({r["frame"] for r in rows})
    found = [[r for r in rows if r["frame"] == k and r["how"] == "face"] for k in frames]    # per frame, its faces
    for got, ids in zip(found, track_faces([[(r["x0"], r["y0"], r["x1"], r["y1"]) for r in fr] for fr in found])):
        for r, person in zip(got, ids):
            r["person"] = person
    for r in rows:
        if r["how"] in ("crop", "whole"):
            r["person"] = 1
    return rows


def person_groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """A video's rows grouped for its overall lines and plots: (label, rows) per person seen in two frames or more,
    or, when no one is, one group of the largest face (row face 1) of each frame."""
    frames = sum(r["face"] == 1 for r in rows)
    groups = []
    for p in sorted({r["person"] for r in rows if r["person"] is not None}):
        got = [r for r in rows if r["person"] == p]
        if len(got) > 1:
            groups.append((f"person {p}, in {len(got)} of {frames} frames", got))
    return groups or [(f"{frames} frames (largest face of each)", [r for r in rows if r["face"] == 1])]


def overall_lines(rows: list[dict], names: list[str], top: int, decay: float) -> list[str]:
    """A video's `overall` lines: sequence.sequence_scores over each group of person_groups."""
    from sequence import sequence_scores
    lines = []
    for label, got in person_groups(rows):
        overall, w = sequence_scores([[r[n] for n in names] for r in got], decay)          # [C], [T]
        best = np.argsort(-overall, kind="stable")[:top]
        lines.append(f"{shown_path(rows[0]['file'])}  overall, {label} (decay {decay:g}, the last frame weighs "
                     f"{w[-1]:.2f}): "
                     + "  ".join(f"{names[i]} {overall[i]:.2f}" for i in best))
    return lines


def write_plots(rows: list[dict], names: list[str], decay: float, folder: Path, taken: set[str]) -> list[Path]:
    """--plots: a timeline PNG (sequence.timeline_figure) per group of person_groups, named after the video and
    the person (`clip_person2.png`; `clip-2_person2.png` for a second clip.* in one run), written atomically."""
    from sequence import plot_font_note, timeline_figure
    stem = Path(rows[0]["file"]).stem
    base, k = stem, 1
    while base in taken:
        k += 1
        base = f"{stem}-{k}"
    taken.add(base)
    out = []
    for label, got in person_groups(rows):
        fig = timeline_figure([[r[n] for n in names] for r in got], names, top=5, decay=decay,
                              times=[r.get("time_s") for r in got])              # seconds when the file has a rate
        title = f"{Path(rows[0]['file']).name}: {label} (decay {decay:g})"
        fig.axes[0].set_title(title, fontsize="medium")
        if note := plot_font_note([*names, title]):
            _warn_once(f"--plots: {note}")
        who = f"person{got[0]['person']}" if label.startswith("person") else "frames"
        path = folder / f"{base}_{who}.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        out.append(path)
    return out


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def face_line(row: dict, names: list[str], top: int) -> str:
    """`group.jpg  face 2 at 120,44-532,456: happiness 0.91  surprise 0.04  neutral 0.02`"""
    probs = np.array([row[n] for n in names])
    best = np.argsort(-probs, kind="stable")[:top]
    who = f"person {row['person']}" if row["frame"] is not None and row["person"] else f"face {row['face']}"
    where = (f"{who} at {row['x0']},{row['y0']}-{row['x1']},{row['y1']}" if row["how"] == "face"
             else HOW[row["how"]])
    if row["frame"] is not None:
        where = f"frame {row['frame']}" + (f" ({row['time_s']:.2f} s)" if row["time_s"] is not None else "") \
            + f" {where}"
    return f"{shown_path(row['file'])}  {where}: " + "  ".join(f"{names[i]} {probs[i]:.2f}" for i in best)


def write_table(rows: list[dict], out: Path) -> None:
    """--out: CSV (one row per face; UTF-8 with a byte-order mark, which spreadsheets need for Korean names) or a
    JSON list, written atomically."""
    if out.suffix.lower() == ".json":
        atomic_write_text(out, json.dumps(rows, indent=1, ensure_ascii=False))
    else:
        table = pd.DataFrame(rows)
        for c in INT_COLUMNS:                                             # 12, not 12.0, beside empty cells
            table[c] = table[c].astype("Int64")
        atomic_write(out, lambda tmp: table.to_csv(tmp, index=False, encoding="utf-8-sig"))


def _n(k: int, one: str, many: str) -> str:
    return f"{k} {one if k == 1 else many}"


def summary_line(rows: list[dict], skipped: int | dict, files: int, videos: int = 0) -> str:
    """`12 images: 9 faces found in 7 photos, 2 photos without a face, 1 face crop read whole, 2 skipped
    (unreadable), 1 refused (too small)` (skipped: a count of unreadable files or {skip_reason: count}); with
    videos among the files (`videos` of them), each frame read counts as a picture (`2 images and 1 video, 64 video
    frames: ... in 60 pictures`), and an unreadable video is still counted as a video."""
    firsts = [r["how"] for r in rows if r["face"] == 1]                   # one per image or video frame
    frames = sum(r["frame"] is not None for r in rows if r["face"] == 1)
    one, many = ("picture", "pictures") if videos else ("photo", "photos")
    faces = sum(r["how"] == "face" for r in rows)
    parts = [f"{_n(faces, 'face', 'faces')} found in {_n(firsts.count('face'), one, many)}"]
    for how, o, m in (("no face", f"{one} without a face", f"{many} without a face"),
                      ("crop", "face crop read whole", "face crops read whole"),
                      ("whole", f"{one} read whole (--no-detect)", f"{many} read whole (--no-detect)")):
        if firsts.count(how):
            parts.append(_n(firsts.count(how), o, m))
    for reason, k in ({"unreadable": skipped} if isinstance(skipped, int) else skipped).items():
        if k:
            parts.append(f"{k} skipped (unreadable)" if reason == "unreadable" else f"{k} {reason}")
    head = " and ".join(_n(k, o, m) for k, o, m in ((files - videos, "image", "images"), (videos, "video", "videos"))
                        if k)
    if videos:
        head += f", {_n(frames, 'video frame', 'video frames')}"
    return f"{head}: " + ", ".join(parts)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders (recursive)")
    ap.add_argument("--checkpoint", help="default: model_final.pth in the project root, else the bundled model")
    ap.add_argument("--vocab", default="paper", help="expression list: paper, fine_grained, korean, or a text file "
                    "of `name: sentence` lines (what the demo's Save as a text file writes)")
    ap.add_argument("--top", type=int, default=3, help="expressions printed per face (--out has them all)")
    ap.add_argument("--max-faces", type=int, default=5, help="faces read per photo, largest first")
    ap.add_argument("--max-frames", type=int, default=32, help="frames read per video, spaced evenly")
    ap.add_argument("--decay", type=float, default=0.5, help="a video's overall line: 1 = plain mean over frames, "
                    "0 = last frame only (the demo's Sequence slider)")
    ap.add_argument("--no-detect", action="store_true", help="read each image whole (already cropped faces)")
    ap.add_argument("--tta", choices=["flip", "none"], default="flip", help="flip: each face averaged with its "
                    "mirror image (the demo's default)")
    ap.add_argument("--out", help=f"write every face's probabilities for every expression here ({', '.join(OUT_FORMATS)})")
    ap.add_argument("--plots", metavar="FOLDER", help="videos: write a timeline PNG per person here (the demo's "
                    "Sequence plot; made if missing)")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    if a.top < 1 or a.max_faces < 1 or a.max_frames < 1:
        raise UserError("--top, --max-faces and --max-frames must be at least 1")
    if not 0 <= a.decay <= 1:
        raise UserError(f"--decay {a.decay}: give a number from 0 (last frame only) to 1 (plain mean)")
    for flag, given in (("--out", a.out), ("--plots", a.plots)):
        if given is not None and not given.strip():
            what = "file" if flag == "--out" else "folder"
            raise UserError(f"{flag} {given!r}: an empty path; give a {what} or leave {flag} out")
    if a.plots and Path(a.plots).exists() and not Path(a.plots).is_dir():
        raise UserError(f"--plots {a.plots}: is a file; give a folder for the timeline PNGs")
    if a.plots:                                   # its PNGs would be read as photos by a later run over the input
        refuse_output_inside(a.plots, "--plots", [i for i in a.inputs if Path(i).expanduser().is_dir()], "as photos")
    if a.out:
        check_output_file(a.out, "--out")                                   # before the work, not after it
        if Path(a.out).suffix.lower() not in OUT_FORMATS:
            raise UserError(f"--out {a.out}: name a .csv or .json file")
    return a


def skip_reason(message: str) -> str:
    """How the summary counts a skipped file: refused for its size (faces.MIN_SIDE, image_files' pixel and
    decompression-bomb limits), or unreadable."""
    if "too small" in message:
        return "refused (too small)"
    return "refused (too large)" if "pixel limit" in message or "decompression bomb" in message else "unreadable"


def read_one(engine, path: Path, names: list[str], sentences: list[str], a, plot_names: set[str],
             skips: Counter) -> list[dict] | None:
    """One file's rows, printed as they come (None: skipped, with one line saying why, its skip_reason counted in
    `skips`). An unexpected error in one file skips that file with its type named, so a long run over a big folder
    never loses the rest."""
    video = is_video(path)
    try:
        got = (predict_video(engine, path, names, sentences, not a.no_detect, a.max_faces, a.max_frames)
               if video else predict_image(engine, path, names, sentences, not a.no_detect, a.max_faces))
    except UserError as e:
        log.warning(f"skipped {shown_path(e)}")
        skips[skip_reason(str(e))] += 1
        return None
    except Exception as e:  # noqa: BLE001 -- one odd file must not end a run over thousands
        log.warning(f"skipped {shown_path(path)}: unexpected {type(e).__name__} ({first_line(e, 120)}); "
                    "please report it")
        skips["unreadable"] += 1
        return None
    for row in got:
        print(face_line(row, names, a.top), flush=True)
    if video and sum(r["face"] == 1 for r in got) > 1:                   # a one-frame GIF is a picture
        print("\n".join(overall_lines(got, names, a.top, a.decay)), flush=True)
        if a.plots:
            try:
                for p in write_plots(got, names, a.decay, Path(a.plots), plot_names):
                    log.info(f"wrote {p}")
            except (OSError, UserError) as e:                           # the rows and --out are still kept
                log.warning(f"--plots {a.plots}: could not write {path.name}'s timeline ({first_line(e, 120)})")
    return got


def main(argv=None) -> int:
    a = parse_args(argv)
    from retrieval import Engine
    from served_model import choose_checkpoint
    from vocab import load_vocab
    items = load_vocab(a.vocab)
    names, sentences = [n for n, _ in items], [s for _, s in items]
    taken = [n for n in names if n in COLUMNS]
    if taken:
        raise UserError(f"--vocab {a.vocab}: expression name `{taken[0]}` is also a column of the table "
                        f"({', '.join(COLUMNS)}); rename it")
    paths = image_paths(a.inputs)
    checkpoint, why = choose_checkpoint(a.checkpoint)
    log.info(f"model: {checkpoint} ({why}); {_n(len(paths), 'file', 'files')}; expressions: {a.vocab} "
             f"({len(names)})")
    engine = Engine.load(checkpoint, None, a.device, tta=a.tta == "flip")
    rows, skipped, plot_names = [], Counter(), set()                 # plot_names: --plots names taken so far
    try:
        for path in paths:
            rows += read_one(engine, path, names, sentences, a, plot_names, skipped) or []
    except KeyboardInterrupt:                                      # what was read so far is kept, then exit 130
        if a.out and rows:
            write_table(rows, Path(a.out))
            log.error(f"interrupted: wrote the {len(rows)} rows read so far to {a.out}")
        raise
    videos = sum(map(is_video, paths))
    log.info(summary_line(rows, skipped, len(paths), videos))
    if not rows:
        what = ("video" if videos else "image") if len(paths) == 1 else "files" if videos else "images"
        raise UserError(f"the {what} could not be read (the reason is above); nothing written" if len(paths) == 1
                        else f"none of the {len(paths)} {what} could be read (each is named above); nothing written")
    if a.out:
        write_table(rows, Path(a.out))
        log.info(f"wrote {len(rows)} rows to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
