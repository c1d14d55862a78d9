"""evaluate.py: zero-shot metrics of the session's tiny trained model, chance for a random-init one, input layouts,
the CE classifier path, unseen-class AP, prompt comparison and one-line errors."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import evaluate
from utils import run_cli

TRAINED_MIN_TOP1 = 0.6     # measured on the sample's val split (96 images, 8 classes): see the report


def run(argv, capsys) -> tuple[int, str, str]:
    rc = run_cli(evaluate.main, [str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def random_checkpoint(trained, path, class_names=None, **changes):
    """A random-init model with the trained checkpoint's config (plus changes), saved as a checkpoint."""
    from dataclasses import replace
    from model import ExprCLIP, load_checkpoint, save_checkpoint
    _, cfg = load_checkpoint(trained[0])
    torch.manual_seed(0)
    model = ExprCLIP(replace(cfg, **changes), load_weights=False, class_names=class_names)
    save_checkpoint(path, model)
    return model


def test_trained_model_cli(trained, sample_dir, tmp_path, capsys):
    js, png = tmp_path / "out" / "res.json", tmp_path / "cm.png"
    rc, out, err = run(["--checkpoint", trained[0], "--data", sample_dir / "captions.csv", "--json", js,
                        "--confusion", png, "--unseen", "surprise"], capsys)
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["split"] == "val" and summary["n_images"] == 96 and summary["skipped"] == 0
    assert summary["top1"] >= TRAINED_MIN_TOP1 and summary["uar"] >= TRAINED_MIN_TOP1 - 0.05
    assert summary["top5"] >= summary["top1"] and summary["t2i_mAP"] > 0.5
    u = summary["unseen_surprise"]
    assert u["base_rate"] == pytest.approx(12 / 96) and u["ap"] > u["base_rate"]
    assert u["ap_over_base"] == pytest.approx(u["ap"] / u["base_rate"])
    res = json.loads(js.read_text())
    assert res["config"]["image_model"] == "resnet10t" and res["scoring"].startswith("text prompts")
    assert set(res["per_class_recall"]) == set(res["classes"]) and len(res["classes"]) == 8
    assert np.array(res["confusion"]).sum() == 96 and len(res["retrieval"]["t2i_AP_per_class"]) == 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "split: val" in out and "unseen classes" in out


def test_random_init_is_chance(trained, sample_dir, tmp_path):
    ck = tmp_path / "random.pth"
    random_checkpoint(trained, ck)
    res = evaluate.evaluate(ck, sample_dir)
    assert res["top1"] < 0.35 and res["n_images"] == 96


def test_compare_prompts_explicit_split(trained, sample_dir):
    res = evaluate.evaluate(trained[0], sample_dir, split="validation", compare=["paper", "rich"])
    assert res["n_images"] == 96 and res["split"] == "val"
    c = res["compare_prompts"]
    assert set(c) == {"paper", "rich"}
    assert c["rich"]["top1_drop"] == pytest.approx(c["paper"]["top1"] - c["rich"]["top1"])
    assert c["paper"]["top1"] == pytest.approx(res["top1"])


def test_folder_layouts(trained, sample_dir, tmp_path):
    table = pd.read_csv(sample_dir / "captions.csv")
    val = table[table["split"] == "val"].groupby("label").head(4)
    for root, split in ((tmp_path / "flat", ""), (tmp_path / "split", "test")):
        for r in val.itertuples():
            folder = "happy" if r.label == "happiness" else r.label           # a synonym, harmonised
            dst = root / split / folder
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(sample_dir / "images" / r.image, dst / r.image)
    (tmp_path / "flat" / "anger" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "split" / "train" / "anger").mkdir(parents=True)
    shutil.copy(sample_dir / "images" / val["image"].iloc[0], tmp_path / "split" / "train" / "anger" / "x.png")
    flat = evaluate.evaluate(trained[0], tmp_path / "flat")
    assert flat["n_images"] == 32 and flat["skipped"]["unreadable image"] == 1 and flat["split"].startswith("all")
    assert "happiness" in flat["classes"] and flat["top1"] >= 0.5
    split = evaluate.evaluate(trained[0], tmp_path / "split")
    assert split["split"].startswith("test") and split["n_images"] == 32 and split["top1"] == flat["top1"]


