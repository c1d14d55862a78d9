"""FER+ benchmark: train on FER2013Train with the eight-class vote labels, evaluate on FER2013Valid, write a section.

    python bench/ferplus.py                                   # runs main + unseen (contempt left out), 20 epochs
    python bench/ferplus.py --runs main --extra "--sampler balanced"     # an ablation row (own run folder)
    python bench/ferplus.py --checkpoint runs/x/model_final.pth         # evaluate a checkpoint, no training
    python bench/ferplus.py --limit 600 --epochs 1 --min-pair-faces 3 --work runs/ferplus_smoke   # smoke run

FER2013Valid (the FER-2013 PublicTest faces) is the evaluation split: it is renamed `test` in the bench's copy of
captions.csv; model selection uses 3% of train (--val-fraction; stratified, seeded), so training never sees it. Every
evaluation scores through sentences (cosine to class prototypes, no prior): majority-vote top-1/UAR with the paper
sentences, agreement with the annotators' vote distributions, unseen phrasing (captions/everyday.csv), the unseen
class (contempt), compound expressions (captions/compound.csv) and FER-2013 seven-class top-1 on the same faces.
Results (JSON per run) go to --work; the markdown section `## FER+` is replaced (or appended) in --out
(default: WORK/report.md; the rest of the file is kept).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import evaluate  # noqa: E402
import metrics  # noqa: E402
import prepare  # noqa: E402
import train  # noqa: E402
from captions import CANONICAL, canonical_name, load_caption_bank  # noqa: E402
from checkpoint import create_model_and_transforms, read_checkpoint  # noqa: E402
from config import add_config_args  # noqa: E402
from embed import embed_images, text_prototypes  # noqa: E402
from formats import FERPLUS_DIRS, FERPLUS_VOTES, FORMAT_HINT, USAGE_SPLITS, read_folder  # noqa: E402
from precision import autocast_for  # noqa: E402
from utils import UserError, pick_device, read_csv_checked, run_cli  # noqa: E402

from ferplus_report import section, upsert_section  # noqa: E402
from ferplus_sentences import check_disjoint, load_compound, training_banks  # noqa: E402

# The training recipe of every run (the lead finalises it; --recipe replaces it, --extra appends ablation flags).
# Chosen by the ablations in BENCHMARKS.md: every class sentence each step, vote distributions as targets, the frozen
# multilingual-e5-small space as the shared space (no text head: a Korean or unseen English sentence lands where e5
# puts it), the shipped banks plus the generated English and Korean FACS banks as training sentences; the stem and
# first two stages of the image tower frozen (1.96x the throughput of last round's path, equal accuracy at equal
# epochs: BENCHMARKS.md, "Training throughput"). The bundled file's image side is trained with a variant of this
# recipe instead (all-MiniLM-L6-v2 and the paper + rich banks via --recipe, 16 epochs), then given the e5 tower by
# align_text.py --balance 0.4: the exact commands are in models/README.md. The depthwise filters stay frozen
# (2.1-2.2x the old path on 2 Intel cores, level at equal epochs: BENCHMARKS.md, "frozen depthwise filters").
# --source-side 48 changes nothing in training (the faces are 48 px) and is stored in the file: a photo's bigger face
# crop is reduced to 48 px before the model's resize, as the training faces were (BENCHMARKS.md, "source_side").
RECIPE = ["--preset", "offline", "--batch-size", "64", "--image-size", "64", "--freeze-image-stages", "2",
          "--freeze-depthwise", "true", "--source-side", "48",
          "--caption-bank", "paper,rich,captions/facs_en.csv,captions/facs_ko.csv",
          "--caption-sampling", "random", "--positives", "label", "--targets", "soft", "--contrast", "classes",
          "--text-model", "pkg:multilingual-e5-small", "--freeze-text", "true",
          "--text-head", "none", "--lr-image", "1e-3", "--warmup-steps", "200", "--select-by", "val_top1",
          "--seed", "0"]
RUNS = {"main": [], "unseen": ["--exclude-classes", "contempt"]}
UNSEEN = "contempt"
CLASSES = list(CANONICAL)                        # the eight FER+ emotions, paper order
EVERYDAY = ROOT / "captions" / "everyday.csv"    # evaluation only: informal phrasings, label,caption
EVERYDAY_KO = ROOT / "captions" / "everyday_ko.csv"   # evaluation only: their Korean counterpart
VAL_FRACTION = 0.03                              # of train, for model selection
SMOOTHING = 0.1                                  # label smoothing of the one-hot majority reference


# ----------------------------------------------------------------------------- data

def vote_table(ferplus: Path) -> dict[tuple[str, str], list[int]]:
    """fer2013new.csv -> {(image folder, file name): eight emotion vote counts in CLASSES order}."""
    raw = read_csv_checked(ferplus / "fer2013new.csv", ["Usage", "Image name", *FERPLUS_VOTES], hint=FORMAT_HINT)
    out = {}
    for row in raw.itertuples(index=False):
        split = USAGE_SPLITS.get(str(row[0]).strip().lower())
        if split and str(row[1]).strip():
            v = dict(zip(FERPLUS_VOTES, row[2:]))
            out[(FERPLUS_DIRS[split], str(row[1]).strip())] = [int(float(v[c] or 0)) for c in CLASSES]
    return out


def data_name(val_fraction: float) -> str:
    """The data folder of a selection split: `data` for the default 3%, `data_val10` for 10%, so that a cached split
    is never read back under another fraction."""
    return "data" if val_fraction == VAL_FRACTION else f"data_val{100 * val_fraction:g}"   # 0.101: data_val10.1


def prepare_data(ferplus: Path, work: Path, limit: int, with_sample: bool = False,
                 val_fraction: float = VAL_FRACTION) -> Path:
    """The bench's captions.csv: FER+ via prepare.py, PublicTest (val) renamed `test`, PrivateTest rows dropped,
    val_fraction of train (3%) as `val`, a `votes` column (JSON counts, CLASSES order); with_sample appends the
    bundled drawn sample (images/ + captions.csv) as training rows; `limit` keeps a split x label stratified subset."""
    data = work / data_name(val_fraction)
    if not (data / "captions.csv").is_file():
        prepared = work / "prepared"
        if not (prepared / "captions.csv").is_file():
            prepare.convert(ferplus, "ferplus", prepared, verify=False)
        df = pd.read_csv(prepared / "captions.csv", dtype=str, keep_default_na=False)
        df = df[df["split"] != "test"].assign(split=lambda d: d["split"].replace({"val": "test"}))
        train_rows = df[df["split"] == "train"]                 # model selection: 3% of train, stratified, seeded
        df.loc[train_rows.groupby("label").sample(frac=val_fraction, random_state=0).index, "split"] = "val"
        votes = vote_table(ferplus)
        keys = [(Path(p).parent.name, Path(p).name) for p in df["image"]]
        if missing := [k for k in keys if k not in votes]:
            raise UserError(f"{ferplus / 'fer2013new.csv'}: no votes for {'/'.join(missing[0])} (listed by prepare); "
                            "are the images from another FER+ release?")
        df["votes"] = [json.dumps(votes[k]) for k in keys]
        data.mkdir(parents=True, exist_ok=True)
        df.to_csv(data / "captions.csv", index=False)
    if with_sample:                                             # + the bundled drawn faces (the demo's gallery)
        data = add_sample(data, work / f"{data.name}_sample")
    if not limit:
        return data
    df = pd.read_csv(data / "captions.csv", dtype=str, keep_default_na=False)
    sub = df.groupby(["split", "label"]).sample(frac=min(1.0, limit / len(df)), random_state=0)
    data = work / f"data_{limit}"
    data.mkdir(parents=True, exist_ok=True)
    sub.to_csv(data / "captions.csv", index=False)
    return data


def add_sample(data: Path, out: Path) -> Path:
    """A copy of data/captions.csv with the bundled sample's 600 drawn faces appended as training rows (no votes:
    their target is their label)."""
    if not (out / "captions.csv").is_file():
        df = pd.read_csv(data / "captions.csv", dtype=str, keep_default_na=False)
        sample = pd.read_csv(ROOT / "captions.csv", dtype=str, keep_default_na=False)
        sample = sample.assign(image=[str(ROOT / "images" / p) for p in sample["image"]], split="train")
        out.mkdir(parents=True, exist_ok=True)
        pd.concat([df, sample], ignore_index=True).fillna("").to_csv(out / "captions.csv", index=False)
    return out


def prepare_fer2013(fer: Path, work: Path, frac: float) -> Path | None:
    """captions.csv over FER-2013's test folder (the same faces as FER2013Valid, 7 classes); None if absent."""
    if not (fer / "test").is_dir():
        return None
    df = read_folder(fer / "test")[0]
    if frac < 1:
        df = df.groupby("label").sample(frac=frac, random_state=0)
    out = work / f"fer2013_test_{frac:.4f}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"image": df["src"].astype(str), "caption": df["label"], "label": df["label"],
                  "split": "test"}).to_csv(out, index=False)
    return out


