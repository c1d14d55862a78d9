"""The FER+ bench's evaluation-only sentence sets: unseen everyday phrasings (captions/everyday.csv) and compound
expressions (captions/compound.csv), and the check that none of their sentences occurs in a training bank."""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                    # run as a script from anywhere: the repo's modules import

import pandas as pd  # noqa: E402

from captions import CANONICAL, canonical_name, load_caption_bank  # noqa: E402
from utils import UserError, read_csv_checked  # noqa: E402

CLASSES = list(CANONICAL)                        # the eight FER+ emotions, paper order
COMPOUND = ROOT / "captions" / "compound.csv"    # evaluation only: pair,caption


def norm_sentence(s: str) -> str:
    """Case, punctuation and spacing folded: the key two sentences are compared by."""
    return " ".join(re.sub(r"[^\w\s']", " ", s.lower()).split())


def shared_sentences(a: dict[str, list[str]], b: dict[str, list[str]]) -> list[str]:
    """Sentences of bank `a` that also occur (normalised) in bank `b`."""
    seen = {norm_sentence(s) for v in b.values() for s in v}
    return [s for v in a.values() for s in v if norm_sentence(s) in seen]


def pair_key(text: str) -> str:
    """'fear+surprise' -> 'surprise+fear': two distinct known classes joined in CLASSES order."""
    parts = [canonical_name(p) for p in str(text).split("+")]
    if len(parts) != 2 or parts[0] == parts[1] or not set(parts) <= set(CLASSES):
        raise UserError(f"compound pair {text!r}: write two different classes of {', '.join(CLASSES)} as A+B")
    return "+".join(sorted(parts, key=CLASSES.index))


def load_compound(path: Path = COMPOUND) -> dict[str, list[str]]:
    """captions/compound.csv (pair,caption) -> {'a+b' in CLASSES order: [sentences]}."""
    df = read_csv_checked(path, ("pair", "caption"), hint="compound sentences need columns pair,caption")
    bank: dict[str, list[str]] = {}
    for row, (pair, caption) in enumerate(zip(df["pair"], df["caption"]), start=2):
        if not caption.strip():
            raise UserError(f"{path}: line {row} has an empty caption; fill it in or delete the row")
        try:
            bank.setdefault(pair_key(pair), []).append(caption.strip())
        except UserError as e:
            raise UserError(f"{path}: line {row}: {e}")
    return bank


def check_disjoint(eval_banks: dict[str, dict], train_banks: dict[str, dict]) -> None:
    """Evaluation-only sentences must not occur in any training bank (one line naming the first clash)."""
    for en, eb in eval_banks.items():
        for tn, tb in train_banks.items():
            if clash := shared_sentences(eb, tb):
                raise UserError(f"{en} sentence {clash[0]!r} also occurs in the training bank {tn}; "
                                f"rephrase it in captions/{en}.csv")


def training_banks(cfg_bank: str, data: Path) -> dict[str, dict]:
    """paper, rich and the run's own bank (its captions.csv captions when it trained on those)."""
    banks = {"paper": load_caption_bank("paper"), "rich": load_caption_bank("rich")}
    if cfg_bank and cfg_bank not in banks:
        banks[cfg_bank] = load_caption_bank(cfg_bank)
    if not cfg_bank:
        df = pd.read_csv(data / "captions.csv", dtype=str, keep_default_na=False)
        banks["captions.csv"] = {"": list(dict.fromkeys(df["caption"]))}
    return banks


if __name__ == "__main__":
    from cli_types import library_only
    raise SystemExit(library_only("ferplus_sentences.py"))
