"""captions.csv reading, splits, bad rows and images, grayscale handling, the dedup collate."""
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from config import make_config
from dataset import Collate, PairDataset, build_vocabs, read_captions, split_table, stratified_split
from transform import BadImage, open_image
from utils import UserError


def write_set(tmp_path, rows, images=None):
    (tmp_path / "images").mkdir(exist_ok=True)
    for name in images or [r["image"] for r in rows]:
        Image.fromarray(np.full((20, 20), 128, np.uint8)).save(tmp_path / "images" / name)
    pd.DataFrame(rows).to_csv(tmp_path / "captions.csv", index=False)
    return make_config(dict(data=str(tmp_path), image_size=16), preset="tiny")


def test_missing_column_named_in_one_line(tmp_path):
    cfg = write_set(tmp_path, [dict(image="a.png", text="x")])
    with pytest.raises(UserError, match="missing required column.*caption"):
        read_captions(cfg)


def test_missing_files_skipped_with_a_count_in_one_line(tmp_path, capsys):
    rows = [dict(image=f"{i}.png", caption="c", label="happiness") for i in range(5)]
    cfg = write_set(tmp_path, rows, images=["0.png", "1.png", "2.png"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # a line of our own, not a two-line Python warning
        df = read_captions(cfg)
    assert len(df) == 3 and df.attrs["skipped"]["missing file"] == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 of 5 listed images are missing" in err and "3.png" in err


def test_rows_without_a_caption_are_counted_and_a_bank_keeps_them_under_its_own_label_spelling(tmp_path, capsys):
    from dataclasses import replace

    from dataset import build_train_data
    labels = ["Happy", "sad ", "FEAR", "happiness", "pain", "sadness"] * 4
    rows = [dict(image=f"{i}.png", caption="" if i % 2 else "a face", label=l) for i, l in enumerate(labels)]
    cfg = write_set(tmp_path, rows)
    df = read_captions(cfg)                                       # no bank: a row needs its caption
    assert len(df) == 12 and df.attrs["skipped"]["no image or caption"] == 12
    assert "12 of 24 rows have no image or no caption (or pass --caption-bank" in capsys.readouterr().err
    data = build_train_data(replace(cfg, caption_bank="paper", val_fraction=0.0))
    assert len(data.train_df) == 24 and set(data.train_df["label"]) == {"happiness", "sadness", "fear", "pain"}
    assert "4 rows have labels with no sentence in --caption-bank paper ('pain')" in capsys.readouterr().err


def test_relative_paths_climbing_out_of_the_data_folder_are_refused(tmp_path, capsys):
    """A row `../secret.png` is never opened: refused, counted in one line; absolute paths stay allowed (prepare.py
    lists datasets referenced in place that way); `images/../x.png` staying inside is fine."""
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "secret.png")      # exists, outside the data folder
    rows = [dict(image=name, caption="c", label="happiness")
            for name in ["0.png", "../secret.png", "images/../../secret.png", "images/../images/0.png",
                         str(tmp_path / "secret.png")]]
    cfg = write_set(data, rows, images=["0.png"])
    df = read_captions(cfg)
    assert [Path(p).name for p in df["path"]] == ["0.png", "0.png", "secret.png"]
    assert all(Path(p).resolve().parent == (data / "images").resolve() for p in df["path"][:2])
    assert df.attrs["skipped"] == {"outside the data folder": 2, "missing file": 0, "no image or caption": 0}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 of 5 relative image paths outside" in err and "line 3: ../secret.png" in err
    import evaluate                                   # evaluate reads through read_captions: counted, not printed
    table, skipped = evaluate.read_data(str(data))
    assert skipped["outside the data folder"] == 2 and len(table) == 3 and capsys.readouterr().err == ""


def test_a_captions_file_with_only_its_header_says_so(tmp_path):
    (tmp_path / "captions.csv").write_text("image,caption,label,split\n")
    with pytest.raises(UserError, match="no rows below the header"):
        read_captions(make_config(dict(data=str(tmp_path))))


def test_missing_captions_file_is_explained(tmp_path):
    with pytest.raises(UserError, match="captions file not found"):
        read_captions(make_config(dict(data=str(tmp_path))))


def test_split_column_is_used_and_val_carved_when_absent(tmp_path):
    rows = [dict(image=f"{i}.png", caption=f"c{i % 2}", label=["a", "b"][i % 2], split="train" if i < 8 else "val")
            for i in range(10)]
    cfg = write_set(tmp_path, rows)
    train, val = split_table(read_captions(cfg), cfg)
    assert (len(train), len(val)) == (8, 2)
    df = pd.DataFrame(dict(label=["a"] * 10 + ["b"] * 30, caption="x", image="y"))
    tr, va = stratified_split(df, 0.2, seed=0)
    assert (va["label"] == "a").sum() == 2 and (va["label"] == "b").sum() == 6    # stratified
    assert set(tr.index).isdisjoint(va.index)


def test_split_values_train_does_not_use_are_named_not_dropped_silently(tmp_path, capsys):
    rows = [dict(image=f"{i}.png", caption="c", label="happiness", split=sp)
            for i, sp in enumerate(["train", "train", "Val ", "tst", "test", "tst", ""])]
    train, val = split_table(read_captions(write_set(tmp_path, rows)), make_config(dict(data=str(tmp_path))))
    assert len(train) == 2 and len(val) == 1
    assert "3 rows have a split train.py does not use ('tst', empty) and are left out" in capsys.readouterr().err


def test_exclude_classes_drops_them_from_training_only(tmp_path):
    rows = [dict(image=f"{i}.png", caption="c", label=["happiness", "surprise"][i % 2],
                 split="train" if i < 8 else "val") for i in range(10)]
    cfg = write_set(tmp_path, rows)
    cfg.exclude_classes = "surprise"
    train, val = split_table(read_captions(cfg), cfg)
    assert set(train["label"]) == {"happiness"} and "surprise" in set(val["label"])
    cfg.exclude_classes = "surprize"
    with pytest.raises(UserError, match="unknown label.*surprize"):
        split_table(read_captions(cfg), cfg)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_any_image_mode_becomes_three_channels(tmp_path, mode):
    p = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    im = Image.new("RGB", (10, 12), (200, 10, 10))
    im = Image.new("I;16", (10, 12), 40000) if mode == "I;16" else im.convert(mode)
    im.save(p)
    a = open_image(p, grayscale=True)
    assert a.shape == (12, 10, 3) and a.dtype == np.uint8
    assert (a[..., 0] == a[..., 1]).all()        # gray replicated to 3 channels


def test_corrupt_image_is_skipped_in_the_batch_with_one_line(tmp_path, capsys):
    rows = [dict(image=f"{i}.png", caption=f"cap {i % 2}", label="happiness") for i in range(3)]
    cfg = write_set(tmp_path, rows)
    (tmp_path / "images" / "1.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(BadImage):
        open_image(tmp_path / "images" / "1.png", True)
    df = read_captions(cfg)
    caps, labels = build_vocabs(df, None)
    ds = PairDataset(df, cfg, False, caps, labels)
    from model import build_text_encoder
    _, tok = build_text_encoder(cfg, load_weights=False)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # no Python warning (two lines, a torch-internal source line)
        batch = Collate(tok, 16)([ds[i] for i in range(3)])
    assert batch["pixels"].shape == (2, 3, 16, 16) and batch["dropped"] == 1
    assert [Path(p).name for p in batch["unreadable"]] == ["1.png"]        # the trainer counts these per epoch
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("skipping unreadable image") and "1.png" in err


def test_collate_tokenizes_each_distinct_caption_once(tmp_path):
    from model import build_text_encoder
    _, tok = build_text_encoder(make_config(preset="tiny"), load_weights=False)
    x = torch.zeros(3, 4, 4)
    b = Collate(tok, 16)([(x, "smile", 0, 0), (x, "frown", 1, 1), (x, "smile", 0, 0), (x, "smile", 0, 0)])
    assert b["input_ids"].shape[0] == 2
    assert b["text_index"].tolist() == [0, 1, 0, 0]


def test_epoch_travels_with_the_index_so_persistent_workers_see_it(tmp_path):
    """Random paraphrases and augmentation depend on (seed, epoch, index) carried in the sampler's keys."""
    from dataset import EpochBatches
    rows = [dict(image=f"{i}.png", caption="c", label="happiness") for i in range(4)]
    cfg = write_set(tmp_path, rows)
    cfg.caption_sampling = "random"
    bank = {"happiness": [f"paraphrase {k}" for k in range(12)]}
    df = read_captions(cfg)
    caps, labels = build_vocabs(df, bank)
    ds = PairDataset(df, cfg, True, caps, labels, bank)
    sampler = EpochBatches()
    seen = []
    for epoch in range(4):
        sampler.set(epoch, [[0, 1]])
        (batch,) = list(sampler)
        assert batch == [(epoch, 0), (epoch, 1)]
        seen.append(ds[batch[0]][1])
    assert len(set(seen)) > 1 and ds[(2, 0)][1] == seen[2]        # varies by epoch, reproducible


def test_decode_cache_gives_the_same_augmented_pixels_and_decodes_each_face_once(tmp_path, monkeypatch):
    """--cache-images keeps the resized uint8 face: later epochs give bit-identical tensors without decoding."""
    import dataclasses
    import transform
    rows = [dict(image=f"{i}.png", caption="c", label="happiness") for i in range(4)]
    cfg = write_set(tmp_path, rows)
    rng = np.random.default_rng(0)
    for i in range(4):                               # textured faces, so a wrong flip or crop shows
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    df = read_captions(cfg)
    caps, labels = build_vocabs(df, None)
    plain = PairDataset(df, dataclasses.replace(cfg, cache_images=False), True, caps, labels)
    cached = PairDataset(df, dataclasses.replace(cfg, cache_images=True), True, caps, labels)
    calls = []
    real = transform.open_image
    monkeypatch.setattr(transform, "open_image", lambda im, g: (isinstance(im, (str, Path)) and calls.append(im)) or real(im, g))
    for epoch in range(3):
        for i in range(4):
            assert torch.equal(plain[(epoch, i)][0], cached[(epoch, i)][0])
    assert len(calls) == 3 * 4 + 4                  # plain decodes every epoch, the cache once per face


def test_decode_cache_stops_at_its_limit_and_says_so_once(monkeypatch):
    import dataset
    from dataset import DecodeCache
    said = []
    monkeypatch.setattr(dataset.log, "info", lambda msg, *a, **k: said.append(msg))
    cache = DecodeCache(limit_bytes=2 * 12)
    decode = lambda p: np.zeros((2, 2, 3), np.uint8)    # 12 bytes a face
    for i in range(5):
        assert cache.get(i, f"{i}.png", decode).shape == (2, 2, 3)
    assert sorted(cache.items) == [0, 1] and cache.used == 24
    assert sum("image cache full" in m for m in said) == 1


def test_photo_degradations_change_train_pixels_reproducibly_and_never_eval(tmp_path):
    import dataclasses
    from transform import Preprocess
    rng = np.random.default_rng(1)
    path = tmp_path / "f.png"
    Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(path)
    cfg = dataclasses.replace(make_config(preset="tiny"), image_size=32, augment_photo=True)
    plain, photo = Preprocess(dataclasses.replace(cfg, augment_photo=False), True), Preprocess(cfg, True)
    differs = []
    for seed in range(12):
        plain.seed(seed), photo.seed(seed)
        a, b = plain(path), photo(path)
        photo.seed(seed)
        assert torch.equal(photo(path), b)                       # a function of the seed (exact resume)
        differs.append(not torch.equal(a, b))
    assert any(differs)                                          # the degradations do something
    assert torch.equal(Preprocess(cfg, False)(path), Preprocess(cfg, False)(path))   # eval: none of it


def test_source_side_reduces_big_faces_to_the_training_resolution_and_leaves_small_ones(tmp_path):
    import dataclasses
    from transform import Preprocess, reduce_to
    rng = np.random.default_rng(2)
    small = Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8))
    big = small.resize((192, 192), Image.NEAREST)                # a sharp, blocky 192 px face: detail past 48 px
    wide = np.zeros((100, 300, 3), np.uint8)
    assert reduce_to(wide, 48).shape == (16, 48, 3)              # longer side to 48, aspect kept
    assert reduce_to(wide, 0) is wide and reduce_to(wide, 300) is wide    # off, or not larger: untouched
    cfg = dataclasses.replace(make_config(preset="tiny"), image_size=32)
    off, on = Preprocess(cfg), Preprocess(dataclasses.replace(cfg, source_side=48))
    assert torch.equal(on(small), off(small))                    # FER's own 48 px faces: unchanged
    seen = on(big)
    assert not torch.equal(seen, off(big))                       # the big face is reduced first ...
    reduced = big.convert("RGB").resize((48, 48), Image.LANCZOS)
    assert torch.equal(seen, off(reduced))                       # ... exactly to what a 48 px face would give