def json_rows(col: pd.Series, what: str) -> np.ndarray:
    """A JSON column (dict by class name or list in CLASSES order) -> float [N,8]; one line on a bad row."""
    rows = []
    for i, text in enumerate(col):
        try:
            v = json.loads(text)
            rows.append([float(v.get(c, 0)) for c in CLASSES] if isinstance(v, dict) else [float(x) for x in v])
        except (ValueError, TypeError, AttributeError):
            raise UserError(f"captions.csv: row {i + 2}: `{what}` is not JSON votes over {', '.join(CLASSES)} "
                            f"({str(text)[:40]!r}); rerun the bench on a fresh --work folder")
    a = np.asarray(rows, np.float64)
    if a.shape != (len(col), len(CLASSES)):
        raise UserError(f"captions.csv: `{what}` must hold {len(CLASSES)} values per row")
    return a


def eval_split(data: Path) -> pd.DataFrame:
    """The evaluation faces (split `test` = FER2013Valid) with path, label, soft [8] and votes [8] per row."""
    table, _ = evaluate.read_data(str(data))
    df, _ = evaluate.pick_split(table, "test")
    train_paths = set(table.loc[table["split"] == "train", "path"])
    assert not train_paths & set(df["path"]), "evaluation faces listed in the training split"
    return df.assign(soft=list(json_rows(df["soft_labels"], "soft_labels")),
                     votes=list(json_rows(df["votes"], "votes")))


