"""bench/ scripts: the training-step benchmark runs its three modes, and the FER-2013 table describes each run."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_recipe  # noqa: E402
import bench_train  # noqa: E402
import fer2013  # noqa: E402


def test_bench_train_prints_ratio_and_ceiling(capsys):
    rc = bench_train.main(["--image-model", "resnet10t", "--image-size", "32", "--batch-size", "8", "--steps", "1",
                           "--warmup", "0", "--amp", "off", "--max-length", "16", "--vs-plain"])
    out = capsys.readouterr().out
    assert rc == 0
    num = {k: float(re.search(rf"{k}\s*:\s*([\d.]+)", out).group(1))
           for k in ("every caption encoded", "distinct captions only", "speed-up", "text tower free")}
    assert all(v > 0 for v in num.values())
    # the printed figures are rounded (rates to 0.1, the ratio to 0.01): the ratio must lie in the interval the
    # rounded rates allow, widened by the ratio's own rounding -- never a fixed tolerance
    d, e, half_rate, half_ratio = num["distinct captions only"], num["every caption encoded"], 0.05, 0.005
    assert (d - half_rate) / (e + half_rate) - half_ratio <= num["speed-up"] <= \
        (d + half_rate) / (e - half_rate) + half_ratio
    assert "ceiling of any text saving" in out and "plain fp32 NCHW step" in out


def fake_eval(top1: float, unseen: bool = False) -> dict:
    per = dict.fromkeys(fer2013.CLASSES, top1)
    ev = dict(top1=top1, top5=0.97, uar=top1 - 0.01, macro_f1=0.5, per_class_recall=per,
              calibrated=dict(top1=top1 - 0.05))
    if unseen:
        ev["unseen"] = {"surprise": dict(ap=0.3, base_rate=0.1, ap_over_base=3.0, recall=0.04, calibrated_recall=0.06)}
    return ev


def test_fer2013_table_rows_follow_each_runs_setup(tmp_path):
    clip = dict(run="clip", train_minutes=41.0, images_per_s=170.0, best_epoch=12,
                setup=dict(epochs=12, bank="paper", image_size=64, ema_decay=0.999), paper=fake_eval(0.66),
                **{"paper+flip": fake_eval(0.67), "paper+flip+prior": fake_eval(0.68)}, rich=fake_eval(0.62))
    older = dict(run="clip", train_minutes=47.6, images_per_s=140.0, best_epoch=12,     # an --also row: no EMA saved
                 setup=dict(epochs=14, bank="paper"), paper=fake_eval(0.6), rich=fake_eval(0.5))
    unseen = dict(run="unseen", train_minutes=13.8, images_per_s=155.0, best_epoch=5, setup=dict(epochs=5, bank="rich"),
                  paper=fake_eval(0.5, True), rich=fake_eval(0.54, True))
    a = SimpleNamespace(image_size=64, batch_size=64, lr_image=1e-3, unseen="surprise", limit=5)
    pd.DataFrame(dict(split=["train"] * 3 + ["test"] * 2)).to_csv(tmp_path / "captions.csv", index=False)
    md = fer2013.table([clip, unseen, older], a, tmp_path)
    assert "(a stratified `--limit 5` subset) (3 faces, 3% held out" in md and "(PublicTest, 2 faces)" in md
    assert "| CLIP (contrastive) | 64 | 12 | 0.999 | paper | 41.0 | 170 | 12 | paper | - | 66.0% |" in md
    assert "| CLIP (contrastive) | 64 | 12 | 0.999 | paper | 41.0 | 170 | 12 | paper | flip | 67.0% |" in md
    assert "| CLIP (contrastive) | 64 | 12 | 0.999 | paper | 41.0 | 170 | 12 | paper | flip + prior | 68.0% |" in md
    assert "| CLIP (contrastive) | ? | 14 | - | paper | 47.6 | 140 | 12 | paper | - | 60.0% |" in md
    assert "| CLIP, `surprise` unseen | ? | 5 | - | rich | 13.8 |" in md
    assert "| paper | - | 0.300 | 0.100 | 3.00x |" in md
    assert md.count("Unseen phrasing") == 1                      # from the first CLIP run only
    assert "--runs clip --image-size 64 --epochs 12 --ema-decay 0.999 --bank paper" in md
    assert "top-1 66.0% -> 62.0% (-4.0 points)" in md          # trained on paper, scored with the disjoint rich set


def test_fer2013_refuses_a_cached_row_of_another_setup_and_bad_run_names(tmp_path, capsys):
    args = SimpleNamespace(epochs=2, image_size=48, batch_size=64, bank="paper", sampler="none", lr_image=1e-3,
                           ema_decay=0.999, force=False, reeval=False)
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "result.json").write_text(json.dumps({"run": "clip", "setup": {**fer2013.setup_of(args),
                                                                                        "image_size": 32}}))
    with pytest.raises(UserError, match="trained with .* not these flags; pass --force"):
        fer2013.run("clip", args, tmp_path, tmp_path)
    with pytest.raises(SystemExit):
        fer2013.main(["--runs", "clip,foo"])
    assert "expected comma-separated names from clip, ce, unseen" in capsys.readouterr().err
    (tmp_path / "train").mkdir()
    assert fer2013.main(["--fer", str(tmp_path), "--also", str(tmp_path / "nope"), "--work", str(tmp_path / "w")]) == 2
    assert "--also" in capsys.readouterr().err and not (tmp_path / "w").exists()    # before any training


def test_bench_recipe_refuses_missing_data_before_making_run_folders(tmp_path, capsys):
    work = tmp_path / "w"
    assert bench_recipe.run_cli(bench_recipe.main, ["--data", str(tmp_path / "none"), "--work", str(work)]) == 2
    assert "no captions.csv there" in capsys.readouterr().err and not work.exists()


def test_bench_recipe_prints_slow_rates_with_decimals_not_as_zero():
    assert [bench_recipe.rate(x) for x in (0.4, 0.0371, 12.345, 99.96, 250.4)] == ["0.4", "0.0371", "12.3", "100", "250"]


def test_bench_recipe_times_each_path_on_the_same_batches_and_prints_its_ratio(tmp_path, capsys):
    """Real Trainers (today's path: no decode cache; the cache; the shipped frozen stages) on the bundled sample,
    timed in turns."""
    rc = bench_recipe.main(["--data", str(ROOT), "--steps", "2", "--rounds", "2", "--variants", "today,cache,freeze2",
                            "--work", str(tmp_path), "--recipe", "--preset tiny --image-size 32 --batch-size 8 "
                            "--caption-bank paper --positives label --contrast classes"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = dict(re.findall(r"^\| (today|cache|freeze2) \| ([\d.]+) \(", out, re.M))
    ratios = dict(re.findall(r"^\| (today|cache|freeze2) \|.*\| ([\d.]+)x \|$", out, re.M))
    assert set(rows) == {"today", "cache", "freeze2"} and all(float(v) > 0 for v in rows.values())
    assert ratios["today"] == "1.00"
    # the cache row's ratio lies in the interval its rounded rates allow (half a unit of each rate's last printed
    # digit; ratio to 0.01): a starved machine's slow rates print with decimals, and the check still holds
    def bounds(text):
        half = 0.5 * 10 ** -len(text.partition(".")[2])
        return float(text) - half, float(text) + half
    (c_lo, c_hi), (t_lo, t_hi) = bounds(rows["cache"]), bounds(rows["today"])
    assert c_lo / t_hi - 0.005 <= float(ratios["cache"]) <= c_hi / t_lo + 0.005


def test_photo_like_scenes_keep_the_face_box_and_add_camera_detail_reproducibly():
    """bench_detect --photo: the same face and place as a plain scene, with sharpening, noise and JPEG on top."""
    import bench_detect
    from PIL import Image
    face = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48), dtype=np.uint8))
    plain = bench_detect.make_scene(face, "texture", np.random.default_rng(3))
    photo = bench_detect.make_scene(face, "texture", np.random.default_rng(3), photo=True)
    again = bench_detect.make_scene(face, "texture", np.random.default_rng(3), photo=True)
    assert photo[1] == plain[1] and photo[0].size == plain[0].size == bench_detect.CANVAS
    assert np.array_equal(np.asarray(photo[0]), np.asarray(again[0]))
    assert np.abs(np.asarray(photo[0], float) - np.asarray(plain[0], float)).mean() > 2
    tilted = bench_detect.make_scene(face, "texture", np.random.default_rng(3), roll=25)
    x, y, side = plain[1]
    box = (x, y, x + side, y + side)
    assert tilted[1] == plain[1] and not np.array_equal(np.asarray(tilted[0].crop(box)), np.asarray(plain[0].crop(box)))


def test_photo_path_scorer_draws_only_the_asked_split(tmp_path):
    """bench_detect --acc-data: a model is chosen by the photo path on validation faces, never on test ones."""
    import bench_detect
    from PIL import Image
    rows = ["image,caption,label,split"]
    for i in range(12):
        Image.new("L", (48, 48), 40 + 10 * i).save(tmp_path / f"f{i}.png")
        rows.append(f"f{i}.png,a face,{'happiness' if i % 2 else 'sadness'},{'val' if i < 5 else 'test'}")
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    items = bench_detect.labelled_split(tmp_path, "val", 100, 0)
    assert sorted(p.name for p, _ in items) == [f"f{i}.png" for i in range(5)]
    assert bench_detect.labelled_split(tmp_path, "val", 3, 0) == bench_detect.labelled_split(tmp_path, "val", 3, 0)
    assert len(bench_detect.labelled_split(tmp_path, "val", 3, 0)) == 3
    assert len(bench_detect.labelled_split(tmp_path, "all", 100, 0)) == 12
    with pytest.raises(UserError, match="no labelled `train` rows"):
        bench_detect.labelled_split(tmp_path, "train", 3, 0)
    with pytest.raises(UserError, match="^--acc-data .*no such file"):
        bench_detect.labelled_split(tmp_path / "missing", "val", 3, 0)


def test_tight_crop_rows_score_the_same_faces_with_and_without_the_retry(monkeypatch):
    """bench_detect --tight: upscaled faces read whole, then searched with the retry off (before) and on; the
    detector's setting is restored afterwards, even when a search fails."""
    import bench_detect
    import faces
    from PIL import Image
    ims = [Image.new("RGB", (48, 48), (30 * i, 30 * i, 30 * i)) for i in range(3)]     # blank: no face anywhere
    rows = bench_detect.tight_rows(ims, 200)
    assert list(rows) == ["200 px tight crops, read whole", "200 px tight crops, MTCNN, retry pad 0 (0 found)",
                          "200 px tight crops, MTCNN, retry pad 0.25 (0 found)"]
    assert all(len(v) == 3 and v[0].size == (200, 200) for v in rows.values())
    assert faces.MTCNN_RETRY_PAD == 0.25
    monkeypatch.setattr(faces, "detect_faces", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bench_detect.tight_rows(ims, 200)
    assert faces.MTCNN_RETRY_PAD == 0.25


def test_write_folder_gives_evaluate_a_photo_folder_and_its_crops(tmp_path):
    """bench_detect --write-folder: each face once as a photo-like scene (JPEG, larger than a crop) and once as the
    original, under its class folder, reproducibly."""
    import bench_detect
    from PIL import Image
    items = []
    for i, cls in enumerate(["happy", "sad", "happy"]):
        p = tmp_path / "src" / f"f{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.new("L", (48, 48), 60 + 40 * i).save(p)
        items.append((p, cls))
    bench_detect.write_folder(items, tmp_path / "a", seed=1)
    bench_detect.write_folder(items, tmp_path / "b", seed=1)
    photos = sorted((tmp_path / "a" / "photos").rglob("*.jpg"))
    assert [q.relative_to(tmp_path / "a" / "photos").as_posix() for q in photos] == ["happy/f0.jpg", "happy/f2.jpg",
                                                                                      "sad/f1.jpg"]
    assert all(Image.open(q).size == bench_detect.CANVAS for q in photos)
    assert Image.open(tmp_path / "a" / "crops" / "sad" / "f1.png").size == (48, 48)
    assert (tmp_path / "a" / "photos" / "sad" / "f1.jpg").read_bytes() == (tmp_path / "b" / "photos" / "sad" /
                                                                           "f1.jpg").read_bytes()


def test_bench_predict_finds_predict_and_evaluate_give_the_same_answers(trained, sample_dir, tmp_path, capsys):
    """The demo's answers (predict.py reads as the demo does) are the ones evaluate.py reports, face crops and
    photos without a face alike; the bench exits 1 when their confusion matrices differ."""
    import shutil
    from PIL import Image
    import bench_predict
    table = __import__("pandas").read_csv(sample_dir / "captions.csv")
    for r in table[table["split"] == "val"].groupby("label").head(3).itertuples():
        (tmp_path / r.label).mkdir(exist_ok=True)
        shutil.copy2(sample_dir / "images" / r.image, tmp_path / r.label / r.image)
    Image.new("RGB", (320, 240), (128, 128, 128)).save(tmp_path / "anger" / "blank.jpg")   # no face: centre square
    assert bench_predict.main(["--folder", str(tmp_path), "--checkpoint", str(trained[0])]) == 0
    out = capsys.readouterr().out
    assert "25 files in" in out and "confusion matrices equal" in out and " face crop: " not in out


def test_bench_video_writes_two_face_videos_and_prints_both_groupings(trained, sample_dir, tmp_path, capsys):
    """bench_video on a FER-style folder: each video holds a face of two different classes, and the bench prints
    its count of faces and both groupings' figures."""
    import shutil
    import bench_video
    table = __import__("pandas").read_csv(sample_dir / "captions.csv")
    for r in table.groupby("label").head(2).itertuples():
        (tmp_path / "test" / r.label).mkdir(parents=True, exist_ok=True)
        shutil.copy2(sample_dir / "images" / r.image, tmp_path / "test" / r.label / r.image)
    assert bench_video.main(["--fer", str(tmp_path), "--n", "2", "--frames", "3", "--checkpoint",
                             str(trained[0])]) == 0
    out = capsys.readouterr().out
    assert "2 videos x 3 frames, two faces each (12 faces)" in out
    assert re.search(r"tracked persons \(sequence.track_faces\): \d+ groups", out)
    assert re.search(r"numbered by size: \d+ groups", out)


@pytest.mark.parametrize("module, argv", [
    ("bench_index", ["--sizes", "0"]), ("bench_index", ["--sizes", "abc"]), ("bench_index", ["--nprobe", ","]),
    ("bench_query", ["--n", "0"]), ("bench_detect", ["--n", "-5", "--fer", "/nonexistent", "--repeat", "1"]),
    ("bench_train", ["--steps", "0"]), ("bench_video", ["--frames", "0", "--fer", "/nonexistent"])])
def test_bench_bad_numbers_are_argparse_one_line_errors(module, argv, capsys):
    """A zero, negative or non-numeric count is argparse's usage error (exit 2), before any model or data."""
    main = __import__(module).main
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.startswith("usage: ") and err.count("error:") == 1
    assert re.search(rf"^\S+: error: argument {argv[0]}: '{re.escape(argv[1])}': expected .+\n\Z", err, re.M)


@pytest.mark.parametrize("argv, err", [
    (["--backgrounds", ""], "argument --backgrounds: '': expected comma-separated names from grey, texture"),
    (["--backgrounds", "grey,foo"], "expected comma-separated names from grey, texture"),
    (["--seed", "-1"], "argument --seed: '-1': expected a whole number >= 0"),
    (["--acc-data", "x"], "--acc-data: only with --checkpoint"),
    (["--source-sides", "0,48"], "--source-sides: only with --checkpoint"),
    (["--n", "0"], "--n 0 leaves nothing to measure"),
    (["--acc-split", "test", "--checkpoint", "m.pth"], "--acc-split: only with --acc-data"),
    (["--tune", "--n", "0", "--checkpoint", "m.pth"], "--n 0 leaves nothing to measure"),
])
def test_bench_detect_refuses_flags_that_would_be_ignored_or_fail_late(argv, err, capsys):
    import bench_detect
    with pytest.raises(SystemExit) as e:
        bench_detect.main(argv + ["--fer", "/nonexistent"])
    assert e.value.code == 2 and err in capsys.readouterr().err


def test_bench_detect_names_a_missing_checkpoint_before_any_detection(tmp_path, monkeypatch, capsys):
    import bench_detect
    from utils import run_cli
    (tmp_path / "train" / "happy").mkdir(parents=True)
    (tmp_path / "test" / "happy").mkdir(parents=True)
    monkeypatch.setattr(bench_detect, "pick_faces", lambda *a: pytest.fail("detection ran before the check"))
    assert run_cli(bench_detect.main, ["--fer", str(tmp_path), "--checkpoint", str(tmp_path / "no.pth")]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'no.pth'}" in err and err.count("\n") == 1
    ck = torch.load(ROOT / "tests" / "fixtures" / "legacy_v1.pth", weights_only=True)      # damaged: NaN weights
    ck["state_dict"]["image_head.proj.weight"].fill_(float("nan"))
    torch.save(ck, tmp_path / "nan.pth")
    assert run_cli(bench_detect.main, ["--fer", str(tmp_path), "--checkpoint", str(tmp_path / "nan.pth")]) == 2
    assert "image_head.proj.weight holds NaN" in capsys.readouterr().err


def test_bench_video_without_fer_prints_one_skip_line_and_no_percentage(tmp_path, capsys):
    import bench_video
    assert bench_video.main(["--fer", str(tmp_path / "none"), "--n", "2", "--frames", "4"]) == 0
    assert capsys.readouterr().out == f"skipped: FER-2013 not found at {tmp_path / 'none'} (expected test/; pass --fer DIR)\n"
    from PIL import Image
    (tmp_path / "test" / "happy").mkdir(parents=True)                  # one class: no pair of different classes
    for i in range(4):
        Image.new("L", (48, 48), 50 * i).save(tmp_path / "test" / "happy" / f"{i}.png")
    assert bench_video.main(["--fer", str(tmp_path), "--n", "2", "--frames", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("skipped: no two faces of different classes") and "%" not in out


def test_bench_query_times_only_sentences_no_earlier_row_encoded(monkeypatch, capsys):
    """Rows sharing a tower share its in-process sentence cache: every row's sentences (warm-up too) are its own,
    and each row warms up before its first timed call."""
    import bench_query
    calls = []

    class Fake:
        def __init__(self, *a, **k):
            self.row = None

        def eval(self):
            return self

        def encode_text(self, texts):
            calls.append(texts[0])

    monkeypatch.setattr(bench_query, "load_checkpoint", lambda p: (Fake(),))
    monkeypatch.setattr(bench_query, "ExprCLIP", Fake)
    monkeypatch.setattr(bench_query, "make_config", lambda *a, **k: None)
    assert bench_query.main(["--n", "2"]) == 0
    assert capsys.readouterr().out.count("\n| ") == 4                  # the bundled model and three towers
    assert len(calls) == len(set(calls)) == 4 * 2 * (4 + 2)            # rows x languages x (warm-up + timed)
    assert calls[:4] == bench_query.queries(bench_query.EN, 4, -1)     # warm-up first, untimed


def test_bench_index_times_each_capped_nprobe_once(capsys):
    import bench_index
    assert bench_index.nprobes([32, 64, 128], 32) == [32] and bench_index.nprobes([16, 64, 8], 32) == [16, 32, 8]
    bench_index.main(["--sizes", "300", "--queries", "4", "--exact-queries", "0", "--nprobe", "1,64,128"])
    probes = re.findall(r"IVF\d+,SQfp16 nprobe=(\d+)", capsys.readouterr().out)
    assert len(probes) == len(set(probes)) == 2


@pytest.mark.parametrize("script", ["ferplus_report.py", "ferplus_sentences.py"])
def test_ferplus_helpers_run_as_scripts_say_they_are_libraries(script):
    import subprocess
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == f"bench/{script} is a library used by bench/ferplus.py; run `python bench/ferplus.py --help` instead\n"


def test_bench_train_removes_its_temporary_text_tower_folder(monkeypatch):
    """The DistilBERT-sized tower is built from a temporary folder that is gone once the model is built."""
    import torch
    seen = []

    def fake_model(cfg):                  # what ExprCLIP reads at construction: the folder's config and tokenizer
        seen.append((Path(cfg.text_model), sorted(p.name for p in Path(cfg.text_model).iterdir())))
        return torch.nn.Identity()
    monkeypatch.setattr(bench_train, "ExprCLIP", fake_model)
    bench_train.build_model(bench_train.parse_args(["--image-model", "resnet10t"]), torch.device("cpu"))
    (folder, files), = seen
    assert {"config.json", "tokenizer_config.json"} <= set(files) and not folder.exists()
