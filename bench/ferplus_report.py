"""Markdown for bench/ferplus.py: the `## FER+` section (five tables and the reproduce commands) from result.json
dicts, and replacing that section inside an existing file. Pure string formatting; no model, no data."""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                    # run as a script from anywhere: the repo's modules import

import pandas as pd  # noqa: E402

from captions import CANONICAL  # noqa: E402

CLASSES = list(CANONICAL)
HEADING = "## FER+"


def pct(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}%}"


def num(v, fmt: str = ".3f") -> str:
    return "-" if v is None else ("inf" if v == float("inf") else format(v, fmt))


def setup_text(r: dict) -> str:
    """What a row was trained with, from its checkpoint's config (and the --extra flags)."""
    s = r.get("setup", {})
    parts = [f"{s.get('epochs', '?')} ep", f"{s.get('image_size', '?')} px", f"bank {s.get('caption_bank') or 'csv'}"]
    parts += [f"{k} {s[k]}" for k in ("targets", "contrast") if s.get(k)]
    parts += [f"no {s['exclude_classes']}"] if s.get("exclude_classes") else []
    return ", ".join(parts) + (f", `{r['extra']}`" if r.get("extra") else "")


def accuracy_table(results: list[dict]) -> list[str]:
    lines = ["### Majority vote, paper sentences", "",
             "| run | setup | train min | best epoch | top-1 | top-1 flip | UAR | UAR flip | " + " | ".join(CLASSES)
             + " | FER-2013 top-1 | FER-2013 UAR | FER-2013 top-1 flip |", "|" + "---|" * (11 + len(CLASSES))]
    for r in results:
        p, f = r["paper"], r.get("fer2013") or {}
        lines.append(f"| {r['run']} | {setup_text(r)} | {num(r.get('train_minutes'), '.1f')} | "
                     f"{r.get('best_epoch', '-')} | {pct(p['top1'])} | {pct(p['top1_flip'])} | {pct(p['uar'])} | "
                     f"{pct(p['uar_flip'])} | " + " | ".join(pct(p["per_class_recall"].get(c), 0) for c in CLASSES)
                     + f" | {pct(f.get('top1'))} | {pct(f.get('uar'))} | {pct(f.get('top1_flip'))} |")
    return lines


def agreement_table(results: list[dict]) -> list[str]:
    g = results[0]["agreement"]
    lines = ["", "### Agreement with the annotators (FER+ vote distributions)", "",
             "Predicted distribution: softmax(logit scale x cosine) over the eight paper-sentence prototypes; "
             "target: each face's votes over the eight emotions. Mean cross-entropy and KL in nats (lower is better).",
             "", "| predictor | CE | KL |", "|---|---|---|",
             f"| reference: the votes themselves (CE floor = mean vote entropy) | {num(g['model']['entropy'])} | 0 |",
             f"| reference: uniform over 8 | {num(g['uniform']['ce'])} | {num(g['uniform']['kl'])} |",
             f"| reference: majority one-hot, smoothed {g['smoothing']} | {num(g['majority_smoothed']['ce'])} | "
             f"{num(g['majority_smoothed']['kl'])} |",
             f"| reference: majority one-hot | {num(g['majority_onehot']['ce'])} | {num(g['majority_onehot']['kl'])}"
             f" (votes split on {pct(g['split_votes'])} of faces) |"]
    for r in results:
        m = r["agreement"]
        lines.append(f"| {r['run']} (scale {m['logit_scale']:.1f}) | {num(m['model']['ce'])} | "
                     f"{num(m['model']['kl'])} |")
    return lines