# ----------------------------------------------------------------------------- evaluation

def closed_set(scores: dict, y: np.ndarray, unseen: list[str]) -> dict:
    """Majority-vote classification with one sentence set: plain report (+unseen block), flip top-1/UAR."""
    rep = evaluate.score_report(scores["plain"], y, CLASSES, unseen)
    flip = metrics.classification_report(scores["flip"], y, CLASSES)
    keep = ("n", "top1", "uar", "macro_f1", "per_class_recall", "confusion", "calibrated", "unseen")
    return {**{k: rep[k] for k in keep if k in rep}, "top1_flip": flip["top1"], "uar_flip": flip["uar"]}


def agreement(scale: float, scores: np.ndarray, soft: np.ndarray, y: np.ndarray) -> dict:
    """CE / KL (nats) of softmax(scale * cosine) vs the votes, and of the uniform and one-hot references."""
    n = len(y)
    return dict(model=metrics.vote_agreement(scale * scores, soft), logit_scale=scale, smoothing=SMOOTHING,
                uniform=metrics.vote_agreement(np.zeros_like(scores), soft),
                majority_smoothed=metrics.vote_agreement(metrics.onehot_logits(y, len(CLASSES), SMOOTHING), soft),
                majority_onehot=metrics.vote_agreement(metrics.onehot_logits(y, len(CLASSES)), soft),
                split_votes=float((soft[np.arange(n), y] < 1).mean()) if n else None)


