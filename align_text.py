"""Give a trained model another text tower (e.g. a multilingual one), keeping its image side as it is.

    python align_text.py --checkpoint models/exprclip-ferplus.pth --data DIR --out model_ko.pth \
        --text-model pkg:multilingual-e5-small --bank paper,rich,captions/facs_en.csv,captions/facs_ko.csv \
        --select captions/select.csv

The image tower and its head are frozen: each training face is embedded once (cached under --work). Only a linear
text head is learned, from the new tower's sentence features into the image space: every sentence of every class
is scored against each face, the target being the face's vote distribution (`soft_labels`) or its label, spread
evenly over the class's sentences (logit-adjusted, so a class with more sentences gets no more mass). The head
starts from a ridge map of the new tower onto the old text space (over the English bank sentences), and the epoch
kept is the one whose `val` faces read best through the --select phrasings (never trained on): the mean top-1
over the languages of its `lang` column. Time on 2 CPU cores: the first run embeds the bank's sentences once with
the new tower (the default bank's 5,147 with multilingual-e5-small: about 8 minutes, measured with 72 faces); later
runs take seconds for the sentences (cached), plus embedding the faces, once per set of face files (cached in --work).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import evaluate
import metrics
from captions import load_caption_bank
from checkpoint import create_model_and_transforms, keep_aside, read_checkpoint, save_checkpoint
from config import config_from_dict
from embed import embed_images, embed_texts
from loss import soft_cross_entropy
from model import ExprCLIP
from precision import autocast_for
from sentence_towers import SENTENCE_TOWERS, SentenceTower, weights_path
from utils import (UserError, atomic_write, check_output_file, file_digest, first_line, read_csv_checked,
                   run_cli)

log = logging.getLogger("exprclip.align")
HERE = Path(__file__).resolve().parent         # the default banks are the repository's, from any working folder
DEFAULT_BANK = "paper,rich," + ",".join(str(HERE / "captions" / n) for n in ("facs_en.csv", "facs_ko.csv"))
DEFAULT_SELECT = str(HERE / "captions" / "select.csv")


def faces_digest(paths: list[str], n: int = 16) -> str:
    """Short sha256 of the ordered face files, each with its size and mtime (ns): the face cache's identity, so other
    files, another order or a changed file is embedded again (a file that cannot be read counts as size -1)."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        h.update(json.dumps([os.path.abspath(p), size, mtime]).encode() + b"\n")
    return h.hexdigest()[:n]


