"""prepare.py: every format from a tiny fixture, bad inputs, merging; the real FER-2013 folder where present."""
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prepare as P  # noqa: E402
from captions import load_caption_bank  # noqa: E402
from utils import UserError, run_cli  # noqa: E402

FER2013 = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013"
PAPER = load_caption_bank("paper")


def img(path: Path, mode: str = "L", size=(48, 48), seed: int = 0) -> Path:
    """Write a small random image of `mode` at path (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65536, size[::-1], dtype=np.uint16)).save(path)
    elif mode == "P":
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).convert("P").save(path)
    else:
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).convert(mode).save(path)
    return path


def read(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "captions.csv", dtype=str, keep_default_na=False)


def opened(out: Path, image: str) -> Image.Image:
    p = Path(image)
    return Image.open(p if p.is_absolute() else out / p)


# ----------------------------------------------------------------------------- fer2013-csv

def fer_csv(path: Path, n: int = 20, usage: bool = True) -> np.ndarray:
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, (n, 2304))
    df = pd.DataFrame({"emotion": np.arange(n) % 7, "pixels": [" ".join(map(str, p)) for p in pix]})
    if usage:
        df["Usage"] = ["Training"] * (n - 6) + ["PublicTest"] * 3 + ["PrivateTest"] * 3
    df.to_csv(path, index=False)
    return pix


def test_fer2013_csv(tmp_path):
    pix = fer_csv(tmp_path / "fer2013.csv")
    table = P.convert(tmp_path / "fer2013.csv", "fer2013-csv", tmp_path / "out")
    df = read(tmp_path / "out")
    assert list(df.columns) == ["image", "caption", "label", "split"] and len(df) == 20 == len(table)
    assert df["split"].value_counts().to_dict() == {"train": 14, "val": 3, "test": 3}
    # 0..6 = angry,disgust,fear,happy,sad,surprise,neutral, harmonised
    assert df["label"].tolist()[:7] == ["anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"]
    assert df["caption"][3] == PAPER["happiness"][0]
    assert not Path(df["image"][0]).is_absolute() and df["image"][0].startswith("images/fer2013/train/")
    im = opened(tmp_path / "out", df["image"][5])
    assert im.size == (48, 48) and im.mode == "L"
    assert (np.asarray(im).reshape(-1) == pix[5]).all()


def test_fer2013_csv_bad_rows_counted_and_missing_column(tmp_path):
    fer_csv(tmp_path / "f.csv", n=10, usage=False)
    df = pd.read_csv(tmp_path / "f.csv")
    df.loc[1, "pixels"] = "1 2 3"
    df.loc[2, "emotion"] = 9
    df.to_csv(tmp_path / "f.csv", index=False)
    table = P.convert(tmp_path / "f.csv", "fer2013-csv", tmp_path / "out")
    assert len(table) == 8 and set(table["split"]) == {""}
    assert table.attrs["report"]["skipped"] == {"bad pixels (not 2304 ints in 0..255)": 1, "emotion not in 0..6": 1}
    df.drop(columns="pixels").to_csv(tmp_path / "g.csv", index=False)
    with pytest.raises(UserError, match=r"g\.csv: missing required column\(s\) pixels"):
        P.convert(tmp_path / "g.csv", "fer2013-csv", tmp_path / "out2")


def test_fer2013_csv_empty_usage_has_no_split_and_unknown_usage_is_skipped(tmp_path):
    fer_csv(tmp_path / "f.csv", n=10)
    df = pd.read_csv(tmp_path / "f.csv")
    df.loc[0, "Usage"], df.loc[1, "Usage"], df.loc[2, "Usage"] = "", " ", "Weird"
    df.to_csv(tmp_path / "f.csv", index=False)
    table = P.convert(tmp_path / "f.csv", "fer2013-csv", tmp_path / "out")
    assert len(table) == 9 and "weird" not in set(table["split"])
    assert table.attrs["report"]["skipped"] == {"Usage not Training, PublicTest, PrivateTest or empty": 1}
    empty = table[table["split"] == ""]["image"].tolist()
    assert empty == ["images/fer2013/all/fer00000.png", "images/fer2013/all/fer00001.png"]
    assert table["image"][2].startswith("images/fer2013/train/")


# ----------------------------------------------------------------------------- folder

def test_folder_split_layout_in_place_and_copy(tmp_path):
    src = tmp_path / "src"
    for i, (split, cls) in enumerate([("train", "angry"), ("train", "happy"), ("train", "happy"), ("test", "sad"),
                                      ("val", "Surprised")]):
        img(src / split / cls / f"{i}.png", seed=i)
    img(src / "train" / "happy" / "x.jpg", "RGB")
    (src / "train" / "happy" / "notes.txt").write_text("not an image")
    table = P.convert(src, "folder", tmp_path / "out")
    assert sorted(table["label"]) == ["anger", "happiness", "happiness", "happiness", "sadness", "surprise"]
    assert table.set_index("label")["split"].to_dict()["sadness"] == "test"
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in table["image"])  # outside DIR: absolute
    inside = P.convert(src, "folder", src)  # DIR = the source itself: relative paths
    assert inside["image"].str.startswith("train/").sum() == 4 and not any(Path(p).is_absolute() for p in inside["image"])
    copied = P.convert(src, "folder", tmp_path / "copy", copy=True)
    assert all(p.startswith("images/src/") and (tmp_path / "copy" / p).is_file() for p in copied["image"])
    again = P.convert(src, "folder", tmp_path / "copy")                # referenced after copied: not listed twice
    assert again["image"].tolist() == copied["image"].tolist() and again.attrs["report"]["already"] == 6


def test_folder_flat_layout_and_cli_report(tmp_path, capsys):
    for i, cls in enumerate(["neutral", "neutral", "contempt"]):
        img(tmp_path / "src" / cls / f"{i}.png")
    assert run_cli(P.main, [str(tmp_path / "src"), "--format", "folder", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "added 3 rows" in printed and "contempt" in printed and "total" in printed
    assert set(read(tmp_path / "out")["split"]) == {""}


def test_unknown_class_names_it_and_label_map_fixes_it(tmp_path, capsys):
    for i, cls in enumerate(["happy", "Pain", "bored"]):
        img(tmp_path / "src" / cls / f"{i}.png")
    argv = [str(tmp_path / "src"), "--format", "folder", "--out", str(tmp_path / "out")]
    assert run_cli(P.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "Pain" in err and "bored" in err and "--label-map" in err and "contempt" in err
    assert not (tmp_path / "out" / "captions.csv").exists()
    assert run_cli(P.main, argv + ["--label-map", "pain=fear", "bored=neutral"]) == 0
    assert sorted(read(tmp_path / "out")["label"]) == ["fear", "happiness", "neutral"]
    dropped = P.convert(tmp_path / "src", "folder", tmp_path / "o2", label_map={"pain": "fear", "bored": ""})
    assert len(dropped) == 2 and dropped.attrs["report"]["skipped"] == {"dropped by --label-map": 1}
    assert P.harmonise_label("Angry") == "anger" and P.harmonise_label("surprised") == "surprise"
    with pytest.raises(UserError, match="--label-map x=NEW"):
        P.harmonise_label("x")


def test_label_map_names_a_bad_new_name_a_malformed_pair_and_two_new_names(tmp_path, capsys):
    for i, cls in enumerate(["happy", "Pain", "bored"]):
        img(tmp_path / "src" / cls / f"{i}.png")
    argv = [str(tmp_path / "src"), "--format", "folder", "--out", str(tmp_path / "out"), "--label-map"]
    cases = {("pain=fear", "bored=xyz"): "--label-map bored=xyz: xyz is not a class; use one of neutral, ",
             ("pain=fear", "bored=happy=x"): "--label-map 'bored=happy=x': expected one OLD=NEW pair",
             ("pain=fear", "Pain=anger", "bored=neutral"): "--label-map pain=fear Pain=anger: two new names for Pain"}
    for pairs, message in cases.items():
        assert run_cli(P.main, argv + list(pairs)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "unknown class name" not in err, err
    assert not (tmp_path / "out").exists()
    assert P.parse_label_map(["pain=fear", "PAIN=fear", "x=happy", "x=happiness"])["x"] == "happiness"  # same name
    with pytest.raises(UserError, match="--label-map x=xyz: xyz is not a class"):
        P.harmonise_label("x", {"x": "xyz"})


def test_image_problems_converted_or_skipped(tmp_path):
    d = tmp_path / "src" / "happy"
    img(d / "rgba.png", "RGBA"), img(d / "pal.png", "P"), img(d / "deep.png", "I;16"), img(d / "cmyk.jpg", "CMYK")
    img(d / "ok.png", "L")
    (tmp_path / "src" / "sad").mkdir()
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "src" / "sad" / "clear.png")  # fully transparent grey
    (d / "junk.png").write_bytes(b"this is not a png")
    data = img(d / "trunc.png", "RGB", size=(64, 64)).read_bytes()
    (d / "trunc.png").write_bytes(data[: len(data) // 2])
    table = P.convert(tmp_path / "src", "folder", tmp_path / "out")
    rep = table.attrs["report"]
    assert rep["skipped"] == {"unreadable image (not an image file)": 1, "unreadable image (truncated or corrupt)": 1}
    assert rep["converted"] == {"flattened RGBA onto white": 1, "flattened LA onto white": 1, "converted palette to RGB": 1,
                                "converted I;16 (16-bit) to L": 1, "converted CMYK to RGB": 1}
    assert len(table) == 6
    modes = {Path(p).stem: opened(tmp_path / "out", p).mode for p in table["image"]}
    assert modes == {"rgba": "RGB", "pal": "RGB", "deep": "L", "cmyk": "RGB", "ok": "L", "clear": "L"}
    converted = table[table["image"].str.startswith("images/")]["image"]
    assert len(converted) == 5 and all(p.endswith(".png") for p in converted)  # written under DIR, sources untouched
    assert (np.asarray(opened(tmp_path / "out", "images/src/sad/clear.png")) == 255).all()
    deep = np.asarray(opened(tmp_path / "out", converted[converted.str.contains("deep")].iloc[0]))
    assert deep.dtype == np.uint8 and deep.max() > 200  # scaled from 0..65535, not clipped
    trusted = P.convert(tmp_path / "src", "folder", tmp_path / "out2", verify=False)
    assert len(trusted) == 8  # --no-verify opens nothing


def test_float_tiff_in_0_to_1_is_scaled_not_black_and_named_float(tmp_path):
    a = np.linspace(0, 1, 48 * 48, dtype=np.float32).reshape(48, 48)
    Image.fromarray(a, "F").save(img(tmp_path / "src" / "happy" / "ok.png").parent / "float.tif")
    table = P.convert(tmp_path / "src", "folder", tmp_path / "out")
    assert table.attrs["report"]["converted"] == {"converted F (32-bit float) to L": 1}
    out = np.asarray(opened(tmp_path / "out", table[table["image"].str.contains("float")]["image"].iloc[0]))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255 and abs(int(out[24, 0]) - 128) <= 2


def exif_rotated_jpeg(path: Path) -> Path:
    """A 40x20 JPEG (one bright corner, top left as stored) with EXIF Orientation 6: displayed 20x40, upright."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:6, :12] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, exif=exif.tobytes(), quality=95)
    return path


