"""captions.csv -> (image, caption) pairs: validation, splits, the decode cache, a dedup-collate (the image
preprocessing itself: transform.py).

captions.csv: columns `image,caption` (optional `label`, `split`); `image` is relative to `<data>/<images>`
(or to `<data>`), or absolute. Relative paths that climb out of that folder (`../../etc/shadow`) are refused and
missing files skipped, each with a one-line count; unreadable images are skipped in the batch (one line each).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from config import Config
from formats import safe_join
from logs import get_logger
from transform import BadImage, Preprocess
from utils import UserError, read_csv_checked

REQUIRED = ("image", "caption")
CACHE_BYTES = 2 * 2**30          # per process, for --cache-images
log = get_logger(__name__)


@dataclass
class Unreadable:
    """What PairDataset gives for an image it cannot decode; Collate drops it and lists its path."""
    path: str


# ----------------------------------------------------------------------------- table

def read_captions(cfg: Config, quiet: bool = False, need_caption: bool = True) -> pd.DataFrame:
    """Read and check captions.csv; resolve image paths; drop rows whose relative path climbs out of the data folder
    and rows whose file is missing, each kind counted in one line on stderr (unless quiet) and in
    df.attrs["skipped"] ({"outside the data folder": n, "missing file": n}). need_caption=False (evaluation, which
    classifies by label): the caption column is optional and a row without one is kept."""
    path = Path(cfg.data) / cfg.captions
    if not path.is_file():
        raise UserError(f"{path}: captions file not found (set --data and --captions, or run `python synth.py`)")
    df = read_csv_checked(path, REQUIRED if need_caption else ("image",),
                          hint="expected image,caption[,label,split]" if need_caption else "expected image,label")
    if df.empty:
        raise UserError(f"{path}: no rows below the header; add one row per image (python prepare.py writes them)")
    by_caption = need_caption and not cfg.caption_bank                                  # a bank: by label
    empty = ((df["image"] == "") | ((df["caption"] == "") if by_caption else False)).to_numpy()
    if not quiet:
        report_rows(path, df, empty, "rows have no image" + (" or no caption (or pass --caption-bank to take "
                                     "sentences by label)" if by_caption else "") + " and are skipped")
    df = df[~empty].copy()
    resolved = [resolve_image(cfg, p) for p in df["image"]]
    inside = np.array([p is not None for p in resolved], dtype=bool)
    df["path"] = [str(p) if p is not None else "" for p in resolved]
    exists = inside & np.array([p is not None and p.is_file() for p in resolved], dtype=bool)
    skipped = {"outside the data folder": int((~inside).sum()), "missing file": int((inside & ~exists).sum()),
               "no image or caption": int(empty.sum())}
    if not quiet:
        report_rows(path, df, ~inside, f"relative image paths outside {cfg.data} are refused (absolute paths "
                                       "are allowed)")
        report_rows(path, df, inside & ~exists, "listed images are missing and are skipped")
    df = df[exists].reset_index(drop=True)
    if df.empty:
        raise UserError(f"{path}: no usable rows (is --images pointing at the image folder?)")
    if "label" not in df.columns:
        df["label"] = ""
    df.attrs["skipped"] = skipped
    return df


def report_rows(path: Path, df: pd.DataFrame, bad: np.ndarray, what: str) -> None:
    """One stderr line: '<csv>: 2 of 10 <what> (first: line 5: ../x.png)' -- the line number in the file."""
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        log.warning(f"{path}: {int(bad.sum())} of {len(df)} {what} (first: line {df.index[k] + 2}: "
                    f"{df['image'].iloc[k]})")


def resolve_image(cfg: Config, name: str) -> Path | None:
    """An absolute path as given; a relative one under <data>/<images> if it exists there, else under <data>.
    None when the relative path climbs out of that folder (prepare.py's rule, formats.safe_join)."""
    if Path(name).is_absolute():
        return Path(name)
    data = Path(os.path.abspath(cfg.data))                 # safe_join needs an absolute root
    under_images = safe_join(data / cfg.images, name)
    if under_images is not None and under_images.exists():
        return under_images
    return safe_join(data, name)


def split_table(df: pd.DataFrame, cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, val). Uses the `split` column when present; else carves val_fraction out, stratified by label."""
    if "split" in df.columns and (df["split"] != "").any():
        s = df["split"].str.strip().str.lower()
        train, val = df[s == "train"], df[s.isin(["val", "valid", "validation"])]
        odd = list(dict.fromkeys(x for x in s if x not in ("train", "val", "valid", "validation", "test")))
        if odd:
            shown = ", ".join(repr(x) if x else "empty" for x in odd[:5])
            log.warning(f"{int(s.isin(odd).sum())} rows have a split train.py does not use ({shown}) and are left "
                        "out: use train, val or test")
        if len(val) == 0:   # train/test only: carve validation out of train
            train, val = stratified_split(train, cfg.val_fraction, cfg.seed)
    else:
        train, val = stratified_split(df, cfg.val_fraction, cfg.seed)
    excluded = [c.strip() for c in cfg.exclude_classes.split(",") if c.strip()]
    if excluded:
        unknown = sorted(set(excluded) - set(df["label"]))
        if unknown:
            raise UserError(f"--exclude-classes: unknown label(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(set(df['label'])))}")
        train = train[~train["label"].isin(excluded)]
    return train.reset_index(drop=True), val.reset_index(drop=True)


def stratified_split(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    val_idx = []
    for _, idx in df.groupby("label").indices.items():
        n = int(round(len(idx) * fraction)) if len(idx) > 1 else 0
        val_idx.extend(rng.permutation(idx)[:n].tolist())
    mask = np.zeros(len(df), dtype=bool)
    mask[val_idx] = True
    return df[~mask], df[mask]


def class_texts(df: pd.DataFrame, bank: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """label -> its distinct sentences (bank sentences if given, else the table's captions); for prototypes."""
    labels = [l for l in dict.fromkeys(df["label"]) if l != ""]
    if bank:
        return {l: list(bank[l]) for l in labels if l in bank}
    return {l: list(dict.fromkeys(df.loc[df["label"] == l, "caption"])) for l in labels}


def class_sentences(texts: dict[str, list[str]], classes: list[str]) -> tuple[list[str], list[int]]:
    """Every sentence of every class in `classes` and the index of its class (--contrast classes)."""
    missing = [c for c in classes if not texts.get(c)]
    if missing:
        raise UserError(f"--contrast classes: no sentence for class(es) {', '.join(missing)}")
    pairs = [(t, k) for k, c in enumerate(classes) for t in texts[c]]
    return [t for t, _ in pairs], [k for _, k in pairs]


def class_lookup(label_vocab: dict[str, int], classes: list[str]) -> torch.Tensor:
    """[V + 1] label id -> index of its class in `classes`, -1 if not there; the last slot answers label id -1."""
    lookup = torch.full((len(label_vocab) + 1,), -1)
    for k, c in enumerate(classes):
        lookup[label_vocab[c]] = k
    return lookup


# ----------------------------------------------------------------------------- images

class DecodeCache:
    """Decoded, resized faces kept in memory as uint8 (FER-2013 at 64 px: 12 KB a face, 0.4 GB for 32k), so epochs
    after the first skip PNG decoding and resizing. Per process (each loader worker holds its own); past
    `limit_bytes` the rest decode each epoch, said once."""

    def __init__(self, limit_bytes: int):
        self.limit, self.used, self.items, self.full = limit_bytes, 0, {}, False

    def get(self, i: int, path: str, decode) -> np.ndarray:
        arr = self.items.get(i)
        if arr is None:
            arr = decode(path)
            if self.used + arr.nbytes <= self.limit:
                self.items[i], self.used = arr, self.used + arr.nbytes
            elif not self.full:
                self.full = True
                log.info(f"image cache full at {len(self.items)} faces ({self.used / 2**30:.1f} GiB); "
                         "the rest are decoded each epoch (--cache-images false turns the cache off)")
        return arr


# ----------------------------------------------------------------------------- torch dataset

class PairDataset(torch.utils.data.Dataset):
    """(pixels [3,H,W], caption, group id, label idx) per row; Unreadable(path) for an image that cannot be decoded
    (dropped in collate)."""

    def __init__(self, df: pd.DataFrame, cfg: Config, train: bool, caption_vocab: dict[str, int],
                 label_vocab: dict[str, int], bank: dict[str, list[str]] | None = None,
                 dist_classes: list[str] | None = None):
        self.df, self.cfg, self.preprocess = df.reset_index(drop=True), cfg, Preprocess(cfg, train)
        # plain lists: a pandas row lookup per item cost more than decoding the face
        self.paths, self.labels, self.captions = (self.df[c].tolist() for c in ("path", "label", "caption"))
        self.cache = DecodeCache(CACHE_BYTES) if cfg.cache_images else None
        self.caption_vocab, self.label_vocab, self.bank = caption_vocab, label_vocab, bank
        # [N, C] target distribution over dist_classes (soft votes or one-hot labels), when the loss wants one
        self.dist = None if dist_classes is None else \
            target_distributions(self.df, dist_classes, soft=cfg.targets == "soft", source=cfg.captions)
        self.epoch = 0   # used for plain integer keys (validation); training keys carry their epoch

    def __len__(self) -> int:
        return len(self.df)

    def caption(self, i: int, epoch: int) -> str:
        label = self.labels[i]
        if not self.bank or label not in self.bank:
            return self.captions[i]
        options = self.bank[label]
        if self.cfg.caption_sampling == "random":   # a fresh paraphrase per image per epoch, reproducible
            rng = np.random.default_rng((self.cfg.seed, epoch, i))
            return options[int(rng.integers(len(options)))]
        return options[0]

    def __getitem__(self, key):
        """key: a row index, or (epoch, index) from an EpochBatches sampler (persistent workers see the epoch)."""
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        path = self.paths[i]
        # augmentation is a pure function of (seed, epoch, index): exact resume, same result with any worker count
        self.preprocess.seed(int(np.random.default_rng((self.cfg.seed, epoch, i)).integers(2**31)))
        try:
            if self.cache is None:
                pixels = self.preprocess(path)
            else:
                pixels = self.preprocess.finish(self.cache.get(i, path, self.preprocess.decode))
        except BadImage as e:
            log.warning(f"skipping unreadable image {e}")                     # one line, from any worker
            return Unreadable(path)
        cap = self.caption(i, epoch)
        label = self.label_vocab.get(self.labels[i], -1)
        group = label if self.cfg.positives == "label" and label >= 0 else self.caption_vocab[cap]
        if self.dist is not None:
            return pixels, cap, group, label, torch.from_numpy(self.dist[i])
        return pixels, cap, group, label


class EpochBatches:
    """Batch sampler whose batches are replaced each epoch, so one DataLoader (and its persistent workers) serves
    every epoch; it yields (epoch, index) keys so workers know the epoch without being told."""

    def __init__(self):
        self.epoch, self.batches = 0, []

    def set(self, epoch: int, batches: list[list[int]]) -> None:
        self.epoch, self.batches = epoch, batches

    def __iter__(self):
        return iter([[(self.epoch, i) for i in b] for b in self.batches])

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class Collate:
    """Stack images; tokenize each DISTINCT caption once and map pairs to it (text_index)."""
    tokenizer: object
    max_length: int

    def __call__(self, items):
        n_in = len(items)
        unreadable = [it.path for it in items if isinstance(it, Unreadable)]
        items = [it for it in items if isinstance(it, tuple)]
        if not items:
            return None
        pixels, caps, groups, labels = list(zip(*items))[:4]
        uniq = list(dict.fromkeys(caps))                          # U distinct captions, first-seen order
        pos = {c: k for k, c in enumerate(uniq)}
        tok = self.tokenizer(uniq, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return dict(pixels=torch.stack(pixels),                   # [B, 3, H, W]
                    input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],  # [U, L]
                    text_index=torch.tensor([pos[c] for c in caps]),                  # [B]
                    groups=torch.tensor(groups), labels=torch.tensor(labels), dropped=n_in - len(items),
                    unreadable=unreadable,
                    **({"dist": torch.stack([it[4] for it in items])} if len(items[0]) > 4 else {}))   # [B, C]


def build_vocabs(df: pd.DataFrame, bank: dict[str, list[str]] | None) -> tuple[dict[str, int], dict[str, int]]:
    """Dataset-wide caption and label ids (identical on every DDP rank, so gathered group ids agree)."""
    caps = list(df["caption"]) + [s for sentences in (bank or {}).values() for s in sentences]
    labels = sorted(l for l in set(df["label"]) if l != "")
    return {c: k for k, c in enumerate(dict.fromkeys(caps))}, {l: k for k, l in enumerate(labels)}


def target_distributions(df: pd.DataFrame, classes: list[str], soft: bool, source: str = "captions.csv") -> np.ndarray:
    """[N, C] float32 rows over `classes`: the `soft_labels` votes (JSON {class: share}) when soft, else one-hot labels.

    Mass on classes outside `classes` (e.g. --exclude-classes) is dropped and the rest renormalised; a row left with
    no mass falls back to its one-hot label, and a row whose label is not trained on stays all zero (no loss)."""
    col = {c: k for k, c in enumerate(classes)}
    out = np.zeros((len(df), len(classes)), np.float32)
    for i, label in enumerate(df["label"]):
        if label in col:
            out[i, col[label]] = 1.0
    if not soft:
        return out
    if "soft_labels" not in df.columns:
        raise UserError(f"{source}: --targets soft needs a `soft_labels` column (prepare.py --format ferplus writes "
                        "it), or pass --targets hard to train on the labels")
    for i, text in enumerate(df["soft_labels"]):
        votes = _parse_votes(text, f"{source} row {i + 2}")
        row = np.array([max(0.0, votes.get(c, 0.0)) for c in classes], np.float32)
        if row.sum() > 0:
            out[i] = row / row.sum()
    return out


def _parse_votes(text, where: str) -> dict[str, float]:
    if not isinstance(text, str) or not text.strip():
        return {}
    try:
        votes = json.loads(text)
        if not isinstance(votes, dict):
            raise ValueError
        return {str(k): float(v) for k, v in votes.items() if np.isfinite(float(v))}
    except (ValueError, TypeError):
        raise UserError(f"{where}: soft_labels is not a JSON object of class shares, e.g. "
                        '{"happiness":0.8,"surprise":0.2}; fix the cell or train with --targets hard')


# ----------------------------------------------------------------------------- what train.py trains on

@dataclass
class TrainData:
    train_df: pd.DataFrame
    val_df: pd.DataFrame
    label_vocab: dict[str, int]
    label_counts: dict[str, int]         # training label frequencies: checkpoint metadata (evaluate --prior train)
    class_texts: dict[str, list[str]]    # validation sentences per class; excluded classes left out (they stay unseen)
    train_classes: list[str] | None      # classes the loss sees as distributions (targets=soft or contrast=classes)
    caption_class: torch.Tensor | None   # [V + 1] label id -> index in train_classes (captions are drawn by label)
    train_ds: PairDataset
    val_ds: PairDataset


def build_train_data(cfg: Config) -> TrainData:
    """captions.csv -> the split, vocabularies, class sentences and datasets of a training run. Only trained labels
    reach the loss: an excluded class's votes and sentences never do."""
    df = read_captions(cfg)
    bank = None
    if cfg.caption_bank:
        from captions import canonical_name, load_caption_bank
        bank = load_caption_bank(cfg.caption_bank)
        df["label"] = [canonical_name(x) if str(x).strip() else "" for x in df["label"]]    # Happy, FEAR -> the bank's
        report_unbanked(df, bank, cfg.caption_bank)
    train_df, val_df = split_table(df, cfg)
    if len(train_df) < 2:
        raise UserError(f"only {len(train_df)} training rows after the split; add data or lower --val-fraction")
    cap_vocab, label_vocab = build_vocabs(df, bank)
    excluded = {c.strip() for c in cfg.exclude_classes.split(",") if c.strip()}
    texts = {l: t for l, t in class_texts(df, bank).items() if l not in excluded}
    soft_loss = cfg.targets == "soft" or cfg.contrast == "classes"
    classes = sorted(l for l in set(train_df["label"]) if l != "") if soft_loss else None
    if soft_loss and not classes:
        raise UserError("--targets soft / --contrast classes need a `label` column in captions.csv")
    return TrainData(train_df, val_df, label_vocab,
                     {str(k): int(v) for k, v in train_df["label"].value_counts().items() if k != ""}, texts, classes,
                     class_lookup(label_vocab, classes) if soft_loss else None,
                     PairDataset(train_df, cfg, True, cap_vocab, label_vocab, bank, classes),
                     PairDataset(val_df, cfg, False, cap_vocab, label_vocab, bank, classes))


def report_unbanked(df: pd.DataFrame, bank: dict, name: str) -> None:
    """One warning when labels have no sentence in the caption bank: those rows fall back to their caption column
    and are left out of validation (which scores the bank's classes)."""
    missing = df["label"].ne("") & ~df["label"].isin(list(bank))
    if missing.any():
        labels = list(dict.fromkeys(df.loc[missing, "label"]))
        log.warning(f"{int(missing.sum())} rows have labels with no sentence in --caption-bank {name} "
                    f"({', '.join(repr(x) for x in labels[:5])}{', ...' if len(labels) > 5 else ''}): they train on "
                    "their own caption and are left out of validation; rename them or add them to a bank CSV")
