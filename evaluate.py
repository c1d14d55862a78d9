"""Evaluate a checkpoint on labelled faces: zero-shot classification through text prompts (or the CE baseline's
classifier), text<->image retrieval, unseen-class AP and a seen/unseen score calibration.

  python evaluate.py --checkpoint model_final.pth --data DIR|captions.csv|FOLDER [--split test] [--prompts paper|rich|PATH]
                     [--json out.json] [--confusion cm.png] [--unseen surprise,...] [--compare-prompts paper,rich]

DATA is a folder holding captions.csv, a captions.csv itself, or an image folder laid out SPLIT/CLASS/*.png or
CLASS/*.png. The last printed line is a one-line JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import metrics
from captions import CANONICAL, canonical_name, load_caption_bank
from config import config_to_dict, make_config
from dataset import class_texts, read_captions
from eval_report import report_text, summary
from embed import classifier_logits, embed_images, text_prototypes
from precision import autocast_for
from faces import CROP_MAX_SIDE, is_crop_sized
from logs import get_logger
from photos import FACES_MODES, FaceReader
from served_model import choose_checkpoint
from formats import first_row_per_file, read_folder, refuse_output_inside
from utils import IMAGE_EXTS, UserError, atomic_write_text, check_output_file, pick_device, run_cli

log = get_logger(__name__)
DATA_WANTS = ("evaluate.py --data takes a DIR holding captions.csv (`--data .` reads ./captions.csv), a captions.csv "
              "file, or an image folder laid out SPLIT/CLASS/*.png or CLASS/*.png")
SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}


# ----------------------------------------------------------------------------- data

def read_data(data: str) -> tuple[pd.DataFrame, dict]:
    """DATA -> (table with path,label,split; skipped counts). captions.csv paths resolve as in training."""
    p = Path(data)
    if p.is_file() or (p.is_dir() and (p / "captions.csv").is_file()):
        folder, name = (p.parent, p.name) if p.is_file() else (p, "captions.csv")
        df = read_captions(make_config(dict(data=str(folder), captions=name)), quiet=True, need_caption=False)
        skipped = dict(df.attrs["skipped"])         # missing files, relative paths outside the folder
        if not (df["label"] != "").any():
            raise UserError(f"{folder / name}: no labels; classification needs a `label` column (a class name per "
                            "image, e.g. happiness)")
    elif p.is_dir():
        df, folder_skips = read_folder(Path(os.path.abspath(p)), wants=DATA_WANTS)
        df = df.rename(columns={"src": "path"})
        skipped = {"image not inside a class folder": folder_skips.get("image not inside a class folder", 0)}
    else:
        raise UserError(f"{data}: no such file or folder; {DATA_WANTS}")
    df = df.assign(label=[canonical_name(x) if str(x).strip() else "" for x in df["label"]],
                   split=[SPLIT_ALIASES.get(s, s) for s in df.get("split", pd.Series("", index=df.index))
                          .astype(str).str.strip().str.lower()])
    skipped["no label"] = int((df["label"] == "").sum())
    return df[df["label"] != ""].reset_index(drop=True), skipped


def refuse_overwriting_inputs(outputs: dict, data, table: pd.DataFrame, checkpoint) -> None:
    """An output naming a file this evaluation reads (the captions CSV, an image of any split, the checkpoint) ->
    UserError, before any work: `--json data/captions.csv` would replace the data with the report. An image output
    (--confusion) inside an image-folder dataset too: the next run would score it as a face."""
    if not any(outputs.values()):
        return
    p = Path(data)
    for flag in [f for f, o in outputs.items() if o and Path(o).suffix.lower() in IMAGE_EXTS]:
        if p.is_dir() and not (p / "captions.csv").is_file():                # an image folder: all of it is read
            refuse_output_inside(outputs[flag], flag, [data], "as a face")
    reads = {Path(x).resolve() for x in table["path"]}
    reads |= {q.resolve() for q in (p if p.is_file() else p / "captions.csv", Path(checkpoint)) if q.is_file()}
    for flag, out in outputs.items():
        if out and Path(out).resolve() in reads:
            raise UserError(f"{flag} {out}: is a file this evaluation reads (its data or checkpoint); give another "
                            f"{flag} (nothing was written)")


def pick_split(df: pd.DataFrame, split: str | None) -> tuple[pd.DataFrame, str]:
    """Rows of `split` ('all' = every row); default: test if present, else val, else all. -> (rows, description)."""
    have = [s for s in dict.fromkeys(df["split"]) if s]
    if split is None:
        split = next((s for s in ("test", "val") if s in have), "all")
        how = f"{split} (default; splits in data: {', '.join(have) or 'none'})"
    else:
        split = SPLIT_ALIASES.get(split.lower(), split.lower())
        how = split
    if split == "all":
        return df, how
    rows = df[df["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise UserError(f"--split {split}: no rows with that split; the data has: {', '.join(have) or 'no split column'}"
                        " (or use --split all)")
    return rows, how


# ----------------------------------------------------------------------------- prompts and priors

def get_bank(name: str, table: pd.DataFrame) -> dict[str, list[str]]:
    """Prompt sentences per class: a caption bank (paper, rich, CSV) or `data` = the table's own captions."""
    if name != "data":
        return load_caption_bank(name)
    if "caption" not in table or not (table["caption"] != "").any():
        raise UserError("--prompts data needs captions (a captions.csv with a caption column; an image folder has "
                        "none); use paper or rich")
    return class_texts(table[table["caption"] != ""])


