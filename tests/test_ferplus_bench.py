"""FER+ benchmark: vote-distribution metrics, compound pairs, AP gain, the evaluation-only sentence sets, and one
end-to-end run of bench/ferplus.py on a tiny FER+ layout with a 2-step tiny checkpoint."""
from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ferplus  # noqa: E402
import ferplus_report  # noqa: E402
import ferplus_sentences  # noqa: E402
import metrics  # noqa: E402
from captions import load_caption_bank  # noqa: E402
from utils import UserError  # noqa: E402

FERPLUS = ROOT.parent / "shared" / "data" / "ferplus"


# ----------------------------------------------------------------------------- vote distributions

def test_vote_agreement_matches_hand_computation():
    logits = np.array([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])     # p = [0.25, 0.75] on both rows
    votes = np.array([[1, 3], [5, 5]])                                   # q = [0.25, 0.75] and [0.5, 0.5]
    ce1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))               # = H(q1): KL 0
    ce2 = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    got = metrics.vote_agreement(logits, votes)
    assert got["ce"] == pytest.approx((ce1 + ce2) / 2)
    assert got["kl"] == pytest.approx((0 + ce2 - math.log(2)) / 2)
    assert got["entropy"] == pytest.approx((ce1 + math.log(2)) / 2)
    assert metrics.vote_agreement(np.zeros((2, 2)), votes)["ce"] == pytest.approx(math.log(2))   # uniform


def test_onehot_reference_is_infinite_on_split_votes_and_finite_smoothed():
    votes = np.array([[0, 10, 0], [0, 7, 3]])
    hard = metrics.vote_agreement(metrics.onehot_logits([1, 1], 3), votes)
    assert hard["ce"] == math.inf                                         # row 2 puts 0.3 on a ruled-out class
    assert metrics.vote_agreement(metrics.onehot_logits([1], 3), votes[:1])["ce"] == pytest.approx(0)
    soft = metrics.vote_agreement(metrics.onehot_logits([1], 3, smoothing=0.3), votes[1:])
    assert soft["ce"] == pytest.approx(-(0.7 * math.log(0.8) + 0.3 * math.log(0.1)))


def test_vote_agreement_rejects_rows_without_votes():
    with pytest.raises(UserError, match="at least one vote"):
        metrics.vote_agreement(np.zeros((1, 3)), np.zeros((1, 3)))


# ----------------------------------------------------------------------------- compound pairs, AP gain

def test_compound_pairs_from_a_small_vote_table():
    classes = ["neutral", "happiness", "surprise", "fear"]
    votes = np.array([[0, 4, 4, 2],        # happiness+surprise
                      [0, 3, 3, 3],        # happiness+surprise, happiness+fear, surprise+fear
                      [0, 0, 5, 4],        # surprise+fear
                      [0, 0, 6, 3],        # surprise+fear
                      [4, 6, 0, 0],        # neutral+happiness (only one face: dropped at min_faces 2)
                      [10, 0, 0, 0]])
    pairs = metrics.compound_pairs(votes, classes, min_votes=3, min_faces=2)
    assert list(pairs) == ["surprise+fear", "happiness+surprise"]        # most faces first
    assert pairs["surprise+fear"].tolist() == [False, True, True, True, False, False]
    assert pairs["happiness+surprise"].tolist() == [True, True, False, False, False, False]


def test_ap_gain_against_the_better_single_query():
    relevant = np.array([True, False, True, False])
    pair = np.array([0.9, 0.1, 0.8, 0.2])                               # both positives first: AP 1
    singles = np.array([[0.9, 0.0], [0.8, 0.9], [0.7, 0.1], [0.1, 0.8]])  # col 0: ranks 1, 3 -> AP 5/6
    g = metrics.ap_gain(pair, singles, relevant)
    assert g["ap"] == pytest.approx(1.0) and g["best_single_ap"] == pytest.approx(5 / 6)
    assert g["gain"] == pytest.approx(1 / 6) and g["single_aps"][1] < g["single_aps"][0]


# ----------------------------------------------------------------------------- sentence sets

