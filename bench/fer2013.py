"""FER-2013 benchmark on CPU: train on ../shared/data/fer2013/train, evaluate on test, write a markdown table.

    python bench/fer2013.py                       # all runs: clip, ce baseline, unseen-class (surprise); ~2.5 h
    python bench/fer2013.py --runs clip --epochs 2 --limit 2000     # a quick smoke run

Every run uses the same image tower, image size, epochs and batch size (the `offline` preset: ImageNet
EfficientNet-Lite0 + frozen all-MiniLM-L6-v2, both installed by pip), so the table compares objectives, not budgets.
Results (JSON per run) go to --work; the table goes to --out (default: WORK/report.md; an existing file keeps
everything but this section).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import evaluate  # noqa: E402
import prepare  # noqa: E402
import train  # noqa: E402
from cli_types import choice_list, nonneg_int, positive_int  # noqa: E402
from ferplus_report import upsert_section  # noqa: E402
from utils import UserError, run_cli  # noqa: E402

CLASSES = ["anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"]
HEADING = "# Benchmarks: FER-2013"
CALIBRATION = """Calibration points measured outside the project on the same machine (issue 6): ImageNet
EfficientNet-Lite0 at 64 px scored against frozen all-MiniLM-L6-v2 embeddings of the eight paper sentences, 8 epochs
in 19 minutes: 66.9% top-1 / 63.4% UAR; a from-scratch ResNet18 at 48 px: 57.8% / 52.1%. Targets for a 45-minute
CPU budget: top-1 >= 68%, UAR >= 62%, unseen-class AP >= 2x its base rate."""
ANCHORS = """Published anchors (zero-shot and supervised, for context):
CLIP ViT-L/14 zero-shot on FER-2013 49.0% and LAION ViT-L/14 53.7% (CLIP_benchmark);
supervised single-network state of the art 73.28% (Khaireddin & Chen 2021, VGGNet, FER-2013 private test)."""


def prepare_data(fer: Path, work: Path, limit: int) -> Path:
    """captions.csv over the FER-2013 folders (referenced in place); `limit` keeps a class-stratified subset."""
    data = work / "data"
    if not (data / "captions.csv").is_file():
        prepare.convert(fer, "folder", data, verify=False)
    if limit:
        df = pd.read_csv(data / "captions.csv")
        frac = min(1.0, limit / len(df))
        df = df.groupby(["split", "label"]).sample(frac=frac, random_state=0)
        data = work / f"data_{limit}"
        data.mkdir(parents=True, exist_ok=True)
        df.to_csv(data / "captions.csv", index=False)
    return data


def run_flags(name: str, a, data: Path, out: Path) -> list[str]:
    flags = ["--preset", "offline", "--data", str(data), "--out-dir", str(out), "--final-path", str(out / "final.pth"),
             "--image-size", str(a.image_size), "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
             "--val-fraction", "0.03", "--sampler", a.sampler, "--caption-bank", a.bank,
             "--caption-sampling", "random", "--positives", "label", "--num-workers", str(a.workers),
             "--augment", "true", "--lr-image", str(a.lr_image), "--warmup-steps", "200", "--select-by", "val_top1",
             "--ema-decay", str(a.ema_decay)]
    if name == "ce":
        flags += ["--objective", "ce"]
    if name == "unseen":
        flags += ["--exclude-classes", a.unseen]
    return flags


def setup_of(a) -> dict:
    """What a run was trained with: saved in its result.json so the table describes each row, not today's flags."""
    return dict(epochs=a.epochs, image_size=a.image_size, batch_size=a.batch_size, bank=a.bank, sampler=a.sampler,
                lr_image=a.lr_image, ema_decay=a.ema_decay)


def run(name: str, a, data: Path, work: Path) -> dict:
    out = work / name
    result_file = out / "result.json"
    if result_file.is_file() and not (a.force or a.reeval):
        res = json.loads(result_file.read_text())
        if res.get("setup", setup_of(a)) != setup_of(a):           # another setup's row would pass for this one
            raise UserError(f"{out}: holds a {name} run trained with {res['setup']}, not these flags; pass --force "
                            "to retrain it, or another --work")
        return res
    if a.reeval and result_file.is_file():        # evaluate the existing checkpoint again, keep the timings
        res = {k: v for k, v in json.loads(result_file.read_text()).items() if k in ("run", "train_minutes",
                                                                                   "images_per_s", "setup")}
    else:
        t0 = time.time()
        train.main(run_flags(name, a, data, out))
        wall = time.time() - t0
        hist = pd.read_csv(out / "metrics.csv")
        res = dict(run=name, train_minutes=round(wall / 60, 1), images_per_s=float(hist["images_per_s"].median()),
                   setup=setup_of(a))
    res.setdefault("setup", setup_of(a))
    res["best_epoch"] = int(torch.load(out / "final.pth", weights_only=True)["epoch"])
    for key in EVALS[name]:
        prompts, tta, prior = key.split("+")[0], "+flip" in key, "+prior" in key
        res[key] = evaluate.evaluate(out / "final.pth", data, split="test", prompts=prompts, tta=tta, prior=prior,
                                     unseen=[a.unseen] if name == "unseen" else (),
                                     confusion=out / f"confusion_{key.replace('+', '_')}.png")
    result_file.write_text(json.dumps(res, indent=1))
    return res