def test_evaluation_reads_a_table_without_captions_and_training_still_needs_them(tmp_path):
    cfg = write_set(tmp_path, [dict(image="a.png", label="happiness"), dict(image="b.png", label="sadness")])
    assert list(read_captions(cfg, need_caption=False)["label"]) == ["happiness", "sadness"]
    with pytest.raises(UserError, match="missing required column.*caption"):
        read_captions(cfg)


def test_a_comma_ending_every_row_keeps_the_columns_and_other_extra_fields_are_refused(tmp_path):
    cfg = write_set(tmp_path, [dict(image="a.png", caption="c", label="happiness")])
    (tmp_path / "captions.csv").write_text("image,caption,label\na.png,a face,happiness,\n")   # spreadsheet export
    df = read_captions(cfg)
    assert df[["image", "caption", "label"]].values.tolist() == [["a.png", "a face", "happiness"]]
    (tmp_path / "captions.csv").write_text("image,caption,label,\na.png,a face,happiness,\n")  # header too
    df = read_captions(cfg)
    assert df[["image", "caption", "label"]].values.tolist() == [["a.png", "a face", "happiness"]]
    assert "Unnamed: 3" not in df
    (tmp_path / "captions.csv").write_text("image,caption,label\na.png,c,happiness\na.png,a, sad face,sadness\n")
    with pytest.raises(UserError, match=r"captions\.csv: line 3 has more fields than the header's 3; quote"):
        read_captions(cfg)