def test_detect_faces_sees_an_exif_rotated_photo_upright(tmp_path, monkeypatch):
    import faces
    from PIL import ImageOps
    src = exif_rotated_jpeg(tmp_path / "src" / "happy" / "phone.jpg")
    im, note = P.load_image(src)
    assert note is None and (np.asarray(im) == np.asarray(ImageOps.exif_transpose(Image.open(src)))).all()
    seen = []
    monkeypatch.setattr(faces, "detect_faces", lambda im, max_faces=1: seen.append(im.size) or [])
    table = P.convert(tmp_path / "src", "folder", tmp_path / "out", detect_faces=True, no_face="keep")
    kept = np.asarray(opened(tmp_path / "out", table["image"][0]).convert("L"))
    assert seen == [(20, 40)] and kept.shape == (40, 20) and kept[:12, -6:].mean() > 200 > kept[:12, :6].mean()
    monkeypatch.setattr(ImageOps, "exif_transpose", lambda im: 1 / 0)  # broken EXIF: kept as stored
    assert P.load_image(src)[0].size == (40, 20)


def test_merge_appends_without_duplicates(tmp_path):
    img(tmp_path / "a" / "happy" / "1.png"), img(tmp_path / "a" / "sad" / "2.png")
    img(tmp_path / "b" / "fear" / "3.png")
    P.convert(tmp_path / "a", "folder", tmp_path / "out")
    again = P.convert(tmp_path / "a", "folder", tmp_path / "out", bank="rich")
    assert len(again) == 2 and again.attrs["report"]["already"] == 2 and again.attrs["report"]["added"] == 0
    copied = P.convert(tmp_path / "a", "folder", tmp_path / "out", copy=True)     # the same files, as copies
    assert len(copied) == 2 and copied.attrs["report"]["already"] == 2 and not (tmp_path / "out" / "images").exists()
    both = P.convert(tmp_path / "b", "folder", tmp_path / "out")
    assert len(read(tmp_path / "out")) == 3 == len(both) and not both["image"].duplicated().any()
    assert sorted(both["label"]) == ["fear", "happiness", "sadness"]
    (tmp_path / "other").mkdir()
    pd.DataFrame({"file": ["x.png"], "text": ["a face"]}).to_csv(tmp_path / "other" / "captions.csv", index=False)
    with pytest.raises(UserError, match=r"captions\.csv: missing required column\(s\) image, caption"):
        P.convert(tmp_path / "b", "folder", tmp_path / "other", copy=True)
    assert not (tmp_path / "other" / "images").exists()  # refused before any image was written


