"""captions.py: shipped banks, user banks, sentence choice."""
import random
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from captions import CANONICAL, SYNONYMS, caption_for, load_caption_bank  # noqa: E402
from utils import UserError  # noqa: E402

PAPER_CSV = Path(__file__).resolve().parents[2] / "shared" / "paper_captions.csv"
EMOTION_WORDS = set(CANONICAL) | set(SYNONYMS) | {"happily", "sadly", "angrily", "fearfully", "surprising", "neutral"}


def test_paper_bank_is_the_papers_eight_sentences():
    bank = load_caption_bank("paper")
    assert list(bank) == list(CANONICAL) and all(len(v) == 1 for v in bank.values())
    assert bank["contempt"][0].startswith("An expression of disdain and superiority")
    if PAPER_CSV.is_file():
        paper = pd.read_csv(PAPER_CSV)
        assert {r.class_name: r.caption for r in paper.itertuples()} == {k: v[0] for k, v in bank.items()}


def test_rich_bank_many_distinct_paraphrases_with_facial_action_wording():
    bank = load_caption_bank("rich")
    assert set(bank) == set(CANONICAL) and all(len(v) >= 8 for v in bank.values())
    every = [s for v in bank.values() for s in v]
    assert len(set(every)) == len(every)  # no sentence reused, not even across classes
    for label, sentences in bank.items():
        words = [set(s.lower().replace(",", " ").replace(":", " ").split()) for s in sentences]
        action_only = [s for s, w in zip(sentences, words) if not w & EMOTION_WORDS]
        assert len(action_only) >= 4, label  # describes the face without naming the emotion
        assert min(map(len, sentences)) < 25 and max(map(len, sentences)) > 60, label  # short and long forms
    # attributes shared across classes, so an unseen class can be composed from seen ones
    for phrase, at_least in (("wide-open eyes", 2), ("raised eyebrow", 3), ("open mouth", 3), ("lip corner", 3)):
        assert sum(any(phrase in s for s in v) for v in bank.values()) >= at_least, phrase


def test_user_bank_csv_synonyms_and_errors(tmp_path):
    pd.DataFrame({"label": ["happy", "Happy", "pain"], "caption": ["a smile", "a grin", "a grimace of pain"]}).to_csv(
        tmp_path / "mine.csv", index=False)
    assert load_caption_bank(str(tmp_path / "mine.csv")) == {"happiness": ["a smile", "a grin"],
                                                            "pain": ["a grimace of pain"]}
    pd.DataFrame({"class": ["happy"], "text": ["a smile"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(UserError, match=r"bad\.csv: missing required column\(s\) label, caption"):
        load_caption_bank(str(tmp_path / "bad.csv"))
    pd.DataFrame({"label": ["happy", "sad"], "caption": ["a smile", " "]}).to_csv(tmp_path / "gap.csv", index=False)
    with pytest.raises(UserError, match="line 3"):
        load_caption_bank(str(tmp_path / "gap.csv"))
    with pytest.raises(UserError, match="no such file"):
        load_caption_bank("fancy")
    (tmp_path / "ko.csv").write_bytes("label,caption\nhappy,a smile\nanger,화난 얼굴\n".encode("cp949"))  # Windows
    with pytest.raises(UserError, match=r"ko\.csv: line 3 is not UTF-8 text; save the file as UTF-8"):
        load_caption_bank(str(tmp_path / "ko.csv"))


def test_caption_for_first_random_seeded():
    bank = load_caption_bank("rich")
    assert caption_for("happiness", bank) == bank["happiness"][0]
    assert caption_for("happy", bank, sampling="first") == bank["happiness"][0]  # synonym accepted
    draws = [caption_for("fear", bank, np.random.default_rng(0), "random") for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same sentence
    rng = np.random.default_rng(0)
    seq = [caption_for("fear", bank, rng, "random") for _ in range(60)]
    rng2 = np.random.default_rng(0)
    assert seq == [caption_for("fear", bank, rng2, "random") for _ in range(60)]
    assert set(seq) == set(bank["fear"])  # random covers every paraphrase
    py = random.Random(1)
    assert {caption_for("fear", bank, py, "random") for _ in range(60)} == set(bank["fear"])
    with pytest.raises(UserError, match="no sentence for class 'pain'"):
        caption_for("pain", bank)
    with pytest.raises(UserError, match="caption sampling"):
        caption_for("fear", bank, rng, "best")


def test_a_comma_list_merges_banks_in_order_without_repeats():
    merged = load_caption_bank("paper,rich,paper")
    paper, rich = load_caption_bank("paper"), load_caption_bank("rich")
    assert merged["contempt"] == paper["contempt"] + [s for s in rich["contempt"] if s not in paper["contempt"]]
    assert set(merged) == set(paper) | set(rich)


def test_blank_rows_a_spreadsheet_leaves_are_ignored_and_half_empty_ones_refused(tmp_path):
    (tmp_path / "b.csv").write_text("label,caption,note\nhappy,a smile,\n,,\n , ,\nsad,a frown,x\n")
    assert load_caption_bank(str(tmp_path / "b.csv")) == {"happiness": ["a smile"], "sadness": ["a frown"]}
    (tmp_path / "c.csv").write_text("label,caption\nhappy,a smile\n,,\nsad,\n")
    with pytest.raises(UserError, match=r"c\.csv: line 4 has an empty label or caption"):
        load_caption_bank(str(tmp_path / "c.csv"))


def test_class_names_decomposed_by_a_mac_zip_match_the_composed_spelling():
    from captions import clean_name
    assert clean_name("U\u0308berraschung ") == clean_name("\u00dcberraschung") == "\u00fcberraschung"