def test_ce_checkpoint_uses_classifier(trained, sample_dir, tmp_path, capsys):
    ck = tmp_path / "ce.pth"
    from model import save_checkpoint
    names = ["anger", "contempt", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"]
    model = random_checkpoint(trained, ck, objective="ce", class_names=names)
    with torch.no_grad():   # a classifier that always says "fear"
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.eye(8)[names.index("fear")])
    save_checkpoint(ck, model)
    rc, out, err = run(["--checkpoint", ck, "--data", sample_dir, "--unseen", "fear"], capsys)
    assert rc == 0, err
    s = json.loads(out.strip().splitlines()[-1])
    assert s["scoring"] == "classifier" and s["t2i_mAP"] is None and s["top1"] == pytest.approx(1 / 8)
    assert s["unseen_fear"]["recall"] == 1.0 and "classifier head" in out


def test_calibrate_recovers_offset_class():
    y = np.repeat(np.arange(3), 10)
    scores = np.eye(3)[y] * 0.1 + np.array([0.0, 0.0, 0.5])       # class 2's column sits 0.5 higher everywhere
    assert evaluate.metrics.topk_accuracy(scores, y, 1) == pytest.approx(1 / 3)
    assert evaluate.metrics.topk_accuracy(evaluate.calibrate(scores), y, 1) == 1.0


def test_bad_inputs(trained, sample_dir, tmp_path, capsys):
    foreign = tmp_path / "foreign.pth"
    foreign.write_text("hello")
    unlabelled = tmp_path / "nolabel"
    unlabelled.mkdir()
    pd.read_csv(sample_dir / "captions.csv")[["image", "caption"]].head(5).assign(
        image=lambda d: [str(sample_dir / "images" / p) for p in d["image"]]).to_csv(unlabelled / "captions.csv")
    cases = [(["--checkpoint", tmp_path / "none.pth", "--data", sample_dir], "checkpoint not found"),
             (["--checkpoint", foreign, "--data", sample_dir], "foreign.pth"),
             (["--checkpoint", trained[0], "--data", unlabelled], "`label` column"),
             (["--checkpoint", trained[0], "--data", sample_dir, "--unseen", "boredom"], "known: neutral, happiness"),
             (["--checkpoint", trained[0], "--data", sample_dir, "--split", "test"], "the data has: "),
             (["--checkpoint", trained[0], "--data", tmp_path / "nowhere"], "no such file or folder"),
             (["--checkpoint", trained[0], "--data", sample_dir, "--json", tmp_path], "--json"),
             (["--checkpoint", trained[0], "--data", sample_dir, "--confusion", tmp_path], "is a folder"),
             (["--checkpoint", trained[0], "--data", sample_dir, "--confusion", tmp_path / "cm.txt"], "name a .png"),
             (["--checkpoint", trained[0], "--data", sample_dir, "--json", tmp_path / "r.txt"], "name a .json")]
    for argv, message in cases:
        rc, out, err = run(argv, capsys)
        assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, (argv, err)


def test_an_output_naming_the_data_is_refused_and_the_data_kept(trained, sample_dir, tmp_path, capsys):
    import shutil
    data = tmp_path / "d"
    shutil.copytree(sample_dir, data)
    face = sorted((data / "images").glob("*.png"))[0]
    before = {p: p.read_bytes() for p in (data / "captions.csv", face)}
    (data / "captions.json").symlink_to(data / "captions.csv")         # another name for the same file
    for argv in (["--json", data / "captions.json"], ["--confusion", face]):
        rc, out, err = run(["--checkpoint", trained[0], "--data", data, *argv], capsys)
        assert rc == 2 and "is a file this evaluation reads" in err and err.count("\n") == 1, err
    assert all(p.read_bytes() == b for p, b in before.items())


def test_flip_tta_averages_mirror_embeddings(trained, sample_dir, capsys):
    from checkpoint import create_model_and_transforms
    from embed import embed_images
    model, _, preprocess = create_model_and_transforms(trained[0])
    paths = [str(p) for p in sorted((sample_dir / "images").rglob("*.png"))[:5]]
    plain, _ = embed_images(model, paths, preprocess, torch.device("cpu"), batch_size=2)
    tta, ok = embed_images(model, paths, preprocess, torch.device("cpu"), batch_size=2, tta=True)
    x = torch.stack([preprocess(p) for p in paths])                                               # [5,3,H,W]
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_image(x) + model.encode_image(x.flip(-1)), dim=-1)
    assert ok.all() and np.allclose(tta, ref.numpy(), atol=1e-5)
    assert not np.allclose(tta, plain, atol=1e-3)          # the mirror image does change the embedding
    rc, out, err = run(["--checkpoint", trained[0], "--data", sample_dir, "--tta", "flip"], capsys)
    assert rc == 0 and "flip averaging" in out and json.loads(out.strip().splitlines()[-1])["top1"] >= TRAINED_MIN_TOP1