def test_everyday_sentences_cover_all_classes_and_share_none_with_training_banks():
    bank = load_caption_bank(str(ferplus.EVERYDAY))
    assert set(bank) == set(ferplus.CLASSES) and all(6 <= len(v) <= 10 for v in bank.values())
    train = {"paper": load_caption_bank("paper"), "rich": load_caption_bank("rich")}
    ferplus_sentences.check_disjoint({"everyday": bank, "compound": ferplus_sentences.load_compound()}, train)
    with pytest.raises(UserError, match="also occurs in the training bank mine"):
        ferplus_sentences.check_disjoint({"everyday": bank}, {"mine": {"contempt": ["Smug!"]}})   # case/punctuation folded


def test_compound_sentences_load_in_class_order_and_reject_bad_pairs(tmp_path):
    bank = ferplus_sentences.load_compound()
    assert "surprise+fear" in bank and "happiness+surprise" in bank and all(2 <= len(v) <= 3 for v in bank.values())
    assert ferplus_sentences.pair_key("Fear + surprised") == "surprise+fear"
    (tmp_path / "c.csv").write_text("pair,caption\nfear+fear,a face\n")
    with pytest.raises(UserError, match=r"c\.csv: line 2: compound pair 'fear\+fear'"):
        ferplus_sentences.load_compound(tmp_path / "c.csv")


@pytest.mark.skipif(not (FERPLUS / "fer2013new.csv").is_file(), reason="FER+ not in ../shared/data/ferplus")
def test_compound_sentences_cover_every_pair_kept_on_ferplus_valid():
    votes = ferplus.vote_table(FERPLUS)
    valid = np.array([v for (folder, _), v in votes.items() if folder == "FER2013Valid"])
    pairs = metrics.compound_pairs(valid, ferplus.CLASSES, 3, 20)
    assert len(pairs) >= 6 and set(pairs) <= set(ferplus_sentences.load_compound())


def test_upsert_section_replaces_only_its_own_section():
    old = "# Benchmarks: FER-2013\n\nrow\n\n## FER+ (old)\n\nstale\n\n## Other\n\nkept\n"
    new = ferplus_report.upsert_section(old, "## FER+ (new)\n\nfresh\n")
    assert "stale" not in new and "fresh" in new and new.index("fresh") < new.index("## Other")
    assert new.startswith("# Benchmarks: FER-2013") and new.endswith("kept\n")
    assert ferplus_report.upsert_section("# A\n", "## FER+ x\n") == "# A\n\n## FER+ x\n"
    top = ferplus_report.upsert_section(old, "# Benchmarks: FER-2013\n\nnew row\n", "# Benchmarks: FER-2013")
    assert top.startswith("# Benchmarks: FER-2013\n\nnew row\n\n## FER+ (old)")
    assert "stale" in top and "\nrow" not in top                    # the other section kept, the old rows gone


# ----------------------------------------------------------------------------- end to end

def face(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 48), dtype=np.uint8)).save(path)


def tiny_ferplus(root: Path) -> None:
    """FER+ layout: 16 train and 16 PublicTest faces (2 per emotion), some with a 3-vote second emotion."""
    order = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"]   # CSV order
    partner = {"surprise": "fear", "fear": "surprise", "happiness": "surprise"}
    rows, k = [], 0
    for usage, folder in (("Training", "FER2013Train"), ("PublicTest", "FER2013Valid")):
        for emo in order:
            for i in range(2):
                v = dict.fromkeys(order + ["unknown", "NF"], 0)
                v[emo] = 7 if emo in partner else 10
                if emo in partner:
                    v[partner[emo]] = 3
                name = f"fer{k:07d}.png"
                face(root / folder / name, k)
                rows.append([usage, name] + [v[c] for c in order + ["unknown", "NF"]])
                k += 1
    pd.DataFrame(rows, columns=["Usage", "Image name", *order, "unknown", "NF"]).to_csv(root / "fer2013new.csv",
                                                                                         index=False)