def compound(model, emb: np.ndarray, paper_scores: np.ndarray, votes: np.ndarray, autocast,
             min_faces: int) -> dict:
    """Per kept pair: AP of its pair sentences vs the better single-emotion paper sentence, and the mean gain."""
    pairs = metrics.compound_pairs(votes, CLASSES, 3, min_faces)
    bank = load_compound()
    have = [p for p in pairs if p in bank]
    protos = text_prototypes(model, bank, have, autocast) if have else np.zeros((0, emb.shape[1]))
    pair_scores = metrics.zero_shot_scores(emb, protos) if have else None
    out = {}
    for k, p in enumerate(have):
        cols = [CLASSES.index(c) for c in p.split("+")]
        out[p] = dict(n=int(pairs[p].sum()), **metrics.ap_gain(pair_scores[:, k], paper_scores[:, cols], pairs[p]))
    gains = [r["gain"] for r in out.values() if r["gain"] is not None]
    return dict(pairs=out, mean_gain=float(np.mean(gains)) if gains else None, min_faces=min_faces,
                no_sentences=[p for p in pairs if p not in bank])


def fer2013_scores(model, preprocess, dev, autocast, fer_csv: Path | None) -> dict | None:
    """FER-2013 seven-class top-1/UAR on its test folder through the seven classes' paper sentences."""
    if fer_csv is None:
        return None
    df, _ = evaluate.read_data(str(fer_csv))
    classes = evaluate.class_order(df["label"])
    protos = text_prototypes(model, load_caption_bank("paper"), classes, autocast)     # [7,D]
    out = {}
    for tta in (False, True):
        emb, ok = embed_images(model, list(df["path"]), preprocess, dev, 64, autocast, tta)
        y = np.array([classes.index(c) for c in df.loc[ok, "label"]])
        rep = metrics.classification_report(metrics.zero_shot_scores(emb, protos), y, classes)
        out.update({f"top1{'_flip' * tta}": rep["top1"], f"uar{'_flip' * tta}": rep["uar"], "n": len(y)})
    return out


def evaluate_checkpoint(ckpt: Path, data: Path, fer_csv: Path | None, min_faces: int) -> dict:
    """All six evaluations of one checkpoint on the evaluation split (see the module docstring)."""
    dev, ck = pick_device("auto"), read_checkpoint(ckpt)
    model, _, preprocess = create_model_and_transforms(ck, dev, path=ckpt)
    cfg, raw_cfg = model.cfg, ck["config"]
    everyday, paper = load_caption_bank(str(EVERYDAY)), load_caption_bank("paper")
    everyday_ko = load_caption_bank(str(EVERYDAY_KO))
    check_disjoint({"everyday": everyday, "everyday_ko": everyday_ko, "compound": load_compound()},
                   training_banks(raw_cfg.get("caption_bank", ""), data))
    df = eval_split(data)
    autocast, _ = autocast_for(cfg, dev)
    emb, ok = {}, None
    for tta in (False, True):
        emb["flip" if tta else "plain"], ok = embed_images(model, list(df["path"]), preprocess, dev, 64, autocast, tta)
    df = df[ok].reset_index(drop=True)
    y = np.array([CLASSES.index(c) for c in df["label"]])
    protos = {name: text_prototypes(model, bank, CLASSES, autocast)                       # [8,D]
              for name, bank in (("paper", paper), ("everyday", everyday), ("everyday_ko", everyday_ko))}
    scores = {name: {k: metrics.zero_shot_scores(e, pr) for k, e in emb.items()} for name, pr in protos.items()}
    soft, votes = np.stack(df["soft"]), np.stack(df["votes"])
    excluded = [canonical_name(c) for c in str(raw_cfg.get("exclude_classes", "")).split(",") if c.strip()]
    return dict(n_eval=len(y), n_unreadable=int((~ok).sum()), excluded=excluded,
                paper=closed_set(scores["paper"], y, [UNSEEN]), everyday=closed_set(scores["everyday"], y, []),
                everyday_ko=closed_set(scores["everyday_ko"], y, []),
                agreement=agreement(model.scale().item(), scores["paper"]["plain"], soft, y),
                compound=compound(model, emb["plain"], scores["paper"]["plain"], votes, autocast, min_faces),
                fer2013=fer2013_scores(model, preprocess, dev, autocast, fer_csv), best_epoch=ck.get("epoch"),
                setup={k: raw_cfg.get(k) for k in ("epochs", "image_size", "batch_size", "caption_bank", "targets",
                                                   "contrast", "exclude_classes", "sampler", "ema_decay")})


