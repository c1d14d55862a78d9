"""bench/select_score.py: the selection phrasings split into the halves the model-choice rules score."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import select_score  # noqa: E402


def test_selection_phrasings_split_into_first_and_last_twelve_per_class_and_language(tmp_path):
    rows = [(c, f"{c} {lang} {i}", lang) for lang in ("ko", "en") for c in ("anger", "happiness") for i in range(24)]
    src = tmp_path / "select.csv"
    pd.DataFrame(rows, columns=["label", "caption", "lang"]).sample(frac=1, random_state=0).sort_values(
        ["lang"], kind="stable").to_csv(src, index=False)           # classes interleaved, file order kept per class
    paths = select_score.half_banks(src, tmp_path)
    assert [Path(p).name for p in paths] == ["select_old_en.csv", "select_new_en.csv", "select_old_ko.csv",
                                             "select_new_ko.csv"]
    banks = [pd.read_csv(p) for p in paths]
    assert all(len(b) == 24 and (b["label"].value_counts() == 12).all() for b in banks)
    src_df = pd.read_csv(src)
    for path, b in zip(paths, banks):
        lang = "en" if path.endswith("_en.csv") else "ko"
        for label, group in b.groupby("label"):
            order = src_df[(src_df.label == label) & (src_df.lang == lang)]["caption"].tolist()
            want = order[:12] if "_old_" in path else order[12:]
            assert group["caption"].tolist() == want
    assert set(banks[0]["caption"]).isdisjoint(banks[1]["caption"])