def test_bench_ferplus_end_to_end_on_a_checkpoint(tmp_path):
    import prepare
    import train
    tiny_ferplus(tmp_path / "ferplus")
    for i, cls in enumerate(["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]):
        face(tmp_path / "fer2013" / "test" / cls / f"PublicTest_{i}.png", 100 + i)
    prepare.convert(tmp_path / "ferplus", "ferplus", tmp_path / "tinydata", verify=False)
    ckpt = tmp_path / "tiny.pth"
    assert train.main(["--preset", "tiny", "--data", str(tmp_path / "tinydata"), "--caption-bank", "paper",
                       "--image-size", "32", "--batch-size", "8", "--max-steps", "2", "--epochs", "1",
                       "--out-dir", str(tmp_path / "run"), "--final-path", str(ckpt), "--num-workers", "0"]) == 0
    out = tmp_path / "BENCH.md"
    out.write_text("# Benchmarks: FER-2013\n\nkept\n")
    assert ferplus.main(["--ferplus", str(tmp_path / "ferplus"), "--fer2013", str(tmp_path / "fer2013"),
                         "--work", str(tmp_path / "work"), "--out", str(out), "--checkpoint", str(ckpt),
                         "--min-pair-faces", "2"]) == 0
    md = out.read_text()
    assert md.startswith("# Benchmarks: FER-2013\n\nkept\n\n## FER+")
    assert "16 faces = the FER-2013 PublicTest faces" in md and "Train: FER2013Train (16 faces" in md
    row = f"| {ckpt} |"
    assert md.count(row) >= 5                                   # one row in each of the five tables
    assert f"| {ckpt} | surprise+fear | 4 |" in md and f"| {ckpt} | happiness+surprise | 2 |" in md
    assert "| reference: uniform over 8 | 2.079 | " in md      # ln 8
    assert f"| {ckpt} | yes | 2 | " in md                       # contempt: in training, 2 evaluation faces
    assert "python bench/ferplus.py --checkpoint" in md
    ferplus.main(["--ferplus", str(tmp_path / "ferplus"), "--work", str(tmp_path / "work"), "--out", str(out),
                  "--checkpoint", str(ckpt), "--min-pair-faces", "2"])     # cached: same section, not appended
    assert out.read_text().count("## FER+") == 1
    before = out.read_text()
    ferplus.main(["--ferplus", str(tmp_path / "ferplus"), "--work", str(tmp_path / "work"),
                  "--checkpoint", str(ckpt), "--min-pair-faces", "2"])     # no --out: the work folder's report
    assert (tmp_path / "work" / "report.md").read_text().startswith("## FER+") and out.read_text() == before


def test_val_fraction_holds_out_its_own_stratified_split_in_its_own_folder(tmp_path):
    tiny_ferplus(tmp_path / "ferplus")
    default = ferplus.prepare_data(tmp_path / "ferplus", tmp_path / "work", 0)
    wider = ferplus.prepare_data(tmp_path / "ferplus", tmp_path / "work", 0, with_sample=True, val_fraction=0.3)
    assert (default.name, wider.name) == ("data", "data_val30_sample")
    base = pd.read_csv(default / "captions.csv")
    held = pd.read_csv(tmp_path / "work" / "data_val30" / "captions.csv")
    assert (base["split"] == "val").sum() == 0                  # 3% of 2 faces per emotion rounds to none
    val = held[held["split"] == "val"]
    assert len(val) == 8 and val["label"].nunique() == 8        # 30%: one face of each emotion
    assert (held["split"] == "test").sum() == 16 and sorted(held["image"]) == sorted(base["image"])
    with pytest.raises(UserError, match=r"--val-fraction 0.5: use a share of train"):
        ferplus.main(["--ferplus", str(tmp_path / "ferplus"), "--work", str(tmp_path / "w2"), "--val-fraction", "0.5"])


def test_each_selection_fraction_has_its_own_data_folder_name():
    names = [ferplus.data_name(x) for x in (ferplus.VAL_FRACTION, 0.1, 0.101, 0.3)]
    assert names[:2] == ["data", "data_val10"] and len(set(names)) == 4


def test_reproduce_commands_carry_a_non_default_val_fraction_and_only_then():
    def plan(**kw):
        a = SimpleNamespace(recipe=None, limit=0, val_fraction=ferplus.VAL_FRACTION, with_sample=False,
                            min_pair_faces=20, work=ferplus.WORK, checkpoint=None, runs="main", extra="", epochs=3)
        return [shlex.split(p["command"]) for p in ferplus.run_plan(SimpleNamespace(**{**vars(a), **kw}))]
    assert "--val-fraction" not in plan()[0]
    wider = plan(val_fraction=0.1, limit=10000)[0]
    assert wider[wider.index("--val-fraction") + 1] == "0.1" and wider[wider.index("--limit") + 1] == "10000"
    ckpt = plan(val_fraction=0.1, checkpoint="x.pth")[0]
    assert ckpt[:4] == ["python", "bench/ferplus.py", "--checkpoint", "x.pth"] and "0.1" in ckpt