# ----------------------------------------------------------------------------- runs

def unknown_flags(flags: list[str]) -> list[str]:
    """The --flags train.py does not know (e.g. the recipe names a flag this checkout lacks)."""
    ap = argparse.ArgumentParser(add_help=False)
    add_config_args(ap)
    return [f for f in ap.parse_known_args(flags)[1] if f.startswith("--")]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=]+", "-", text).strip("-")


def common_args(a) -> str:
    """The options of this invocation that change a figure, for the reproduce commands."""
    out = "" if a.recipe is None else f" --recipe {shlex.quote(a.recipe)}"
    out += f" --limit {a.limit}" if a.limit else ""
    out += f" --val-fraction {a.val_fraction:g}" if a.val_fraction != VAL_FRACTION else ""
    out += " --with-sample" if a.with_sample else ""
    out += f" --min-pair-faces {a.min_pair_faces}" if a.min_pair_faces != 20 else ""
    return out + (f" --work {a.work}" if a.work != WORK else "")


def run_plan(a) -> list[dict]:
    """Per requested run: name, folder, train.py flags (None: evaluate --checkpoint), reproduce command."""
    if a.checkpoint:
        return [dict(name=a.checkpoint, dir=Path(a.work) / f"ckpt-{slug(a.checkpoint)}", flags=None, extra="",
                     command=f"python bench/ferplus.py --checkpoint {a.checkpoint}{common_args(a)}")]
    recipe, extra, plans = RECIPE if a.recipe is None else shlex.split(a.recipe), shlex.split(a.extra), []
    for run in filter(None, a.runs.split(",")):
        if run not in RUNS:
            raise UserError(f"--runs {run}: unknown run; use {', '.join(RUNS)}")
        name = run + ("+sample" if a.with_sample else "") + (f"+{slug(a.extra)}" if extra else "")
        plans.append(dict(name=name, dir=Path(a.work) / name, flags=recipe + RUNS[run] + extra + ["--epochs",
                          str(a.epochs)], extra=a.extra, command=f"python bench/ferplus.py --runs {run} --epochs "
                          f"{a.epochs}{f' --extra {shlex.quote(a.extra)}' if extra else ''}{common_args(a)}"))
    return plans


def train_run(flags: list[str], data: Path, out: Path, workers: int) -> dict:
    """train.main on the bench data; -> training wall minutes and median throughput."""
    t0 = time.time()
    train.main(flags + ["--data", str(data), "--out-dir", str(out), "--final-path", str(out / "final.pth"),
                        "--num-workers", str(workers)])
    hist = pd.read_csv(out / "metrics.csv")
    return dict(train_minutes=round((time.time() - t0) / 60, 1), images_per_s=float(hist["images_per_s"].median()))


def run(plan: dict, a, data: Path, fer_csv: Path | None) -> dict:
    """Train (unless cached, or --checkpoint) and evaluate one run; its result.json is the cache."""
    out = plan["dir"]
    result_file = out / "result.json"
    old = json.loads(result_file.read_text()) if result_file.is_file() else None
    same = old is not None and old.get("flags") == plan["flags"] and old.get("limit") == a.limit
    if same and not (a.force or a.reeval):
        return old
    if plan["flags"] is None:
        ckpt, timing = Path(plan["name"]), {}
    elif same and a.reeval:                                  # evaluate the existing checkpoint again
        ckpt, timing = out / "final.pth", {k: old.get(k) for k in ("train_minutes", "images_per_s")}
    else:
        ckpt, timing = out / "final.pth", train_run(plan["flags"], data, out, a.workers)
    res = dict(run=plan["name"], flags=plan["flags"], extra=plan["extra"], limit=a.limit, command=plan["command"],
               **timing, **evaluate_checkpoint(ckpt, data, fer_csv, a.min_pair_faces))
    out.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(res, indent=1))
    return res