# evaluations per run: prompt set, +flip = flip TTA, +prior = log training label frequency added (evaluate --prior)
EVALS = {"clip": ["paper", "paper+flip", "paper+flip+prior", "rich", "rich+flip"], "ce": ["paper", "paper+flip"],
         "unseen": ["paper", "paper+flip", "rich", "rich+flip"]}
LABELS = {"clip": "CLIP (contrastive)", "ce": "CE baseline (classifier head)", "unseen": "CLIP, {u} unseen"}


def result_rows(r: dict, unseen: str) -> list[str]:
    """One table row per evaluation of a run (EVALS: prompt set, flip TTA, training prior)."""
    rows, su = [], r.get("setup", {})
    for key in EVALS[r["run"]]:
        c = r.get(key)
        if not c:
            continue
        prompts, tta = key.split("+")[0], ("flip" if "+flip" in key else "-") + (" + prior" if "+prior" in key else "")
        per = [c["per_class_recall"].get(k) for k in CLASSES]
        rows.append(f"| {LABELS[r['run']].format(u=f'`{unseen}`')} | {su.get('image_size', '?')} | "
                    f"{su.get('epochs', '?')} | {su.get('ema_decay') or '-'} | "
                    f"{'-' if r['run'] == 'ce' else su.get('bank', '?')} | {r['train_minutes']} | "
                    f"{r['images_per_s']:.0f} | {r.get('best_epoch', '?')} | "
                    f"{'classifier' if r['run'] == 'ce' else prompts} | {tta} | {c['top1']:.1%} | {c['top5']:.1%} | "
                    f"{c['uar']:.1%} | {c['macro_f1']:.3f} | " +
                    " | ".join("-" if v is None else f"{v:.0%}" for v in per) + " |")
    return rows


def unseen_lines(r: dict, unseen: str) -> list[str]:
    lines = ["", f"Unseen class `{unseen}` (left out of training; scored by its sentence):", "",
             "| prompts | TTA | AP | base rate | AP / base rate | recall | recall, calibrated | top-1, calibrated |",
             "|---|---|---|---|---|---|---|---|"]
    for key in ("paper", "paper+flip", "rich", "rich+flip"):
        if r.get(key, {}).get("unseen"):
            u = r[key]["unseen"][unseen]
            lines.append(f"| {key.split('+')[0]} | {'flip' if '+' in key else '-'} | {u['ap']:.3f} | "
                         f"{u['base_rate']:.3f} | {u['ap_over_base']:.2f}x | {u['recall']:.1%} | "
                         f"{u['calibrated_recall']:.1%} | {r[key]['calibrated']['top1']:.1%} |")
    return lines


def phrasing_line(r: dict) -> list[str]:
    """Drop from scoring with the training bank's sentences to a disjoint prompt set (unseen phrasing)."""
    bank = r.get("setup", {}).get("bank")
    other = {"paper": "rich", "rich": "paper"}.get(bank)
    if not other or not (r.get(bank) and r.get(other)):
        return []
    q, p = r[bank], r[other]
    return ["", f"Unseen phrasing: the CLIP run was trained on the `{bank}` sentences; the `{other}` set shares none "
            f"of them. Scoring with `{other}` instead of `{bank}`: top-1 {q['top1']:.1%} -> {p['top1']:.1%} "
            f"({(p['top1'] - q['top1']) * 100:+.1f} points), UAR {q['uar']:.1%} -> {p['uar']:.1%} "
            f"({(p['uar'] - q['uar']) * 100:+.1f})."]