def test_a_rerun_with_another_label_map_says_the_listed_faces_kept_their_labels(tmp_path, capsys):
    img(tmp_path / "a" / "happy" / "1.png"), img(tmp_path / "a" / "happy" / "2.png", seed=1)
    img(tmp_path / "a" / "sad" / "3.png", seed=2)
    P.convert(tmp_path / "a", "folder", tmp_path / "out")
    assert P.main([str(tmp_path / "a"), "--format", "folder", "--out", str(tmp_path / "out"),
                   "--label-map", "happy=surprise"]) == 0
    out = capsys.readouterr().out
    assert "2 already listed under another label kept it (e.g. " in out and "happiness there, surprise now" in out
    assert sorted(read(tmp_path / "out")["label"]) == ["happiness", "happiness", "sadness"]      # not relabelled
    P.main([str(tmp_path / "a"), "--format", "folder", "--out", str(tmp_path / "out")])         # same labels: no note
    assert "another label" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- ferplus

def test_ferplus_majority_soft_labels_and_drops(tmp_path):
    root = tmp_path / "FERPlus"
    rows = [  # Usage, Image name, neutral happiness surprise sadness anger disgust fear contempt unknown NF
        ("Training", "fer0000000.png", [0, 8, 0, 0, 0, 0, 0, 0, 2, 0]),
        ("Training", "fer0000001.png", [0, 0, 0, 0, 0, 0, 0, 6, 4, 0]),  # contempt kept
        ("Training", "fer0000002.png", [1, 0, 0, 0, 0, 0, 0, 0, 9, 0]),  # majority unknown
        ("Training", "", [10, 0, 0, 0, 0, 0, 0, 0, 0, 0]),  # no image (removed by FER+)
        ("PublicTest", "fer0000003.png", [5, 0, 5, 0, 0, 0, 0, 0, 0, 0]),  # tie -> first column (neutral)
        ("PrivateTest", "fer0000004.png", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10]),  # not a face
        ("PrivateTest", "../../../etc/passwd", [0, 0, 0, 0, 3, 0, 0, 0, 0, 0]),
        ("PrivateTest", "fer0000005.png", [0, 0, 0, 0, 3, 0, 1, 0, 0, 0]),
    ]
    for usage, name, _ in rows:
        if name.startswith("fer"):
            img(root / P.FERPLUS_DIRS[P.USAGE_SPLITS[usage.lower()]] / name)
    df = pd.DataFrame([[u, n, *v] for u, n, v in rows], columns=["Usage", "Image name", *P.FERPLUS_VOTES])
    df.to_csv(root / "fer2013new.csv", index=False)
    table = P.convert(root, "ferplus", tmp_path / "out")
    assert table[["label", "split"]].values.tolist() == [["happiness", "train"], ["contempt", "train"],
                                                        ["neutral", "val"], ["anger", "test"]]
    soft = [json.loads(s) for s in read(tmp_path / "out")["soft_labels"]]
    assert soft[0]["happiness"] == 1.0 and soft[3] == pytest.approx({**{k: 0 for k in P.FERPLUS_VOTES[:8]},
                                                                     "anger": 0.75, "fear": 0.25})
    assert table.attrs["report"]["skipped"] == {"majority vote unknown/NF": 2, "no image name": 1,
                                                "path outside the dataset root": 1}
    assert all(Path(p).is_absolute() and "FER2013" in p for p in table["image"])