def collect(work: Path, limit: int) -> list[dict]:
    """Every finished run in --work evaluated at this --limit: main, unseen first, then by name."""
    res = [json.loads(f.read_text()) for f in sorted(work.glob("*/result.json"))]
    res = [r for r in res if r.get("limit") == limit]
    return sorted(res, key=lambda r: (r["run"] not in RUNS, list(RUNS).index(r["run"]) if r["run"] in RUNS else 0,
                                      r["run"]))


# ----------------------------------------------------------------------------- main

WORK = "runs/ferplus"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ferplus", default=str(ROOT.parent / "shared" / "data" / "ferplus"))
    ap.add_argument("--fer2013", default=str(ROOT.parent / "shared" / "data" / "fer2013"))
    ap.add_argument("--work", default=WORK)
    ap.add_argument("--out", help="markdown file whose `## FER+` section is (re)written, the rest kept (default: "
                    "WORK/report.md; BENCHMARKS.md's section also holds hand-written history, so name it only to "
                    "replace that)")
    ap.add_argument("--runs", default="main,unseen", help=f"comma list of {', '.join(RUNS)}")
    ap.add_argument("--epochs", type=int, default=20, help="20: ~50 min on 2 idle Intel cores (the shipped model: 16, see "
                    "models/README.md)")
    ap.add_argument("--with-sample", action="store_true",
                    help="also train on the bundled drawn sample (how the shipped model was made: the demo's gallery)")
    ap.add_argument("--recipe", help="train.py flags replacing RECIPE (quoted)")
    ap.add_argument("--extra", default="", help="train.py flags appended to RECIPE (quoted): an ablation row")
    ap.add_argument("--checkpoint", help="evaluate this checkpoint instead of training (row named after it)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                    help="share of FER2013Train held out (stratified, seeded) for model selection; 0.1 for ~2,800 faces")
    ap.add_argument("--limit", type=int, default=0, help="a stratified subset of this many faces (smoke runs)")
    ap.add_argument("--min-pair-faces", type=int, default=20, help="compound pairs need this many faces")
    ap.add_argument("--force", action="store_true", help="retrain runs that already have a result.json")
    ap.add_argument("--reeval", action="store_true", help="evaluate existing checkpoints again (no training)")
    a = ap.parse_args(argv)
    ferplus, work = Path(a.ferplus), Path(a.work)
    if not (ferplus / "fer2013new.csv").is_file():
        raise UserError(f"{ferplus}: FER+ not found (expected fer2013new.csv and FER2013Train/, FER2013Valid/); "
                        "pass --ferplus DIR")
    if not 0 < a.val_fraction <= 0.3:
        raise UserError(f"--val-fraction {a.val_fraction}: use a share of train above 0 and at most 0.3 (e.g. 0.1)")
    plans = run_plan(a)
    for p in plans:
        if p["flags"] is not None and (bad := unknown_flags(p["flags"])):
            raise UserError(f"run {p['name']}: train.py does not know {', '.join(bad)} in this checkout; "
                            "drop them with --recipe \"...\" or update train.py")
    data = prepare_data(ferplus, work, a.limit, a.with_sample, a.val_fraction)
    n_all = len(pd.read_csv(work / data_name(a.val_fraction) / "captions.csv", usecols=["split"]))     # --limit: the same fraction
    fer_csv = prepare_fer2013(Path(a.fer2013), work, min(1.0, a.limit / n_all) if a.limit else 1.0)
    for p in plans:
        run(p, a, data, fer_csv)
    results = collect(work, a.limit)
    out = Path(a.out) if a.out else work / "report.md"
    body = section(results, data, RECIPE if a.recipe is None else shlex.split(a.recipe))
    out.write_text(upsert_section(out.read_text() if out.is_file() else "", body))
    print(body)
    print(f"\n(written to {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
