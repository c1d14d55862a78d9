"""Caption banks (sentences per expression class) and picking a sentence for a label.

A bank is a CSV with columns `label,caption`, one row per sentence; `paper` and `rich` ship in captions/.
"""
from __future__ import annotations

import unicodedata
from pathlib import Path

from utils import UserError, read_csv_checked

# the source paper's 8 classes, in the paper's label order
CANONICAL = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt")
# other spellings datasets use -> canonical name
SYNONYMS = {
    "angry": "anger", "mad": "anger",
    "happy": "happiness", "joy": "happiness", "joyful": "happiness",
    "sad": "sadness", "sorrow": "sadness",
    "surprised": "surprise",
    "fearful": "fear", "afraid": "fear", "scared": "fear",
    "disgusted": "disgust",
    "contemptuous": "contempt",
    "neutrality": "neutral",
}
BANK_DIR = Path(__file__).resolve().parent / "captions"
SHIPPED_BANKS = ("paper", "rich")


def clean_name(name) -> str:
    """Trimmed, lower-case class name with inner whitespace collapsed, in Unicode NFC (a macOS zip's folder names
    come decomposed: U + combining diaeresis, not Ü)."""
    return " ".join(unicodedata.normalize("NFC", str(name)).strip().lower().split())


def canonical_name(name) -> str:
    """Class name in the canonical vocabulary where a synonym is known (happy -> happiness), else cleaned."""
    key = clean_name(name)
    return SYNONYMS.get(key, key)


def load_caption_bank(name_or_path: str = "paper") -> dict[str, list[str]]:
    """'paper', 'rich' or a CSV path with columns label,caption -> {canonical label: [sentences in file order]}.
    A comma list ('paper,rich') merges banks in order, each sentence once."""
    if "," in name_or_path:
        merged: dict[str, list[str]] = {}
        for part in filter(None, (p.strip() for p in name_or_path.split(","))):
            for label, sentences in load_caption_bank(part).items():
                merged[label] = list(dict.fromkeys(merged.get(label, []) + sentences))
        return merged
    path = BANK_DIR / f"{name_or_path}.csv" if name_or_path in SHIPPED_BANKS else Path(name_or_path)
    if not path.is_file():
        raise UserError(f"caption bank {name_or_path!r}: no such file; use paper, rich or a CSV with columns label,caption")
    df = read_csv_checked(path, ("label", "caption"), hint="a caption bank needs columns label,caption")
    bank: dict[str, list[str]] = {}
    blank = (df.apply(lambda col: col.str.strip()) == "").all(axis=1)            # `,,` rows a spreadsheet leaves
    for row, label, caption in zip(df.index[~blank] + 2, df["label"][~blank], df["caption"][~blank]):
        if not label.strip() or not caption.strip():
            raise UserError(f"{path}: line {row} has an empty label or caption; fill it in or delete the row")
        bank.setdefault(canonical_name(label), []).append(caption.strip())
    if not bank:
        raise UserError(f"{path}: caption bank has no rows; add lines label,caption")
    return bank


def caption_for(label: str, bank: dict[str, list[str]], rng=None, sampling: str = "first") -> str:
    """One sentence for `label`: the bank's first, or a random one drawn with `rng` (numpy Generator or random.Random)."""
    options = bank.get(label) or bank.get(canonical_name(label))
    if not options:
        raise UserError(f"caption bank has no sentence for class {label!r} (it has: {', '.join(bank)}); "
                        f"add rows '{label},<sentence>' to the bank CSV or map the class with --label-map")
    if sampling == "first":
        return options[0]
    if sampling != "random":
        raise UserError(f"caption sampling {sampling!r}: use first or random")
    if rng is None:
        raise ValueError("caption_for(sampling='random') needs an rng")
    i = rng.integers(len(options)) if hasattr(rng, "integers") else rng.randrange(len(options))
    return options[int(i)]