def phrasing_table(results: list[dict]) -> list[str]:
    lines = ["", "### Unseen phrasing (captions/everyday.csv, shares no sentence with any training bank)", "",
             "| run | top-1 paper | top-1 everyday | drop (pt) | UAR paper | UAR everyday | drop (pt) | "
             "top-1 everyday flip |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        p, e = r["paper"], r["everyday"]
        lines.append(f"| {r['run']} | {pct(p['top1'])} | {pct(e['top1'])} | {(p['top1'] - e['top1']) * 100:+.1f} "
                     f"| {pct(p['uar'])} | {pct(e['uar'])} | {(p['uar'] - e['uar']) * 100:+.1f} | "
                     f"{pct(e['top1_flip'])} |")
    return lines


def unseen_table(results: list[dict]) -> list[str]:
    unseen = next(iter(results[0]["paper"]["unseen"]))
    lines = ["", f"### Unseen class: `{unseen}` (paper sentence; left out of training where marked)", "",
             "| run | in training | faces | AP | base rate | AP / base rate | recall (8-way) | recall, calibrated |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        u = r["paper"]["unseen"][unseen]
        ratio = f"{u['ap_over_base']:.2f}x" if u.get("ap_over_base") is not None else "-"
        lines.append(f"| {r['run']} | {'no' if unseen in r.get('excluded', []) else 'yes'} | {u['n']} | "
                     f"{num(u['ap'])} | {num(u['base_rate'])} | {ratio} | {pct(u['recall'])} | "
                     f"{pct(u['calibrated_recall'])} |")
    return lines


def compound_table(results: list[dict]) -> list[str]:
    c0 = results[0]["compound"]
    lines = ["", "### Compound expressions (captions/compound.csv)", "",
             f"Positives: faces with >= 3 of 10 votes for both emotions (pairs with >= {c0['min_faces']} faces); "
             "AP over all evaluation faces of the pair's sentences vs the better of the two emotions' paper "
             "sentences.", "", "| run | pair | faces | AP pair | AP best single | gain |", "|---|---|---|---|---|---|"]
    for r in results:
        c = r["compound"]
        for pair, p in c["pairs"].items():
            lines.append(f"| {r['run']} | {pair} | {p['n']} | {num(p['ap'])} | {num(p['best_single_ap'])} | "
                         f"{num(p['gain'], '+.3f')} |")
        lines.append(f"| {r['run']} | **mean gain** | | | | **{num(c['mean_gain'], '+.3f')}** |")
        if c["no_sentences"]:
            lines.append(f"| {r['run']} | no sentences for: {', '.join(c['no_sentences'])} | | | | |")
    return lines


def section(results: list[dict], data: Path, recipe: list[str]) -> str:
    """The `## FER+` markdown section: setup, the five tables and one reproduce command per row."""
    df = pd.read_csv(data / "captions.csv", dtype=str, keep_default_na=False)
    train, n_eval = df["split"] == "train", int((df["split"] == "test").sum())
    drawn = train & (df.get("soft_labels", "x") == "")          # --with-sample rows: drawn faces carry no votes
    n_train, n_drawn = int((train & ~drawn).sum()), int(drawn.sum())
    plus = f", plus the bundled sample's {n_drawn:,} drawn faces" if n_drawn else ""
    lines = [f"{HEADING} (eight classes, ten annotators per face)", "",
             f"Train: FER2013Train ({n_train:,} faces whose majority vote is an emotion{plus}; the model-selection split "
             f"is carved out of it); evaluation: FER2013Valid ({n_eval:,} faces = the FER-2013 PublicTest faces), "
             "never used for training or selection. FER-2013 columns: the same faces with their original seven "
             "labels (`../shared/data/fer2013/test`). Recipe: `" + " ".join(recipe) + "` (per-row changes under "
             "`setup`). Zero-shot scoring: cosine to class prototypes (each class's sentences averaged), no prior; "
             "`flip`: face and mirror embeddings averaged.", ""]
    lines += accuracy_table(results) + agreement_table(results) + phrasing_table(results)
    lines += unseen_table(results) + compound_table(results)
    lines += ["", "Reproduce (results cached per run in `--work`; `--reeval` re-evaluates checkpoints):", ""]
    lines += [f"- {r['run']}: `{r['command']}`" for r in results]
    return "\n".join(lines) + "\n"


def upsert_section(text: str, body: str, heading: str = HEADING) -> str:
    """`text` with its section under `heading` (to the next `#` or `##` heading) replaced by `body` (appended when
    there is none): everything else in the file is kept."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if start is None:
        return (text.rstrip("\n") + "\n\n" if text.strip() else "") + body
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"#{1,2} ", lines[i])), len(lines))
    rest = lines[end:]
    return "\n".join(lines[:start] + body.rstrip("\n").splitlines() + ([""] + rest if rest else [])) + "\n"


if __name__ == "__main__":
    from cli_types import library_only
    raise SystemExit(library_only("ferplus_report.py"))