def table(results: list[dict], a, data: Path) -> str:
    """BENCHMARKS.md: configuration, wall time, throughput, top-1/top-5/UAR, per-class recall, unseen class."""
    n = pd.read_csv(data / "captions.csv")["split"].value_counts()
    subset = f" (a stratified `--limit {a.limit}` subset)" if a.limit else ""
    lines = [HEADING, "",
             f"Train: `../shared/data/fer2013/train`{subset} ({n.get('train', 0):,} faces, 3% held out for model "
             f"selection); test: `../shared/data/fer2013/test` (PublicTest, {n.get('test', 0):,} faces). Machine: 2 CPU "
             "cores, no GPU.",
             "Every run: `offline` preset (ImageNet EfficientNet-Lite0 + frozen all-MiniLM-L6-v2), "
             f"batch {a.batch_size}, AdamW lr {a.lr_image:g} (image), warmup then cosine, "
             "positives by label, a random sentence of the caption bank per image per epoch, augmentation on; "
             "image size (`px`), `epochs`, weight `EMA` decay and `bank` per row. `TTA flip`: each test face and its mirror image are "
             "encoded and the embeddings averaged (`evaluate.py --tta flip`). `+ prior`: log training label frequency "
             "added to each class's logit (`evaluate.py --prior train`), the Bayes decision for test faces distributed "
             "like the training ones: it raises top-1 and lowers UAR.", "",
             "| run | px | epochs | EMA | bank | train min | img/s | best epoch | prompts | TTA | top-1 | top-5 | UAR | macro-F1 | "
             + " | ".join(CLASSES) + " |", "|" + "---|" * (14 + len(CLASSES))]
    for r in results:
        lines += result_rows(r, a.unseen)
    for r in results:
        if r["run"] == "unseen":
            lines += unseen_lines(r, a.unseen)
    lines += phrasing_line(next((r for r in results if r["run"] == "clip"), {}))
    lines += ["", "Reproduce each row (each in its own `--work`: a run's result is cached there, and one trained "
              "with other flags is refused; `--reeval` re-evaluates checkpoints): " + "; ".join(
                  f"`python bench/fer2013.py --runs {r['run']} --image-size {st.get('image_size', 64)} --epochs "
                  f"{st.get('epochs', '?')} --ema-decay {st.get('ema_decay', 0)} --bank {st.get('bank', '?')} --work "
                  f"runs/fer2013-{k}`" for k, (r, st) in enumerate(((r, r.get("setup", {})) for r in results), 1)) + "."]
    lines += ["", "Best epoch = highest validation top-1 (3% of train, zero-shot through the training bank). "
              "`train min` is training wall time including per-epoch validation; each evaluation adds about 20 s "
              "(40 s with TTA).", "", CALIBRATION, "", ANCHORS, ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fer", default=str(ROOT.parent / "shared" / "data" / "fer2013"))
    ap.add_argument("--work", default="runs/fer2013")
    ap.add_argument("--out", help="markdown file whose `# Benchmarks: FER-2013` section is (re)written, the rest kept "
                    "(default: WORK/report.md)")
    ap.add_argument("--runs", type=choice_list("clip", "ce", "unseen"), default=["clip", "ce", "unseen"])
    ap.add_argument("--epochs", type=positive_int, default=12)
    ap.add_argument("--image-size", type=positive_int, default=64)
    ap.add_argument("--batch-size", type=positive_int, default=64)
    ap.add_argument("--lr-image", type=float, default=1e-3)
    ap.add_argument("--ema-decay", type=float, default=0.999, help="weight EMA (0 = off)")
    ap.add_argument("--sampler", default="none")
    ap.add_argument("--bank", default="paper")
    ap.add_argument("--unseen", default="surprise")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--limit", type=nonneg_int, default=0,
                    help="use a stratified subset of this many images (smoke runs)")
    ap.add_argument("--force", action="store_true", help="retrain runs that already have a result.json")
    ap.add_argument("--reeval", action="store_true", help="evaluate existing checkpoints again (no training)")
    ap.add_argument("--also", default="", metavar="DIR,...",
                    help="run folders (with result.json) of earlier runs to show as extra rows, e.g. an ablation")
    a = ap.parse_args(argv)
    fer = Path(a.fer)
    if not (fer / "train").is_dir():
        print(f"error: {fer}: FER-2013 folder not found (expected train/ and test/); pass --fer DIR", file=sys.stderr)
        return 2
    also = [Path(d) for d in filter(None, a.also.split(","))]
    for d in also:                                                  # checked before hours of training
        if not (d / "result.json").is_file():
            print(f"error: --also {d}: no result.json there (a finished run folder of this script)", file=sys.stderr)
            return 2
    work = Path(a.work)
    data = prepare_data(fer, work, a.limit)
    results = [run(name, a, data, work) for name in a.runs]
    results += [json.loads((d / "result.json").read_text()) for d in also]
    out, body = Path(a.out) if a.out else work / "report.md", table(results, a, data)
    out.write_text(upsert_section(out.read_text() if out.is_file() else "", body, HEADING))
    print(body)
    print(f"\n(written to {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