def test_prior_uses_training_label_counts(trained, sample_dir, tmp_path, capsys):
    from model import load_checkpoint, read_checkpoint, save_checkpoint
    model, _ = load_checkpoint(trained[0])
    counts = read_checkpoint(trained[0])["label_counts"]                 # checkpoint metadata, not a model attribute
    table = pd.read_csv(sample_dir / "captions.csv")
    assert counts == table.loc[table["split"] == "train", "label"].value_counts().to_dict()
    res = evaluate.evaluate(trained[0], sample_dir, prior=True)
    assert sum(res["prior"].values()) == pytest.approx(1, abs=1e-3) and set(res["prior"]) == set(res["classes"])
    skewed = tmp_path / "skewed.pth"
    save_checkpoint(skewed, model, label_counts={"fear": 10 ** 9, **{c: 1 for c in counts if c != "fear"}})
    rc, out, err = run(["--checkpoint", skewed, "--data", sample_dir, "--prior", "train"], capsys)
    s = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and "--prior train" in out and s["prior"] == "train"
    plain = evaluate.evaluate(skewed, sample_dir)
    assert s["top1"] < plain["top1"] - 0.1                              # a 1e9:1 prior pulls faces to fear ...
    assert evaluate.evaluate(skewed, sample_dir, prior=True)["per_class_recall"]["fear"] == 1.0    # ... all of them
    save_checkpoint(skewed, model)                                        # an old checkpoint, data without train rows
    only_val = tmp_path / "val.csv"
    table.assign(image=[str(sample_dir / "images" / p) for p in table["image"]]).query("split == 'val'").to_csv(
        only_val, index=False)
    rc, out, err = run(["--checkpoint", skewed, "--data", only_val, "--prior", "train"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "no training label counts for the scored classes" in err


def test_a_folder_without_class_folders_names_what_evaluate_accepts(tmp_path):
    import pytest
    import evaluate
    from utils import UserError
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(UserError) as e:
        evaluate.read_data(str(tmp_path))
    msg = str(e.value)
    assert "--format" not in msg and "evaluate.py --data" in msg and "captions.csv" in msg and "\n" not in msg


def test_without_checkpoint_evaluate_and_index_use_the_model_the_demo_serves(sample_dir, tmp_path, capsys):
    import shutil
    import index
    from served_model import choose_checkpoint
    served, _ = choose_checkpoint(None)                     # model_final.pth in the project root, else the bundled one
    rc, out, err = run(["--data", sample_dir, "--split", "val"], capsys)
    assert rc == 0 and f"no --checkpoint: {served.name}, " in out and f"checkpoint: {served} (" in out, err
    gallery = tmp_path / "gal"
    gallery.mkdir()
    for p in sorted((sample_dir / "images").glob("*.png"))[:3]:
        shutil.copy2(p, gallery / p.name)
    assert index.main(["build", "--images", str(gallery), "--index-dir", str(tmp_path / "idx")]) == 0
    assert index.main(["search", "--images", str(gallery), "--index-dir", str(tmp_path / "idx"), "--query", "a smile",
                       "-k", "2"]) == 0
    out, err = capsys.readouterr()
    assert f"checkpoint: {served} (" in err
    assert not any(line.startswith("checkpoint: ") for line in out.splitlines())       # results alone on stdout


def _scenes(sample_dir, root, n_per_class: int = 2, side: int = 0):
    """CLASS/*.png: the sample's val faces, each pasted at the centre of a 320x240 grey photo (side 0: the 64 px
    face file itself)."""
    from PIL import Image
    table = pd.read_csv(sample_dir / "captions.csv")
    val = table[table["split"] == "val"].groupby("label").head(n_per_class)
    for r in val.itertuples():
        face = Image.open(sample_dir / "images" / r.image).convert("RGB")
        if side:
            photo = Image.new("RGB", (320, 240), (128, 128, 128))
            photo.paste(face.resize((side, side)), ((320 - side) // 2, (240 - side) // 2))
            face = photo
        (root / r.label).mkdir(parents=True, exist_ok=True)
        face.save(root / r.label / r.image)
    return len(val)


def test_photos_are_scored_on_their_face_and_the_report_says_how_each_file_was_read(trained, sample_dir,
                                                                                      tmp_path, capsys):
    n = _scenes(sample_dir, tmp_path / "photos", side=100)
    rc, out, err = run(["--checkpoint", trained[0], "--data", tmp_path / "photos"], capsys)
    f = json.loads(out.strip().splitlines()[-1])["faces"]
    assert rc == 0 and f["mode"] == "auto" and f["crop"] == 0 and f["face"] + f["no face"] == n, err
    assert f"{n} photos searched for a face: {f['face']} found, {f['no face']} without one" in out
    rc, out, err = run(["--checkpoint", trained[0], "--data", tmp_path / "photos", "--faces", "crops"], capsys)
    assert rc == 0 and f"faces (--faces crops): {n} read whole as face crops" in out
    assert "most images are photos (larger than 160 px, not square)" in err and "--faces auto" in err
    assert "\n" not in err.strip()
    m = _scenes(sample_dir, tmp_path / "crops")
    rc, out, err = run(["--checkpoint", trained[0], "--data", tmp_path / "crops"], capsys)
    assert rc == 0 and f"faces (--faces auto): {m} read whole as face crops" in out and "larger than" not in err
    res = evaluate.evaluate(trained[0], tmp_path / "crops", faces="photos")
    assert res["faces"]["crop"] == 0 and res["faces"]["face"] + res["faces"]["no face"] == m
    pd.DataFrame(dict(image=[str(q) for q in sorted((tmp_path / "photos").rglob("*.png"))], caption="a face",
                      label=[q.parent.name for q in sorted((tmp_path / "photos").rglob("*.png"))])
                 ).to_csv(tmp_path / "photos.csv", index=False)
    res = evaluate.evaluate(trained[0], tmp_path / "photos.csv")      # a captions.csv: read as training reads it
    assert res["faces"] == {"mode": "crops", "crop": n, "face": 0, "no face": 0}


def test_a_photo_without_a_face_is_scored_on_its_centre_square_as_the_demo_does(trained, sample_dir, tmp_path):
    """The face-search path of --faces auto scores exactly what faces_or_whole gives, with no detection luck:
    a blank photo has no face, so its centre square is scored; --faces crops scores the whole photo instead."""
    from PIL import Image
    from faces import faces_or_whole
    (tmp_path / "blank" / "anger").mkdir(parents=True)
    photo = Image.new("RGB", (320, 200), (90, 90, 90))
    photo.paste(Image.new("RGB", (60, 200), (250, 250, 250)), (0, 0))              # a white band off-centre
    photo.save(tmp_path / "blank" / "anger" / "a.png")
    res = evaluate.evaluate(trained[0], tmp_path / "blank")
    assert res["faces"] == {"mode": "auto", "crop": 0, "face": 0, "no face": 1}
    square = faces_or_whole(photo, 1)[0][0]
    assert square.size == (200, 200) and np.asarray(square).max() == 90           # the band is cut away
    square.save(tmp_path / "square.png")
    (tmp_path / "sq" / "anger").mkdir(parents=True)
    square.save(tmp_path / "sq" / "anger" / "a.png")
    want = evaluate.evaluate(trained[0], tmp_path / "sq", faces="crops")
    whole = evaluate.evaluate(trained[0], tmp_path / "blank", faces="crops")
    assert res["confusion"] == want["confusion"] and res["top5"] == want["top5"]
    assert res["retrieval"] == want["retrieval"] and whole["faces"]["crop"] == 1


def test_a_bad_faces_mode_is_one_line(trained, sample_dir):
    from utils import UserError
    with pytest.raises(UserError) as e:
        evaluate.evaluate(trained[0], sample_dir, faces="some")
    assert "--faces some" in str(e.value) and "auto, crops, photos" in str(e.value) and "\n" not in str(e.value)


def test_square_crops_bigger_than_160_px_from_a_captions_csv_draw_no_photo_warning(trained, sample_dir, tmp_path,
                                                                                     capsys):
    """prepare.py --detect-faces writes square face crops of any size: read whole, without the photo warning."""
    from PIL import Image
    table = pd.read_csv(sample_dir / "captions.csv")
    rows = table[table["split"] == "val"].groupby("label").head(2)
    for r in rows.itertuples():
        Image.open(sample_dir / "images" / r.image).convert("RGB").resize((300, 300)).save(tmp_path / r.image)
    rows.assign(image=[str(tmp_path / i) for i in rows["image"]]).to_csv(tmp_path / "captions.csv", index=False)
    rc, out, err = run(["--checkpoint", trained[0], "--data", tmp_path, "--split", "all"], capsys)
    assert rc == 0 and f"faces (--faces crops): {len(rows)} read whole as face crops" in out
    assert "most images are photos" not in err


def test_one_class_is_scored_against_every_known_class_not_1_0_everywhere(trained, sample_dir, tmp_path, capsys):
    (tmp_path / "one" / "happiness").mkdir(parents=True)
    for p in sorted((sample_dir / "images").glob("happiness_*.png"))[:3]:
        shutil.copy(p, tmp_path / "one" / "happiness" / p.name)
    rc, out, err = run(["--checkpoint", trained[0], "--data", tmp_path / "one"], capsys)
    assert rc == 0, err
    assert "hold one class (happiness)" in err and "as --all-classes does" in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert "8 classes" in out and summary["n_images"] == 3
    assert "calibration and retrieval: not applicable (the images hold one class)" in out
    assert "retrieval: text->image" not in out
    assert summary["t2i_mAP"] is None and summary["calibrated_top1"] is None      # not 1.0 / 0.0 whatever the model


def test_a_confusion_png_inside_an_image_folder_dataset_is_refused_before_any_work(trained, sample_dir, tmp_path,
                                                                                     capsys):
    (tmp_path / "cmf" / "happiness").mkdir(parents=True)
    shutil.copy(next((sample_dir / "images").glob("happiness_*.png")), tmp_path / "cmf" / "happiness")
    png = tmp_path / "cmf" / "happiness" / "cm.png"
    rc, out, err = run(["--checkpoint", tmp_path / "none.pth", "--data", tmp_path / "cmf", "--confusion", png], capsys)
    assert rc == 2 and "--confusion" in err and "inside the input folder" in err and err.count("\n") == 1, err
    assert not png.exists()
    from formats import refuse_output_inside
    refuse_output_inside(tmp_path / "cmf" / ".reports" / "cm.png", "--confusion", [tmp_path / "cmf"], "as a face")


def test_each_image_is_scored_once_under_its_first_label_and_the_caption_column_is_optional(trained, sample_dir,
                                                                                            tmp_path, capsys):
    val = pd.read_csv(sample_dir / "captions.csv").query("split == 'val'")[["image", "label"]]
    val["image"] = [str(sample_dir / "images" / p) for p in val["image"]]
    clash = val.head(1).assign(label="anger" if val["label"].iloc[0] != "anger" else "fear")
    pd.concat([val, val, clash]).to_csv(tmp_path / "captions.csv", index=False)          # no caption column
    rc, out, err = run(["--checkpoint", trained[0], "--data", tmp_path / "captions.csv"], capsys)
    assert rc == 0, err
    assert "97 rows name an image an earlier row names" in err and "1 images have rows with other labels" in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["n_images"] == 96 and summary["skipped"] == 97


def test_images_in_subfolders_of_a_class_folder_are_read_under_that_class(sample_dir, tmp_path):
    for k, p in enumerate(sorted((sample_dir / "images").glob("sadness_*.png"))[:3]):
        d = tmp_path / "data" / "sadness" / f"subject{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / p.name)
    os.mkfifo(tmp_path / "data" / "sadness" / "subject0" / "pipe.png")        # opening it would block forever
    (tmp_path / "data" / "sadness" / "linked").symlink_to(tmp_path / "data" / "sadness" / "subject1")  # read once
    (tmp_path / "data" / "sadness" / "subject1" / "loop").symlink_to(tmp_path / "data")            # a loop ends
    table, _ = evaluate.read_data(str(tmp_path / "data"))
    assert len(table) == 3 and set(table["label"]) == {"sadness"}
    elsewhere = tmp_path / "elsewhere"                                 # a subject folder linked from another disk
    elsewhere.mkdir()
    shutil.copy(sorted((sample_dir / "images").glob("sadness_*.png"))[5], elsewhere / "x.png")
    (tmp_path / "data" / "sadness" / "subject2").symlink_to(elsewhere)
    assert len(evaluate.read_data(str(tmp_path / "data"))[0]) == 4
    (tmp_path / "up" / "fer" / "train" / "sadness").mkdir(parents=True)                 # pointed one level too high
    with pytest.raises(evaluate.UserError, match="a split folder inside the class folder fer"):
        evaluate.read_data(str(tmp_path / "up"))


@pytest.mark.parametrize("flag", ["--json", "--confusion"])
def test_an_empty_output_path_is_refused(trained, sample_dir, capsys, flag):
    rc, out, err = run(["--checkpoint", trained[0], "--data", sample_dir, flag, ""], capsys)
    assert rc == 2 and f"{flag} '': an empty path" in err