def read_faces_cache(cache: Path, n: int, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(emb, ok) from a face cache; None when there is none, or (one warning line) when it is unreadable or does not
    hold n decoded flags and one dim-d float32 row per decoded face (it is then embedded again and rewritten)."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            emb, ok = z["emb"], z["ok"]
        if not (ok.dtype == bool and ok.shape == (n,) and emb.dtype == np.float32
                and emb.shape == (int(ok.sum()), dim)):
            raise ValueError(f"expected {n} decoded flags and one {dim}-d float32 row per decoded face")
    except Exception as e:             # truncated, foreign or hand-edited: costs one re-embedding, nothing more
        log.warning(f"ignoring the face cache {cache} ({type(e).__name__}: {first_line(e, 100)}); the faces are "
                    "embedded again")
        return None
    return emb, ok


def face_embeddings(model, preprocess, paths: list[str], cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [n_ok, D] embeddings, bool [N] decoded) of the frozen image side, cached in `cache` (.npz)."""
    if (hit := read_faces_cache(cache, len(paths), model.embed_dim)) is not None:
        return hit
    log.info(f"embedding {len(paths)} faces once (cached in {cache})")
    autocast, _ = autocast_for(model.cfg, torch.device("cpu"))
    emb, ok = embed_images(model, paths, preprocess, torch.device("cpu"), 256, autocast)

    def write(tmp: str) -> None:       # through a file object: np.savez would append .npz to the temporary name
        with open(tmp, "wb") as f:
            np.savez(f, emb=emb, ok=ok)
    atomic_write(cache, write)         # a crash or Ctrl-C leaves the old cache or the new one, never half of one
    return emb, ok


def targets(df, classes: list[str]) -> np.ndarray:
    """[N, C] target distribution: the `soft_labels` votes where given, else the one-hot label."""
    out = np.zeros((len(df), len(classes)), np.float32)
    for i, (label, soft) in enumerate(zip(df["label"], df.get("soft_labels", [""] * len(df)))):
        if soft:
            d = json.loads(soft)
            out[i] = [float(d.get(c, 0.0)) for c in classes]
        if out[i].sum() <= 0:
            out[i, classes.index(label)] = 1.0
    return out / out.sum(1, keepdims=True)


def load_select(path: str, classes: list[str]) -> dict[str, dict[str, list[str]]]:
    """--select CSV (label,caption[,lang]) -> {lang: {class: [sentences]}}; every class needs a sentence."""
    df = read_csv_checked(path, ("label", "caption"), hint="selection phrasings need columns label,caption[,lang]")
    langs = df["lang"] if "lang" in df else ["all"] * len(df)
    out: dict[str, dict[str, list[str]]] = {}
    for label, caption, lang in zip(df["label"], df["caption"], langs):
        out.setdefault(lang or "all", {}).setdefault(label.strip(), []).append(caption.strip())
    for lang, bank in out.items():
        if missing := [c for c in classes if not bank.get(c)]:
            cols = "label,caption" + ("" if lang == "all" else f",{lang}")
            raise UserError(f"{path}: no {lang} selection sentence for {', '.join(missing)}; add a row {cols} for "
                            "each (the epoch kept is the one that reads the val faces best through these)")
    return out


def ridge(x: np.ndarray, y: np.ndarray, lam: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """W [dx, dy], b [dy] minimising |x W + b - y|^2 + lam |W|^2 (the head's starting point)."""
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    w = np.linalg.solve(xc.T @ xc + lam * len(x) * np.eye(x.shape[1]), xc.T @ (y - my))
    return w.astype(np.float32), (my - mx @ w).astype(np.float32)


def select_top1(head, center: torch.Tensor, tower_feats: dict, emb_val: np.ndarray, y_val: np.ndarray,
                classes: list[str]) -> dict:
    """Per language: val-face top-1 through that language's selection prototypes (head outputs minus `center`, the
    mean output over the training sentences, as the folded head will give them)."""
    out = {}
    with torch.no_grad():
        for lang, (feats, owner) in tower_feats.items():
            t = F.normalize(head(feats) - center, dim=-1).numpy()
            protos = metrics.class_prototypes(t, owner, classes)[1]
            pred = metrics.zero_shot_scores(emb_val, protos).argmax(1)
            out[lang] = float((pred == y_val).mean())
    return out


def fit_head(head, feats, owner_idx, emb, soft, scale: float, val, epochs: int, lr: float, seed: int,
             balance: float = 0.0, dropout: float = 0.0, anchor=None, anchor_weight: float = 0.0,
             anchor_balance: float | None = None):
    """Train `head` (sentence features [S, dt] -> image space); returns (best state, history). `val` is
    (tower_feats_by_lang, emb_val, y_val, classes) for selection. balance (tau): the loss adds tau x each class's log
    prior (its share of the targets) to its sentences' logits (logit adjustment, Menon et al. 2021), so the head
    learns scores with less of the class prior (none at 1) and rare expressions are not outvoted by frequent ones.
    dropout: each step drops this share of the sentence features' dimensions (inverted dropout, drawn from `seed`),
    so the head cannot lean on the few dimensions that single out the training sentences' wording.
    anchor: (features [A, dt], owner [A]) of a few sentences the model is read through by default (the paper's
    eight): each step also scores the faces against these alone, anchor_weight x that loss, so their prototypes are
    fitted directly instead of as one sentence among hundreds per class; anchor_balance is that loss's tau (None:
    `balance`)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    img, tgt = torch.from_numpy(emb), torch.from_numpy(soft)                      # [N, D], [N, C]
    counts = torch.bincount(owner_idx, minlength=soft.shape[1]).float()           # sentences per class
    adjust = counts.log()[owner_idx]                                              # [S]
    if balance:
        adjust = adjust - balance * tgt.mean(0).clamp_min(1e-6).log()[owner_idx]
    spread = tgt[:, owner_idx] / counts[owner_idx]                                # [N, S] target over sentences
    if anchor is not None:
        a_feats, a_owner = anchor
        a_counts = torch.bincount(a_owner, minlength=soft.shape[1]).float()
        a_tau = balance if anchor_balance is None else anchor_balance
        a_adjust = (a_counts.clamp_min(1).log() - a_tau * tgt.mean(0).clamp_min(1e-6).log())[a_owner]     # [A]
        a_spread = tgt[:, a_owner] / a_counts.clamp_min(1)[a_owner]                # [N, A]
    best, history = None, []
    for epoch in range(epochs + 1):
        if epoch:
            for idx in torch.randperm(len(img), generator=g).split(512):
                f = feats
                if dropout:                                                       # [S, dt] feature mask
                    f = feats * (torch.rand(feats.shape, generator=g) >= dropout) / (1 - dropout)
                out = head(f)                                                     # [S, D]
                t = F.normalize(out - out.mean(0), dim=-1)                        # centred: see centered()
                logits = scale * img[idx] @ t.T - adjust                          # [b, S]
                loss = soft_cross_entropy(logits, spread[idx])
                if anchor is not None and anchor_weight:
                    ta = F.normalize(head(a_feats) - out.mean(0), dim=-1)         # [A, D], the same centre
                    la = scale * img[idx] @ ta.T - a_adjust                       # [b, A]
                    loss = loss + anchor_weight * soft_cross_entropy(la, a_spread[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            score = select_top1(head, head(feats).mean(0), *val)
        history.append(dict(epoch=epoch, **{f"select_top1_{k}": v for k, v in score.items()}))
        mean = float(np.mean(list(score.values())))
        log.info(f"epoch {epoch}: selection top-1 " + ", ".join(f"{k} {v:.3f}" for k, v in score.items()))
        if best is None or mean > best[0]:
            best = (mean, epoch, centered(head, feats))
    return best, history


@torch.no_grad()
def centered(head, feats: torch.Tensor) -> dict:
    """The head's state with its mean output over the training sentences folded into the bias (mean output 0).

    The loss ranks sentences for each face, so a component shared by every sentence costs nothing there and grows
    freely; searching faces by a sentence ranks faces instead, and that shared component then picks the same faces
    for every query (measured: the drawn gallery answered every sentence with neutral faces, precision@10 0.12).
    So the head is trained centred (each step subtracts the sentences' mean output) and the centre is folded in."""
    sd = {k: v.clone() for k, v in head.state_dict().items()}
    sd["bias"] = sd["bias"] - head(feats).mean(0)
    return sd


def aligned_model(old: ExprCLIP, text_model: str, head_state: dict, bank: str) -> ExprCLIP:
    """The old model's image side with the new tower and the learned linear text head."""
    cfg = config_from_dict(dict(vars(old.cfg), text_model=text_model, freeze_text=True, text_weights="pretrained",
                                text_head="linear", embed_dim=old.embed_dim, caption_bank=bank,
                                text_layers=0, text_width=0))
    new = ExprCLIP(cfg, load_weights=False, class_names=old.class_names)
    sd = {k: v for k, v in old.state_dict().items() if not k.startswith(("text_encoder.", "text_head."))}
    sd.update({f"text_head.{k}": v for k, v in head_state.items()})
    new.load_state_dict(sd, strict=False)
    return new.eval()


def split_faces(old, preprocess, table, split: str, classes: list[str], ckpt: str, work: str):
    """(embeddings [n, D], rows) of one split's faces of the given classes (embedded once, cached)."""
    df = table[(table["split"] == split) & table["label"].isin(classes)].reset_index(drop=True)
    if df.empty:
        raise UserError(f"no `{split}` rows with the bank's classes in the data; it needs train and val splits")
    key = f"{file_digest(ckpt, n=16)}_{split}_{faces_digest(list(df['path']))}"      # which faces, order, content
    emb, ok = face_embeddings(old, preprocess, list(df["path"]), Path(work) / f"faces_{key}.npz")
    return emb, df[ok].reset_index(drop=True)


def align(old: ExprCLIP, faces: dict, text_model: str, bank_name: str, select_path: str, epochs: int = 20,
          lr: float = 1e-3, seed: int = 0, balance: float = 0.0, dropout: float = 0.0, anchor_bank: str = "",
          anchor_weight: float = 0.0, anchor_balance: float | None = None):
    """Learn the new tower's text head against the frozen image side. faces: {"train"|"val": (emb, rows)}.
    Returns ({keep: aligned model}, {keep: its epoch}, history) for keep = best (by the selection phrasings) and
    last (one run gives both)."""
    bank = load_caption_bank(bank_name)
    classes = [c for c in old.class_names or sorted(bank) if c in bank] or sorted(bank)
    select = load_select(select_path, classes)
    tower = SentenceTower(text_model)
    sentences = [s for c in classes for s in bank[c]]
    owner = torch.tensor([classes.index(c) for c in classes for _ in bank[c]])
    english = [s for s in sentences if s.isascii()]
    w, b = ridge(tower.embed(english).numpy(), embed_texts(old, english))
    head = torch.nn.Linear(tower.config.hidden_size, old.embed_dim)
    head.weight.data, head.bias.data = torch.from_numpy(w.T.copy()), torch.from_numpy(b)
    sel = {lang: (tower.embed([s for c in classes for s in bk[c]]), [c for c in classes for _ in bk[c]])
           for lang, bk in select.items()}
    (emb_tr, df_tr), (emb_val, df_val) = faces["train"], faces["val"]
    val = (sel, emb_val, np.array([classes.index(c) for c in df_val["label"]]), classes)
    feats = tower.embed(sentences)                                                # [S, dt]
    anchor = None
    if anchor_bank and anchor_weight:
        abank = load_caption_bank(anchor_bank)
        anchor = (tower.embed([s for c in classes for s in abank.get(c, [])]),
                  torch.tensor([classes.index(c) for c in classes for _ in abank.get(c, [])]))
    best, history = fit_head(head, feats, owner, emb_tr, targets(df_tr, classes), old.scale().item(), val, epochs,
                             lr, seed, balance, dropout, anchor, anchor_weight, anchor_balance)
    states = dict(best=(best[1], best[2]), last=(epochs, centered(head, feats)))
    return ({k: aligned_model(old, text_model, st, bank_name) for k, (_, st) in states.items()},
            {k: e for k, (e, _) in states.items()}, history)


def check_inputs(a, old: ExprCLIP, label_counts: dict | None) -> list[str]:
    """The classes to align, once everything that needs no face is checked (minutes of face embedding come after):
    the text tower, the bank (every class of the model: its classifier's, else those it was trained on; some
    English), the --select phrasings and the --anchor."""
    if a.text_model not in SENTENCE_TOWERS:
        raise UserError(f"--text-model {a.text_model}: not a known sentence tower; use one of "
                        f"{', '.join(SENTENCE_TOWERS)}")
    weights_path(a.text_model)                  # the package installed, or one line naming it (the tower not loaded)
    bank = load_caption_bank(a.bank)
    model_classes = old.class_names or list(label_counts or {})
    if missing := [c for c in model_classes if c not in bank]:
        raise UserError(f"--bank {a.bank}: no sentence for the model's class(es) {', '.join(missing)}; the head is "
                        f"aligned on all {len(model_classes)} of its classes, so add rows label,caption for them or "
                        f"add a bank that has them (e.g. --bank paper,{a.bank})")
    classes = [c for c in old.class_names or sorted(bank) if c in bank]           # as align() takes them
    if not any(s.isascii() for c in classes for s in bank[c]):
        raise UserError(f"--bank {a.bank}: no English sentence; the head starts from a ridge map over the bank's "
                        f"English sentences, so add an English bank (e.g. --bank paper,{a.bank})")
    if a.anchor and a.anchor_weight and not set(load_caption_bank(a.anchor)) & set(classes):
        raise UserError(f"--anchor {a.anchor}: no sentence for any of the model's classes ({', '.join(classes)})")
    load_select(a.select, classes)
    return classes


def check_numbers(a) -> None:
    """The numeric flags, each refused in one line before anything is loaded (NaN fails every comparison: finite
    first)."""
    for flag in ("lr", "balance", "feature_dropout", "anchor_weight", "anchor_balance"):
        v = getattr(a, flag)
        if v is not None and not math.isfinite(v):
            raise UserError(f"--{flag.replace('_', '-')} {v}: give a finite number")
    if a.epochs < 0 or a.lr <= 0:
        raise UserError(f"--epochs {a.epochs} --lr {a.lr}: give epochs >= 0 (0 = the head as initialised) and a "
                        "learning rate > 0")
    if a.balance < 0:
        raise UserError(f"--balance {a.balance}: tau must be >= 0 (0 = off, 1 = no class prior)")
    if a.anchor_weight < 0 or (a.anchor_weight and not a.anchor):
        raise UserError(f"--anchor-weight {a.anchor_weight}: give a weight >= 0, with --anchor BANK (e.g. paper)")
    if a.anchor_balance is not None and a.anchor_balance < 0:
        raise UserError(f"--anchor-balance {a.anchor_balance}: tau must be >= 0 (0 = off, 1 = no class prior)")
    if not 0 <= a.feature_dropout < 1:
        raise UserError(f"--feature-dropout {a.feature_dropout}: give a share in [0, 1) (0 = off)")


def check_finite(model) -> None:
    """An aligned model is saved only with finite weights (a diverged head would be NaN in every score)."""
    if not all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()):
        raise UserError("the aligned text head has non-finite weights (training diverged); run again with a lower "
                        "--lr (default 1e-3)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="trained model whose image side is kept")
    ap.add_argument("--data", required=True, help="folder with captions.csv (splits train and val; soft_labels used)")
    ap.add_argument("--text-model", default="pkg:multilingual-e5-small",
                    help="pkg:multilingual-e5-small | pkg:multilingual-use")
    ap.add_argument("--bank", default=DEFAULT_BANK, help="training sentences: caption banks (comma list of paper, "
                    "rich, CSV paths with label,caption)")
    ap.add_argument("--select", default=DEFAULT_SELECT, help="selection phrasings label,caption,lang")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--keep", choices=("best", "last"), default="best", help="the epoch kept")
    ap.add_argument("--balance", type=float, default=0.0, help="logit adjustment tau: 1 trains without the class "
                    "prior (higher recall of rare expressions, lower top-1), 0 = off")
    ap.add_argument("--feature-dropout", type=float, default=0.2, help="share of the sentence features' dimensions "
                    "dropped at each training step (0 = off; 0.2 measured best on validation phrasings)")
    ap.add_argument("--anchor", default="", help="caption bank the model is read through by default (e.g. paper): "
                    "its sentences also get a loss of their own, --anchor-weight x (off by default)")
    ap.add_argument("--anchor-weight", type=float, default=0.0, help="weight of the --anchor loss (0 = off)")
    ap.add_argument("--anchor-balance", type=float, default=None, help="logit adjustment tau of the --anchor loss "
                    "(default: --balance)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/align", help="cache of face embeddings")
    ap.add_argument("--out", required=True, help="the aligned checkpoint")
    a = ap.parse_args(argv)
    check_output_file(a.out, "--out", a.checkpoint, "--checkpoint")     # before minutes of training
    check_numbers(a)
    ck = read_checkpoint(a.checkpoint)
    old, _, preprocess = create_model_and_transforms(ck, "cpu", path=a.checkpoint)
    classes = check_inputs(a, old, ck.get("label_counts"))      # before any face is embedded
    table, _ = evaluate.read_data(a.data)
    faces = {s: split_faces(old, preprocess, table, s, classes, a.checkpoint, a.work) for s in ("train", "val")}
    models, epochs, history = align(old, faces, a.text_model, a.bank, a.select, a.epochs, a.lr, a.seed, a.balance,
                                     a.feature_dropout, a.anchor, a.anchor_weight,
                                     a.anchor_balance)
    model, epoch = models[a.keep], epochs[a.keep]
    run = dict(history[epoch], aligned_from=Path(a.checkpoint).name, balance=a.balance,
               feature_dropout=a.feature_dropout)
    if a.anchor_weight > 0:                     # the anchor fields only when an anchor trained the head
        run.update(anchor=a.anchor, anchor_weight=a.anchor_weight,
                   anchor_balance=a.balance if a.anchor_balance is None else a.anchor_balance)
    check_finite(model)
    keep_aside(Path(a.out))                     # a model already at --out is renamed, never overwritten
    save_checkpoint(a.out, model, label_counts=ck.get("label_counts"), epoch=epoch, metrics=run)
    print(f"kept epoch {epoch}: selection top-1 " + ", ".join(f"{k[12:]} {v:.3f}" for k, v in history[epoch].items()
                                                              if k != "epoch") + f"; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