def class_order(names) -> list[str]:
    """Canonical (paper) order first, then other names in first-seen order."""
    names = list(dict.fromkeys(names))
    return [c for c in CANONICAL if c in names] + [c for c in names if c not in CANONICAL]


def class_prior(label_counts: dict | None, table: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """Training label frequencies of the scored classes ([C], sums to 1): the checkpoint's label_counts, else the
    data's `train` rows. A class never trained on (unseen protocol) gets the mean frequency of the others."""
    counts = {canonical_name(k): v for k, v in (label_counts or {}).items()}
    if not counts:
        counts = table.loc[table["split"] == "train", "label"].value_counts().to_dict()
    f = np.array([counts.get(c, 0) for c in classes], np.float64)
    if not (f > 0).any():
        raise UserError(f"--prior train: no training label counts for the scored classes ({', '.join(classes)}) in "
                        "the checkpoint (older checkpoints have none) or in the train rows of --data; pass a "
                        "captions.csv with its train split, or drop --prior")
    f[f == 0] = f[f > 0].mean()
    return f / f.sum()


def calibrate(scores: np.ndarray) -> np.ndarray:
    """Seen/unseen calibration: subtract each class column's mean score over the evaluated images ([N,C])."""
    return scores - scores.mean(axis=0, keepdims=True)


# ----------------------------------------------------------------------------- metrics

def unseen_report(scores: np.ndarray, y: np.ndarray, classes: list[str], unseen: list[str],
                  recall: dict, cal_recall: dict) -> dict:
    """Per unseen class: AP of its prompt over all images (text->image), base rate, AP/base rate, recalls."""
    out = {}
    for name in unseen:
        j = classes.index(name)
        rel = y == j
        ap = float(metrics.average_precision(scores[:, j][None], rel[None])[0]) if rel.any() else None
        base = float(rel.mean()) if len(y) else None
        out[name] = dict(n=int(rel.sum()), ap=ap, base_rate=base, ap_over_base=ap / base if ap is not None and base else None,
                         recall=recall.get(name), calibrated_recall=cal_recall.get(name))
    return out


def score_report(scores: np.ndarray, y: np.ndarray, classes: list[str], unseen: list[str]) -> dict:
    """Classification metrics, the calibrated variant (top1/uar/macro_f1, per-class recall) and the unseen block."""
    rep = metrics.classification_report(scores, y, classes)
    cal = metrics.classification_report(calibrate(scores), y, classes)
    rep["calibrated"] = {k: cal[k] for k in ("top1", "uar", "macro_f1", "per_class_recall")}
    if unseen:
        rep["unseen"] = unseen_report(scores, y, classes, unseen, rep["per_class_recall"], cal["per_class_recall"])
    return rep


def default_faces(data) -> str:
    """--faces when not given: 'crops' for a captions.csv (its faces are read whole, as training reads them; a
    dataset of photos is cropped by prepare.py --detect-faces), 'auto' for an image folder (as the demo reads it)."""
    p = Path(data)
    return "crops" if p.is_file() or (p / "captions.csv").is_file() else "auto"


def photo_files(paths: list, n: int = 50) -> bool:
    """True when most of the first n readable files look like photos, not face crops: larger than a face crop
    (faces.is_crop_sized) and not square (prepare.py --detect-faces, AffectNet and RAF-DB crops are square; CK+'s
    640x490 frames and phone photos are not)."""
    from PIL import Image
    sizes = []
    for p in paths[:n]:
        try:
            with Image.open(p) as im:
                sizes.append(im.size)
        except Exception:  # noqa: BLE001 -- unreadable files are counted by the evaluation itself
            pass
    photo = [not is_crop_sized((w, h)) and abs(w / max(h, 1) - 1) > 0.1 for w, h in sizes]
    return sum(photo) > len(sizes) / 2


def parse_list(text: str | None) -> list[str]:
    return [canonical_name(s) for s in (text or "").split(",") if s.strip()]


def evaluate(checkpoint, data, split: str | None = None, prompts: str = "paper", unseen=(), compare=None,
             batch_size: int = 64, device: str = "auto", all_classes: bool = False, confusion=None,
             amp: str | None = None, tta: bool = False, prior: bool = False, faces: str | None = None,
             outputs: dict | None = None) -> dict:
    """Evaluate `checkpoint` on `data`; returns every metric as a JSON-safe dict (see the module docstring).
    outputs: {flag: path} the caller will write (with `confusion`), refused when they name a file this run reads."""
    from checkpoint import create_model_and_transforms, read_checkpoint
    table, skipped = read_data(str(data))                       # the data and outputs checked before the model loads
    refuse_overwriting_inputs({"--confusion": confusion, **(outputs or {})}, data, table, checkpoint)
    df, split_how = pick_split(table, split)
    df, dup, clash = first_row_per_file(df)                   # a captions.csv may list an image once per caption
    if dup:
        log.warning(f"{data}: {dup} rows name an image an earlier row names and are dropped: each image is scored "
                    f"once, under its first row's label{f'; {clash} images have rows with other labels' * bool(clash)}")
    skipped["duplicate row of an image"] = dup
    dev, ck = pick_device(device), read_checkpoint(checkpoint)
    model, _, preprocess = create_model_and_transforms(ck, dev, path=checkpoint)
    cfg = model.cfg
    faces = faces or default_faces(data)
    reader = FaceReader(preprocess, faces, cfg.grayscale)       # the face each file gives, as the demo reads it
    ce = cfg.objective == "ce"
    if ce and prior:
        raise UserError("--prior applies to text-prompt scoring; a CE classifier's logits already carry its "
                        "training label frequencies")
    bank = None if ce else get_bank(prompts, table)
    known = [canonical_name(c) for c in model.class_names] if ce else list(bank)
    classes = class_order((known if all_classes else []) + list(df["label"]))
    if len(classes) < 2 and len(set(known) | set(classes)) > 1:   # one class alone scores 1.0 on every metric
        log.warning(f"{data}: the scored images hold one class ({classes[0]}); scored against all the classes the "
                    f"{'classifier' if ce else 'prompt set'} knows, as --all-classes does")
        classes = class_order(known + classes)
    elif len(classes) < 2:
        raise UserError(f"{data}: one class ({classes[0]}), none other in --prompts {prompts}; scoring needs two")
    unseen = parse_list(unseen) if isinstance(unseen, str) else [canonical_name(u) for u in unseen]
    bad = [c for c in unseen if c not in classes]
    if bad:
        raise UserError(f"--unseen {', '.join(bad)}: not a scored class; known: {', '.join(classes)}")
    if ce and (missing := [c for c in classes if c not in known]):
        raise UserError(f"class(es) {', '.join(missing)} unknown to this classifier checkpoint; "
                        f"it was trained on: {', '.join(known)}")
    autocast, dtype = autocast_for(cfg, dev, amp)
    protos = None if ce else text_prototypes(model, bank, classes, autocast)     # [C,D]; checks the bank first
    sets = list(compare) if len(compare or []) > 1 else [prompts, *(compare or [])]
    banks = {s: get_bank(s, table) for s in sets} if compare and not ce else {}
    if faces == "crops" and photo_files(list(df["path"])):
        log.warning(f"{data}: most images are photos (larger than {CROP_MAX_SIDE} px, not square) and are scored whole "
                    "(--faces crops); --faces auto scores the face in each, as the demo does")
    emb, ok = embed_images(model, list(df["path"]), reader, dev, batch_size, autocast, tta)
    skipped["unreadable image"] = int((~ok).sum())
    y = np.array([classes.index(c) for c in df.loc[ok, "label"]])
    if not len(y):
        raise UserError(f"{data}: none of the {len(df)} selected images could be read")
    out = dict(checkpoint=str(checkpoint), config=config_to_dict(cfg), data=str(data), split=split_how,
               n_images=len(y), skipped=skipped, skipped_total=sum(skipped.values()), classes=classes,
               precision=str(dtype).replace("torch.", "") if dtype else "float32", device=str(dev),
               tta="flip" if tta else None, prior=None, faces=dict(mode=faces, **reader.counts))
    if ce:
        out.update(ce_scores(model, emb, y, classes, known, unseen))
    else:
        scores = metrics.zero_shot_scores(emb, protos)             # [N,C]
        if prior:                                                   # logit adjustment by training frequencies
            p = class_prior(ck.get("label_counts"), table, classes)
            scores = metrics.prior_adjusted(scores, model.scale().item(), p)
            out["prior"] = dict(zip(classes, np.round(p, 4).tolist()))
        out.update(scoring=f"text prompts ({prompts})", prompts=prompts, **score_report(scores, y, classes, unseen),
                   retrieval=metrics.retrieval_report(emb, y, protos),
                   compare_prompts=compare_prompts(model, emb, y, classes, banks, autocast) if compare else None)
    if len(set(y.tolist())) < 2:    # one class: every image is relevant to it, and calibration removes the signal
        out.update(retrieval=None, calibrated=None)
    if confusion:
        out["confusion_png"] = str(metrics.save_confusion_png(out["confusion"], classes, confusion))
    return out


def ce_scores(model, emb: np.ndarray, y: np.ndarray, classes: list[str], known: list[str], unseen) -> dict:
    """CE baseline: the trained classifier's logits over the image embedding, columns of the scored classes."""
    scores = classifier_logits(model, emb)[:, [known.index(c) for c in classes]]          # [N,C]
    return dict(scoring="classifier head (objective=ce; no text prompts, retrieval skipped)", prompts=None,
                **score_report(scores, y, classes, unseen), retrieval=None, compare_prompts=None)


def compare_prompts(model, emb, y, classes, banks: dict[str, dict], autocast) -> dict:
    """Top-1/UAR with each prompt set on the same image embeddings; drop = the first set's minus each other's."""
    res = {}
    for name, bank in banks.items():
        rep = metrics.classification_report(
            metrics.zero_shot_scores(emb, text_prototypes(model, bank, classes, autocast)), y, classes)
        res[name] = dict(top1=rep["top1"], uar=rep["uar"], macro_f1=rep["macro_f1"])
    ref = res[next(iter(banks))]
    for name in list(res)[1:]:
        res[name].update(top1_drop=ref["top1"] - res[name]["top1"], uar_drop=ref["uar"] - res[name]["uar"])
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="default: model_final.pth in the project root, else the bundled model "
                   "(what `python demo.py` serves)")
    p.add_argument("--data", required=True, help="DIR with captions.csv, a captions.csv, or SPLIT/CLASS/*.png folder")
    p.add_argument("--split", help="train/val/test/all (default: test if present, else val, else all rows)")
    p.add_argument("--prompts", default="paper", help="class sentences: paper, rich, a CSV label,caption, or data (the "
                   "table's own captions, as training's validation does)")
    p.add_argument("--compare-prompts", metavar="A,B", help="also score with these prompt sets; prints the drop")
    p.add_argument("--unseen", metavar="CLS,...", help="classes to report zero-shot AP / base rate / recall for")
    p.add_argument("--all-classes", action="store_true", help="score every class of the prompt bank (or classifier); "
                   "automatic, with a note, when the data holds one class (one class would score 1.0 everywhere)")
    p.add_argument("--json", help="write the full result here")
    p.add_argument("--confusion", help="write the confusion matrix PNG here")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], help="override the checkpoint's autocast setting")
    p.add_argument("--tta", choices=["none", "flip"], default="none",
                   help="flip: average each face's embedding with its mirror image's (test-time augmentation)")
    p.add_argument("--prior", choices=["none", "train"], default="none",
                   help="train: add log(training label frequency) to each class's logit (scale x cosine), the "
                        "Bayes decision for test faces distributed like the training ones; raises top-1, lowers UAR")
    p.add_argument("--faces", choices=FACES_MODES,
                   help=f"auto: files of at most {CROP_MAX_SIDE} px are face crops, read whole; larger ones are photos, "
                        "scored on their largest face as the demo finds it (MTCNN, aligned); crops/photos force either. "
                        "Default: crops for a captions.csv (read as training reads it), auto for an image folder")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    for flag, out, ext in (("--json", a.json, ".json"), ("--confusion", a.confusion, ".png")):
        if out is not None and not out.strip():
            raise UserError(f"{flag} {out!r}: an empty path; give a file name (e.g. {flag} result{ext}) or leave "
                            f"{flag} out")
        if out:
            check_output_file(out, flag)        # before the evaluation, not after it
            if Path(out).suffix.lower() != ext:
                raise UserError(f"{flag} {out}: name a {ext} file")
    compare = [s.strip() for s in (a.compare_prompts or "").split(",") if s.strip()]
    checkpoint, why = choose_checkpoint(a.checkpoint)
    if not a.checkpoint:
        log.info(f"no --checkpoint: {checkpoint.name}, {why}")
    res = evaluate(checkpoint, a.data, a.split, a.prompts, parse_list(a.unseen), compare, a.batch_size,
                   a.device, a.all_classes, a.confusion, a.amp, a.tta == "flip",
                   a.prior == "train", a.faces, outputs={"--json": a.json})
    if a.confusion:
        log.info(f"wrote {a.confusion}")
    print(report_text(res))
    if a.json:
        atomic_write_text(a.json, json.dumps(res, indent=1))
        log.info(f"wrote {a.json}")
    print(json.dumps(summary(res)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
