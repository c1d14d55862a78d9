"""The bundled sample is what `python synth.py --out . --per-class 75 --size 64 --seed 0` regenerates."""
import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT
import synth
from synth import LABELS, describe, make_sample, sample_params


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bundled_sample_regenerates_byte_for_byte(tmp_path):
    df = make_sample(tmp_path, per_class=75, size=64, seed=0)
    shipped = pd.read_csv(ROOT / "captions.csv")
    assert df.equals(shipped.astype(df.dtypes.to_dict()))
    for name in df["image"].iloc[::97]:
        assert digest(tmp_path / "images" / name) == digest(ROOT / "images" / name)


def test_sample_layout_and_image_format():
    df = pd.read_csv(ROOT / "captions.csv")
    assert list(df.columns) == ["image", "caption", "label", "split"]
    assert sorted(df["label"].unique()) == sorted(LABELS) and df["label"].value_counts().nunique() == 1
    assert set(df["split"]) == {"train", "val"}
    im = Image.open(ROOT / "images" / df["image"].iloc[0])
    assert im.size == (64, 64) and im.mode == "L"


def test_captions_describe_the_drawn_parameters():
    rng = np.random.default_rng(0)
    for _ in range(30):
        happy = describe("happiness", sample_params("happiness", rng), rng)
        surprised = describe("surprise", sample_params("surprise", rng), rng)
        angry = describe("anger", sample_params("anger", rng), rng)
        assert "smile" in happy and "raised cheeks" in happy
        assert "wide-open eyes" in surprised and "raised eyebrows" in surprised
        assert "drawn together" in angry and "narrowed eyes" in angry


@pytest.mark.parametrize("flags", [["--per-class", "0"], ["--size", "100000"], ["--identities", "0"], ["--seed", "-1"]])
def test_sizes_that_would_empty_the_sample_or_exhaust_memory_are_refused_before_writing(tmp_path, capsys, flags):
    from utils import run_cli
    (tmp_path / "captions.csv").write_text("the user's table")
    assert run_cli(synth.main, ["--out", str(tmp_path)] + flags) == 2
    assert flags[0] in capsys.readouterr().err and (tmp_path / "captions.csv").read_text() == "the user's table"
    assert not (tmp_path / "images").exists()


def test_a_folder_holding_a_captions_csv_synth_did_not_write_is_refused_before_drawing(tmp_path, capsys):
    from utils import run_cli
    (tmp_path / "captions.csv").write_text("image,caption\nme.png,my own face\n")
    assert run_cli(synth.main, ["--out", str(tmp_path), "--per-class", "1", "--size", "16"]) == 2
    assert "synth.py did not write" in capsys.readouterr().err and not (tmp_path / "images").exists()
    (tmp_path / "images").mkdir()
    for name in ("mine.png", "happiness_001.png", "happiness_1234.png"):    # a user's files, one named like synth's
        (tmp_path / "images" / name).write_bytes(b"mine")
    assert run_cli(synth.main, ["--out", str(tmp_path), "--per-class", "1", "--size", "16", "--force"]) == 0
    assert len(pd.read_csv(tmp_path / "captions.csv")) == 8
    assert all((tmp_path / "images" / n).read_bytes() == b"mine" for n in ("mine.png", "happiness_001.png",
                                                                          "happiness_1234.png"))   # none removed
    assert run_cli(synth.main, ["--out", "", "--per-class", "1"]) == 2 and "--out ''" in capsys.readouterr().err


def test_a_hidden_file_beside_its_own_sample_does_not_make_synth_refuse_it(tmp_path):
    make_sample(tmp_path, per_class=1, size=16)
    (tmp_path / "images" / ".DS_Store").write_bytes(b"finder")
    assert len(make_sample(tmp_path, per_class=1, size=16)) == 8


def test_a_smaller_sample_over_an_earlier_one_leaves_no_unlisted_faces(tmp_path):
    make_sample(tmp_path, per_class=2, size=16)
    df = make_sample(tmp_path, per_class=1, size=16)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(df["image"])
    (tmp_path / "images" / "mine.png").write_bytes(b"x")                  # no longer only synth's: refused
    with pytest.raises(synth.UserError, match="did not write"):
        make_sample(tmp_path, per_class=1, size=16)


def test_the_default_out_is_a_new_folder_not_the_current_one(tmp_path, monkeypatch):
    from utils import run_cli
    monkeypatch.chdir(tmp_path)
    assert run_cli(synth.main, ["--per-class", "1", "--size", "16"]) == 0
    assert (tmp_path / "sample" / "captions.csv").is_file() and not (tmp_path / "captions.csv").exists()
