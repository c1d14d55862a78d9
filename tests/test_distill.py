"""bench/distill.py: blended targets touch only train rows and follow the weight; the ensemble scores read as
evaluate.py does; the written captions.csv trains."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import distill  # noqa: E402
from dataset import target_distributions  # noqa: E402
from utils import UserError  # noqa: E402

CLASSES = ["anger", "happiness", "neutral"]


def test_blend_mixes_own_votes_or_one_hot_with_the_teachers_and_skips_undecoded_faces():
    train = pd.DataFrame(dict(image=["a.png", "b.png", "c.png"], label=["happiness", "anger", "neutral"],
                              soft_labels=['{"happiness": 0.6, "neutral": 0.4}', "", ""]))
    probs = np.array([[0.2, 0.6, 0.2], [0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])
    new = distill.blend(train, probs, np.array([True, True, False]), CLASSES, weight=0.25)
    assert set(new) == {"a.png", "b.png"}                                  # c did not decode: its cell stays
    a, b = (json.loads(new[k]) for k in ("a.png", "b.png"))
    assert a == pytest.approx({"anger": 0.05, "happiness": 0.6, "neutral": 0.35})    # 0.75 x votes + 0.25 x probs
    assert b == pytest.approx({"anger": 0.875, "happiness": 0.0625, "neutral": 0.0625})   # one-hot when no votes
    assert sum(a.values()) == pytest.approx(1.0)
    own = distill.blend(train, probs, np.ones(3, bool), CLASSES, weight=0.0)
    assert json.loads(own["c.png"]) == pytest.approx({"anger": 0, "happiness": 0, "neutral": 1})
    with pytest.raises(UserError, match="--weight"):
        distill.blend(train, probs, np.ones(3, bool), CLASSES, weight=1.5)


def test_score_of_one_teacher_reads_what_evaluate_reads_with_flip(trained, sample_dir, capsys):
    import evaluate
    ck = str(trained[0])
    assert distill.main(["score", "--teachers", ck, ck, "--data", str(sample_dir)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(r["teachers"]) for r in rows] == [1, 1, 2]                # each teacher, then the pair
    ref = evaluate.evaluate(ck, str(sample_dir), split="val", prompts="paper", tta=True)
    assert rows[0]["faces"] == ref["n_images"]
    assert rows[0]["paper_top1"] == pytest.approx(100 * ref["top1"], abs=0.01)
    assert rows[2]["paper_top1"] == rows[0]["paper_top1"] and len(rows[2]["sets"]) == 5   # a model with itself
    assert distill.main(["score", "--teachers", ck, "--data", str(sample_dir), "--split", "val,train"]) == 0
    pooled = json.loads(capsys.readouterr().out)
    train = evaluate.evaluate(ck, str(sample_dir), split="train", prompts="paper", tta=True)
    assert pooled["faces"] == ref["n_images"] + train["n_images"]
    assert pooled["paper_top1"] == pytest.approx(
        100 * (ref["top1"] * ref["n_images"] + train["top1"] * train["n_images"]) / pooled["faces"], abs=0.01)


def test_targets_rewrite_train_rows_only_and_the_result_trains(trained, sample_dir, tmp_path, capsys):
    import train
    ck, out = str(trained[0]), tmp_path / "kd"
    assert distill.main(["targets", "--teachers", ck, "--data", str(sample_dir), "--out", str(out),
                         "--weight", "0.5"]) == 0
    line = json.loads(capsys.readouterr().out)
    before = pd.read_csv(sample_dir / "captions.csv", dtype=str, keep_default_na=False)
    after = pd.read_csv(out / "captions.csv", dtype=str, keep_default_na=False)
    assert [Path(p).name for p in after["image"]] == [Path(p).name for p in before["image"]]
    assert line["rows"] == (before["split"] == "train").sum()
    rest = after["split"] != "train"
    assert (after.loc[rest, "soft_labels"] == "").all()                   # val rows keep no target of their own
    soft = target_distributions(after[~rest], sorted(set(after["label"])), soft=True)
    hard = target_distributions(after[~rest], sorted(set(after["label"])), soft=False)
    assert np.allclose(soft.sum(1), 1, atol=1e-4)
    assert ((soft >= 0.5 - 1e-4) == (hard == 1)).all()                    # half on its label, half on the teacher
    assert (soft[hard == 0] > 0).any()                                    # the teacher's mass elsewhere
    with pytest.raises(UserError, match="--weight"):                      # before any teacher is loaded
        distill.main(["targets", "--teachers", "missing.pth", "--data", str(sample_dir), "--out", str(tmp_path / "w"),
                      "--weight", "2"])
    with pytest.raises(UserError, match="exists"):                        # never written over
        distill.main(["targets", "--teachers", ck, "--data", str(sample_dir), "--out", str(out)])
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in after["image"])   # no copy of the images
    run = tmp_path / "run"
    assert train.main(["--preset", "tiny", "--data", str(out), "--targets", "soft", "--image-size", "48",
                       "--epochs", "1", "--batch-size", "32", "--num-workers", "0", "--augment", "false",
                       "--out-dir", str(run), "--final-path", str(run / "final.pth")]) == 0
    assert (run / "final.pth").is_file()