# ----------------------------------------------------------------------------- affectnet

def test_affectnet_folder_release(tmp_path):
    for split, n in (("train_set", 4), ("val_set", 2)):
        (tmp_path / "an" / split / "annotations").mkdir(parents=True)
        for i in range(n):
            img(tmp_path / "an" / split / "images" / f"{i}.jpg", "RGB", seed=i)
            if i != 3:  # train 3: annotation missing
                np.save(tmp_path / "an" / split / "annotations" / f"{i}_exp.npy", np.array(str([1, 7, 9][i % 3])))
    table = P.convert(tmp_path / "an", "affectnet", tmp_path / "out")
    assert table[["label", "split"]].values.tolist() == [["happiness", "train"], ["contempt", "train"],
                                                        ["happiness", "val"], ["contempt", "val"]]
    assert table.attrs["report"]["skipped"] == {"missing annotation": 1,
                                                "expression not 0..7 (none/uncertain/no face)": 1}


def test_affectnet_csv_release_crops_face_box(tmp_path):
    root = tmp_path / "AffectNet"
    big = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)  # H=80, W=100
    (root / "Manually_Annotated_Images" / "689").mkdir(parents=True)
    Image.fromarray(big).save(root / "Manually_Annotated_Images" / "689" / "a.png")
    img(root / "Manually_Annotated_Images" / "689" / "b.jpg", "RGB", size=(60, 60))
    cols = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
            "expression", "valence", "arousal"]
    rows = [["689/a.png", 10, 20, 30, 40, "1;2", 6, 0.1, 0.2],
            ["689/b.jpg", 0, 0, 60, 60, "1;2", 3, 0.1, 0.2],
            ["689/b.jpg", 0, 0, 60, 60, "1;2", 3, 0.1, 0.2],  # listed twice
            ["689/a.png", 0, 0, 10, 10, "", 9, 0, 0],  # uncertain -> dropped
            ["689/a.png", 0, 0, "inf", 10, "", 1, 0, 0],  # not a finite box: skipped, not an OverflowError
            ["../../../etc/passwd", 0, 0, 10, 10, "", 1, 0, 0],
            ["689/missing.jpg", 0, 0, 10, 10, "", 1, 0, 0]]
    (root / "Manually_Annotated_file_lists").mkdir()
    pd.DataFrame(rows, columns=cols).to_csv(root / "Manually_Annotated_file_lists" / "training.csv", index=False)
    table = P.convert(root / "Manually_Annotated_file_lists" / "training.csv", "affectnet", tmp_path / "out")
    assert table[["label", "split"]].values.tolist() == [["anger", "train"], ["surprise", "train"]]
    crop = opened(tmp_path / "out", table["image"][0])
    assert table["image"][0] == "images/affectnet/689/a.png" and crop.size == (30, 40)
    assert (np.asarray(crop) == big[20:60, 10:40]).all()
    assert table.attrs["report"]["skipped"] == {"duplicate (same file listed twice; first kept)": 1,
                                                "expression not 0..7 (none/uncertain/no face)": 1,
                                                "path outside the dataset root": 1, "missing image": 1,
                                                "bad expression or face box value": 1}
    with pytest.raises(UserError, match="missing required column"):
        pd.DataFrame(rows, columns=cols).drop(columns="face_x").to_csv(tmp_path / "bad.csv", index=False)
        P.convert(tmp_path / "bad.csv", "affectnet", tmp_path / "out2")


# ----------------------------------------------------------------------------- rafdb

def test_rafdb_aligned_original_names_traversal_duplicates(tmp_path):
    basic = tmp_path / "basic"
    img(basic / "Image" / "aligned" / "train_00001_aligned.jpg", "RGB", size=(100, 100))
    img(basic / "Image" / "aligned" / "test_0001.jpg", "RGB", size=(100, 100))  # original name also accepted
    img(basic / "Image" / "aligned" / "train_00002_aligned.jpg", "RGB", size=(100, 100))
    lines = ["train_00001.jpg 4", "test_0001.jpg 1", "train_00002.jpg 7", "train_00002.jpg 7",
             "../../../../etc/passwd 3", "train_00009.jpg 2", "garbage", "train_00003.jpg 8", ""]
    (basic / "EmoLabel").mkdir()
    (basic / "EmoLabel" / "list_patition_label.txt").write_bytes(   # Notepad: a BOM and CRLF; the first row kept
        b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    table = P.convert(basic, "rafdb", tmp_path / "out", copy=True)
    assert table[["label", "split"]].values.tolist() == [["happiness", "train"], ["surprise", "test"],
                                                        ["neutral", "train"]]
    assert table["image"][0] == "images/rafdb/aligned/train_00001_aligned.jpg"
    assert (tmp_path / "out" / table["image"][1]).is_file()
    assert table.attrs["report"]["skipped"] == {"duplicate (same file listed twice; first kept)": 1,
                                                "path outside the dataset root": 1, "missing image": 1,
                                                "malformed line or label not 1..7": 2}


# ----------------------------------------------------------------------------- real data

@pytest.mark.skipif(not FER2013.is_dir(), reason="../shared/data/fer2013 not present")
def test_real_fer2013_folder_counts(tmp_path):
    t0 = time.time()
    table = P.convert(FER2013, "folder", tmp_path, verify=False)
    assert time.time() - t0 < 30
    assert table["split"].value_counts().to_dict() == {"train": 28709, "test": 3589}
    train = table[table["split"] == "train"]["label"].value_counts().to_dict()
    assert train == {"happiness": 7215, "neutral": 4965, "sadness": 4830, "fear": 4097, "anger": 3995,
                     "surprise": 3171, "disgust": 436}
    assert Path(table["image"][0]).is_file() and not (tmp_path / "images").exists()  # referenced in place


# ----------------------------------------------------------------------------- ckplus

def test_ckplus_peak_frames_get_their_sequence_label_and_bad_label_files_are_counted(tmp_path):
    ck = tmp_path / "CK+"
    for subj, seq, last in (("S005", "001", 11), ("S010", "002", 14), ("S011", "001", 3), ("S014", "003", 5)):
        for k in range(1, last + 1):
            img(ck / "cohn-kanade-images" / subj / seq / f"{subj}_{seq}_{k:08d}.png", "L", size=(64, 49))
    emo = ck / "Emotion"
    for subj, seq, last, text in (("S005", "001", 11, "   3.0000000e+00\n"), ("S010", "002", 14, "   7.0000000e+00"),
                                  ("S011", "001", 3, "nan"), ("S014", "003", 5, "\ufeff   9.0000000e+00\r\n"),
                                  ("S099", "001", 4, "   1.0000000e+00")):                    # S099: no frames
        (emo / subj / seq).mkdir(parents=True)
        (emo / subj / seq / f"{subj}_{seq}_{last:08d}_emotion.txt").write_text(text)
    table = P.convert(ck, "ckplus", tmp_path / "out")
    assert table["label"].tolist() == ["disgust", "surprise"] and set(table["split"].fillna("")) == {""}
    assert [Path(x).name for x in table["image"]] == ["S005_001_00000011.png", "S010_002_00000014.png"]
    assert table.attrs["report"]["skipped"] == {"emotion code not 1..7": 2, "missing image": 1}   # nan: not 1..7
    (emo / "S005" / "001" / "S005_001_00000011_emotion.txt").write_text("\ufeff   3.0000000e+00\r\n")   # BOM
    assert P.convert(ck, "ckplus", tmp_path / "bom")["label"].tolist() == ["disgust", "surprise"]
    with pytest.raises(UserError, match="no Emotion/ and cohn-kanade-images/"):
        P.convert(tmp_path / "out", "ckplus", tmp_path / "out2")


# ----------------------------------------------------------------------------- reruns never replace a listed face

def test_a_second_csv_into_the_same_folder_never_replaces_a_listed_face(tmp_path):
    """Two CSVs without Usage both name their faces all/fer0000N.png: the second's go beside the first's."""
    fer_csv(tmp_path / "a.csv", n=4, usage=False)
    P.convert(tmp_path / "a.csv", "fer2013-csv", tmp_path / "out")
    first = {p: (tmp_path / "out" / p).read_bytes() for p in read(tmp_path / "out")["image"]}
    df = pd.read_csv(tmp_path / "a.csv")
    df["pixels"] = df["pixels"].map(lambda s: " ".join(str(255 - int(v)) for v in s.split()))   # other faces
    df.to_csv(tmp_path / "b.csv", index=False)
    second = P.convert(tmp_path / "b.csv", "fer2013-csv", tmp_path / "out")
    assert second.attrs["report"]["added"] == 4 and len(second) == 8 and not second["image"].duplicated().any()
    assert all((tmp_path / "out" / p).read_bytes() == b for p, b in first.items())          # untouched
    again = P.convert(tmp_path / "b.csv", "fer2013-csv", tmp_path / "out")                  # a rerun finds its own
    assert again.attrs["report"]["added"] == 0 and again.attrs["report"]["already"] == 4 and len(again) == 8


def test_same_named_files_from_other_sources_or_one_stem_are_all_listed(tmp_path):
    img(tmp_path / "a" / "faces" / "happy" / "001.png", seed=1)
    img(tmp_path / "b" / "faces" / "happy" / "001.png", seed=2)              # another face, the same names
    P.convert(tmp_path / "a" / "faces", "folder", tmp_path / "out", copy=True)
    both = P.convert(tmp_path / "b" / "faces", "folder", tmp_path / "out", copy=True)
    assert both.attrs["report"]["added"] == 1 and len(both) == 2 and not both["image"].duplicated().any()
    img(tmp_path / "stem" / "happy" / "face1.png", "RGBA", seed=3)         # both converted to face1.png
    img(tmp_path / "stem" / "happy" / "face1.jpg", "CMYK", seed=4)
    stem = P.convert(tmp_path / "stem", "folder", tmp_path / "out2")
    files = {(tmp_path / "out2" / p).read_bytes() for p in stem["image"]}
    assert len(stem) == 2 and len(files) == 2


def test_folder_layouts_users_hand_over(tmp_path, capsys):
    """__MACOSX beside the splits, FER's Usage names as folders, and --out inside SOURCE prepared twice."""
    src = tmp_path / "src"
    img(src / "Training" / "happy" / "1.png", seed=1), img(src / "PublicTest" / "sad" / "2.png", seed=2)
    img(src / "PrivateTest" / "sad" / "3.png", seed=3), img(src / "__MACOSX" / "Training" / "happy" / "._1.png")
    (src / "notes").mkdir()
    table = P.convert(src, "folder", tmp_path / "out")
    assert sorted(table["split"]) == ["test", "train", "val"]
    assert table.attrs["report"]["skipped"] == {"folder beside the split folders, not a split": 1}
    img(src / "Training" / "happy" / "cmyk.jpg", "CMYK")                    # converted: written under src/images
    assert len(P.convert(src, "folder", src)) == 4 and (src / "images").is_dir()
    again = P.convert(src, "folder", src)
    assert again.attrs["report"]["added"] == 0 and again.attrs["report"]["already"] == 4


def test_a_run_that_lists_nothing_or_cannot_write_says_so_and_writes_nothing(tmp_path):
    fer_csv(tmp_path / "fer2013.csv", n=8)
    with pytest.raises(UserError, match=r"fer2013\.csv: no face could be listed \(9 rows skipped, 9 for: malformed "
                                        r"line or label not 1\.\.7\); is --format rafdb right for it\?"):
        P.convert(tmp_path / "fer2013.csv", "rafdb", tmp_path / "out")
    assert not (tmp_path / "out" / "captions.csv").exists()
    (tmp_path / "busy" / "captions.csv").mkdir(parents=True)
    with pytest.raises(UserError, match="captions.csv: is a folder"):
        P.convert(tmp_path / "fer2013.csv", "fer2013-csv", tmp_path / "busy")
    assert not (tmp_path / "busy" / "images").exists()                       # refused before any image was written
    with pytest.raises(UserError, match=r"--out .*fer2013\.csv: is a file; give a folder"):
        P.convert(tmp_path / "fer2013.csv", "fer2013-csv", tmp_path / "fer2013.csv")


@pytest.mark.parametrize("kw, says", [
    (dict(grayscale=True), "--grayscale goes with --detect-faces"),
    (dict(detect_faces=True, no_face="drop"), "--no-face 'drop': use keep or skip"),
    (dict(detect_faces=True, face_margin=-1), "--face-margin -1: must be >= 0")])
def test_each_face_option_mistake_is_named_alone(tmp_path, kw, says):
    img(tmp_path / "a" / "happy" / "1.png")
    with pytest.raises(UserError) as e:
        P.convert(tmp_path / "a", "folder", tmp_path / "out", **kw)
    assert str(e.value).startswith(says) and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- inputs a tester handed over

def test_a_comma_ending_each_row_shifts_no_column_in_a_dataset_csv_or_captions_csv(tmp_path):
    fer_csv(tmp_path / "f.csv", n=7)
    lines = (tmp_path / "f.csv").read_text().splitlines()
    (tmp_path / "f.csv").write_text("\n".join([lines[0]] + [ln + "," for ln in lines[1:]]) + "\n")
    table = P.convert(tmp_path / "f.csv", "fer2013-csv", tmp_path / "out")
    assert table["label"].tolist()[:2] == ["anger", "disgust"] and table["split"][0] == "train"
    listed = tmp_path / "out" / "captions.csv"
    listed.write_text("\n".join(ln + "," for ln in listed.read_text().splitlines()) + "\n")
    again = P.convert(tmp_path / "f.csv", "fer2013-csv", tmp_path / "out")
    assert again["image"].tolist() == table["image"].tolist() and again.attrs["report"]["added"] == 0


def test_out_inside_a_split_or_class_folder_is_refused_and_output_folders_are_counted(tmp_path):
    img(tmp_path / "s" / "train" / "happy" / "1.png"), img(tmp_path / "flat" / "happy" / "1.png")
    for src, out in (("s", "s/train"), ("s", "s/train/happy"), ("flat", "flat/happy")):
        with pytest.raises(UserError, match=r"--out .*: inside the (split|class) folder .*later runs would skip"):
            P.convert(tmp_path / src, "folder", tmp_path / out)
    assert not (tmp_path / "s" / "train" / "captions.csv").exists()
    P.convert(tmp_path / "flat", "folder", tmp_path / "flat" / "prepared")                  # a new folder: fine
    again = P.convert(tmp_path / "flat", "folder", tmp_path / "o2")
    assert again.attrs["report"]["skipped"] == {"folder holding a captions.csv (prepare.py output), not read "
                                                "(prepared)": 1}


def test_a_mac_zips_decomposed_class_name_is_mapped_by_its_composed_spelling(tmp_path):
    img(tmp_path / "src" / "U\u0308berraschung" / "1.png"), img(tmp_path / "src" / "happy" / "2.png")
    argv = [str(tmp_path / "src"), "--format", "folder", "--out", str(tmp_path / "out")]
    assert P.main(argv + ["--label-map", "\u00dcberraschung=surprise"]) == 0
    assert sorted(read(tmp_path / "out")["label"]) == ["happiness", "surprise"]


def test_unread_file_types_and_a_class_left_without_images_are_counted(tmp_path):
    img(tmp_path / "src" / "sad" / "0.png"), (tmp_path / "src" / "happy").mkdir()
    for name in ("0.gif", "1.GIF", "x.jfif", "notes.txt", ".DS_Store"):
        (tmp_path / "src" / "happy" / name).write_bytes(b"GIF89a")
    table = P.convert(tmp_path / "src", "folder", tmp_path / "out")
    assert table.attrs["report"]["skipped"] == {"file type not read (.gif, .jfif)": 3,
                                                "class folder with no image read (happy)": 1}


def test_infinite_ferplus_votes_and_a_superscript_rafdb_label_are_counted_not_a_traceback(tmp_path):
    root = tmp_path / "fp"
    for i in range(3):
        img(root / "FER2013Train" / f"fer{i}.png")
    votes = [[0, 9, 0, 0, 0, 0, 0, 0, 0, 0], ["inf", 1, 0, 0, 0, 0, 0, 0, 0, 0], [0, "1e400", 0, 0, 0, 0, 0, 0, 0, 0]]
    pd.DataFrame([["Training", f"fer{i}.png", *v] for i, v in enumerate(votes)],
                 columns=["Usage", "Image name", *P.FERPLUS_VOTES]).to_csv(root / "fer2013new.csv", index=False)
    table = P.convert(root, "ferplus", tmp_path / "out")
    assert len(table) == 1 and table.attrs["report"]["skipped"] == {"bad vote counts": 2}
    img(tmp_path / "raf" / "Image" / "aligned" / "train_00001_aligned.jpg", "RGB")
    (tmp_path / "raf" / "EmoLabel").mkdir()
    (tmp_path / "raf" / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 4\ntrain_00001.jpg \u00b2\n")
    table = P.convert(tmp_path / "raf", "rafdb", tmp_path / "out2")
    assert len(table) == 1 and table.attrs["report"]["skipped"] == {"malformed line or label not 1..7": 1}


def test_a_missing_image_root_loose_images_and_an_unsafe_class_name_each_get_a_line(tmp_path):
    img(tmp_path / "src" / "happy 1" / "1.png"), img(tmp_path / "loose" / "a.png")
    with pytest.raises(UserError, match=r"^--image-root .*nope: no such folder"):
        P.convert(tmp_path / "src", "ferplus", tmp_path / "out", image_root=tmp_path / "nope")
    with pytest.raises(UserError, match=r"no images inside class folders \(skipped 1: image not inside a class"):
        P.convert(tmp_path / "loose", "folder", tmp_path / "out")
    with pytest.raises(UserError, match=r"e\.g\. --label-map 'happy 1=neutral', or 'happy 1=' to drop"):
        P.convert(tmp_path / "src", "folder", tmp_path / "out")
