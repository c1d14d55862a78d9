"""predict.py: a folder of one's own images -> each face's expressions, as the demo reads an upload."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import faces
import predict
import retrieval
from faces import Box
from image_files import safe_open_image

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    return dict(env, PYTHONPATH=str(ROOT))


def _folder(sample_dir, root: Path) -> Path:
    """Two face-crop files, a 320x240 photo without a face (grey), and a file that is not an image."""
    (root / "sub").mkdir(parents=True)
    for p in sorted((sample_dir / "images").glob("*.png"))[:2]:
        shutil.copy2(p, root / p.name)
    Image.new("RGB", (320, 240), (128, 128, 128)).save(root / "sub" / "blank.jpg")
    (root / "notes.png").write_bytes(b"not an image")
    return root


def test_a_folder_gets_a_row_per_face_and_unreadable_files_are_one_line_each(trained, sample_dir, tmp_path):
    folder = _folder(sample_dir, tmp_path / "mine")
    out = tmp_path / "faces.csv"
    r = subprocess.run([sys.executable, str(ROOT / "predict.py"), str(folder), "mine", "--checkpoint", str(trained[0]),
                        "--out", str(out), "--device", "cpu"], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=300)                      # the folder named twice: each file read once
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "skipped " in r.stderr and "notes.png" in r.stderr
    assert "4 images: 0 faces found in 0 photos, 1 photo without a face, 2 face crops read whole, 1 skipped" \
        in r.stdout
    lines = [x for x in r.stdout.splitlines() if x.startswith(str(folder))]     # one line per face read
    assert len(lines) == 3 and sum("face crop:" in x for x in lines) == 2 and "no face (centre square" in lines[2]
    table = pd.read_csv(out, encoding="utf-8-sig")
    names = [c for c in table.columns if c not in predict.COLUMNS]
    assert len(table) == 3 and len(names) == 8 and sorted(table["how"]) == ["crop", "crop", "no face"]
    assert np.allclose(table[names].sum(axis=1), 1.0, atol=1e-3)
    assert table["x0"].isna().all()                           # no face box: nothing made up


def test_face_boxes_are_in_the_files_own_pixels_after_exif_rotation(trained, tmp_path, monkeypatch):
    """A 3200x2400 JPEG decodes at half size for detection; its box comes back doubled, in file pixels, and an
    EXIF rotation of 90 degrees swaps the file's sides first."""
    seen = []

    def fake(image, max_faces=10, min_size_frac=0.05, detector="auto"):
        seen.append(image.size)
        return [Box(100, 50, 300, 250, 0.99), Box(500, 300, 600, 400, 0.95)]

    monkeypatch.setattr(faces, "detect_faces", fake)
    photo = tmp_path / "big.jpg"
    Image.new("RGB", (3200, 2400), (128, 128, 128)).save(photo)
    engine = retrieval.Engine.load(trained[0], None, "cpu")
    rows = predict.predict_image(engine, photo, ["happy", "sad"], ["a smile", "a frown"], max_faces=5)
    assert seen == [(1600, 1200)] and [r["face"] for r in rows] == [1, 2]
    assert [(r["x0"], r["y0"], r["x1"], r["y1"]) for r in rows] == [(200, 100, 600, 500), (1000, 600, 1200, 800)]
    assert all(r["how"] == "face" and abs(r["happy"] + r["sad"] - 1) < 1e-3 for r in rows)
    exif = Image.Exif()
    exif[0x0112] = 6                                          # stored 3200x2400, displayed 2400x3200
    Image.new("RGB", (3200, 2400), (128, 128, 128)).save(tmp_path / "turned.jpg", exif=exif)
    assert safe_open_image(tmp_path / "turned.jpg", max_side=1600).info["file_size"] == (2400, 3200)
    rows = predict.predict_image(engine, tmp_path / "turned.jpg", ["happy"], ["a smile"], max_faces=1)
    assert seen[-1] == (1200, 1600) and (rows[0]["x0"], rows[0]["x1"]) == (200, 600) and len(rows) == 1
    assert rows[0]["more_faces"]                              # two found, --max-faces 1 kept the larger


@pytest.mark.parametrize("args, says", [
    (["/no/such/dir"], "/no/such/dir: no such file or folder"),
    (["IMAGES", "--out", "x.txt"], "name a .csv or .json file"),
    (["IMAGES", "--out", "."], "is a folder"),
    (["IMAGES", "--vocab", "VOCAB"], "expression name `file` is also a column"),
    (["IMAGES", "--top", "0"], "--top, --max-faces and --max-frames must be at least 1"),
    (["IMAGES", "--plots", "VOCAB"], "is a file; give a folder for the timeline PNGs"),
    (["IMAGES", "--plots", "imgs/plots"], "--plots imgs/plots: inside the input folder"),
    (["IMAGES", "--out", ""], "--out '': an empty path"),
    (["EMPTY"], "no .bmp/"),
])
def test_bad_requests_are_one_line_and_write_nothing(trained, tmp_path, capsys, args, says):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"junk")
    (tmp_path / "empty").mkdir()
    (tmp_path / "v.txt").write_text("file: a smile\nsad: a frown\n")
    subst = {"IMAGES": str(tmp_path / "imgs"), "VOCAB": str(tmp_path / "v.txt"), "EMPTY": str(tmp_path / "empty")}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        rc = predict.run_cli(predict.main, [subst.get(x, x) for x in args] + ["--checkpoint", str(trained[0])])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert rc == 2 and says in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "imgs", "v.txt"]


def test_nothing_readable_is_an_error_not_an_empty_table(trained, tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"junk")
    rc = predict.run_cli(predict.main, [str(tmp_path / "a.jpg"), "--checkpoint", str(trained[0]),
                                        "--out", str(tmp_path / "o.csv")])
    assert rc == 2 and "the image could not be read (the reason is above)" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_an_unreadable_video_is_one_line_without_ffmpegs_own_and_counted_as_a_video(trained, tmp_path):
    clip = tmp_path / "clip.mp4"                              # an MP4 header without its moov atom
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(4000))
    r = subprocess.run([sys.executable, str(ROOT / "predict.py"), str(clip), "--checkpoint", str(trained[0]),
                        "--device", "cpu"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    said = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and said == [f"skipped {clip}: not a video OpenCV can read: the file starts as an MP4 "
                                          "but is damaged or cut short (copy it again)",
                                          "error: the video could not be read (the reason is above); nothing written"]
    assert "1 video, 0 video frames: 0 faces found in 0 pictures, 1 skipped (unreadable)" in r.stdout


def test_sentences_are_encoded_once_per_engine_and_threads_get_the_same_vectors(trained, monkeypatch):
    engine = retrieval.Engine.load(trained[0], None, "cpu")
    want = retrieval.embed_texts(engine.model, ["a smile", "a frown", "wide eyes"])
    calls = []
    real = retrieval.embed_texts
    monkeypatch.setattr(retrieval, "embed_texts", lambda m, t, a=None: calls.append(list(t)) or real(m, t))
    assert np.allclose(engine.embed_text(["a smile", "a frown"]), want[:2], atol=1e-5)
    assert np.allclose(engine.embed_text(["a frown", "wide eyes", "a smile"]), want[[1, 2, 0]], atol=1e-5)
    assert calls == [["a smile", "a frown"], ["wide eyes"]]
    got, errors = [], []

    def worker(i):
        try:
            got.append(engine.embed_text([f"sentence {i % 3}", "a smile"]))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(got) == 12
    ref = {i: real(engine.model, [f"sentence {i}", "a smile"]) for i in range(3)}
    assert all(any(np.allclose(g, r, atol=1e-5) for r in ref.values()) for g in got)


def _video(path: Path, n: int = 30) -> Path:
    import cv2
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    for i in range(n):
        out.write(np.full((240, 320, 3), 60 + 4 * i, np.uint8))              # brightness tells the frames apart
    out.release()
    return path


def test_a_video_gets_rows_per_frame_with_times_and_one_overall_line(trained, tmp_path, capsys, monkeypatch):
    """--max-frames frames spaced evenly, each with its index and time; the overall line is the turn-weighted
    mean of the one person's frames (sequence.sequence_scores), as the demo's Sequence tab computes it."""
    from sequence import sequence_scores
    path = _video(tmp_path / "clip.avi")
    monkeypatch.setattr(faces, "detect_faces", lambda image, max_faces=10, min_size_frac=0.05, detector="auto":
                        [Box(100, 60, 200, 160, 0.99)])
    rc = predict.main([str(path), "--checkpoint", str(trained[0]), "--max-frames", "4", "--decay", "0.5",
                       "--out", str(tmp_path / "f.json"), "--vocab", "paper"])
    lines = capsys.readouterr().out.splitlines()
    rows = pd.read_json(tmp_path / "f.json")
    assert rc == 0 and list(rows["frame"]) == [0, 10, 19, 29] and list(rows["time_s"]) == [0.0, 1.0, 1.9, 2.9]
    assert (rows["how"] == "face").all() and list(rows.loc[0, ["x0", "y0", "x1", "y1"]]) == [100, 60, 200, 160]
    assert (rows["person"] == 1).all()
    names = [c for c in rows.columns if c not in predict.COLUMNS]
    overall, w = sequence_scores(rows[names].to_numpy(), 0.5)
    best = names[int(np.argmax(overall))]
    said = [x for x in lines if "overall, person 1, in 4 of 4 frames" in x]
    assert len(said) == 1 and f"the last frame weighs {w[-1]:.2f}): {best} {overall.max():.2f}" in said[0]
    assert sum(x.startswith(f"{path}  frame ") for x in lines) == 4
    assert "1 video, 4 video frames: 4 faces found in 4 pictures" in "\n".join(lines)


def test_two_people_in_a_video_keep_their_numbers_when_the_largest_face_changes(trained, tmp_path, capsys,
                                                                             monkeypatch):
    """Person numbers follow the faces (sequence.track_faces), not their size order, and each person seen in two
    frames or more gets an overall line of its own frames; boxes are scaled back to the video's pixels."""
    path = _video(tmp_path / "talk.avi")
    left_big, left_small = Box(20, 60, 120, 160, 0.99), Box(30, 70, 110, 150, 0.98)
    right_big, right_small = Box(190, 60, 290, 160, 0.99), Box(200, 70, 280, 150, 0.98)

    def detect(image, max_faces=10, min_size_frac=0.05, detector="auto"):        # largest first, as MTCNN lists
        early = np.asarray(image).mean() < 118                                   # frames 0 and 10 of 0, 10, 19, 29
        return [left_big, right_small] if early else [right_big, left_small]

    monkeypatch.setattr(faces, "detect_faces", detect)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "talk_person1.png").write_bytes(b"an older plot")   # replaced whole
    rc = predict.main([str(path), "--checkpoint", str(trained[0]), "--max-frames", "4", "--out",
                       str(tmp_path / "t.csv"), "--plots", str(tmp_path / "plots")])
    lines = capsys.readouterr().out.splitlines()
    rows = pd.read_csv(tmp_path / "t.csv", encoding="utf-8-sig")
    assert rc == 0 and list(rows["face"]) == [1, 2] * 4
    assert "talk.avi,0,0.0,1,1,face,False,20,60,120,160," in (tmp_path / "t.csv").read_text("utf-8-sig")   # ints as ints
    left = rows["x0"] < 160
    assert list(rows["person"][left]) == [1] * 4 and list(rows["person"][~left]) == [2] * 4
    assert sum(f"frame 19 (1.90 s) person 2 at 190,60-290,160:" in x for x in lines) == 1
    said = [x for x in lines if "  overall, person" in x]
    assert [x.split("  overall, ")[1].split(" (")[0] for x in said] == ["person 1, in 4 of 4 frames",
                                                                        "person 2, in 4 of 4 frames"]
    plots = sorted((tmp_path / "plots").iterdir())                      # a timeline per person, nothing else
    assert [p.name for p in plots] == ["talk_person1.png", "talk_person2.png"]
    assert all(Image.open(p).format == "PNG" for p in plots)


def test_plots_of_two_videos_with_one_name_do_not_overwrite_each_other(tmp_path):
    rows = [dict(file=f"{d}/clip.mp4", face=1, person=1, happy=0.8, sad=0.2) for d in ("a", "a", "b", "b")]
    taken = set()
    first = predict.write_plots(rows[:2], ["happy", "sad"], 0.5, tmp_path, taken)
    second = predict.write_plots(rows[2:], ["happy", "sad"], 0.5, tmp_path, taken)
    assert [p.name for p in first + second] == ["clip_person1.png", "clip-2_person1.png"]


def test_one_odd_file_is_skipped_and_ctrl_c_keeps_the_rows_read_so_far(trained, sample_dir, tmp_path, capsys,
                                                                      monkeypatch):
    for p in sorted((sample_dir / "images").glob("*.png"))[:3]:
        shutil.copy2(p, tmp_path / p.name)
    a, b, c = sorted(tmp_path.glob("*.png"))
    real = predict.predict_image

    def odd(fail_on, error):
        def fake(engine, path, *args, **kw):
            if path.name == fail_on.name:
                raise error
            return real(engine, path, *args, **kw)
        return fake

    monkeypatch.setattr(predict, "predict_image", odd(b, RuntimeError("boom")))
    argv = [str(tmp_path), "--checkpoint", str(trained[0]), "--out", str(tmp_path / "o.csv")]
    assert predict.run_cli(predict.main, argv) == 0
    err = capsys.readouterr().err
    assert f"skipped {b}: unexpected RuntimeError (boom)" in err and "Traceback" not in err
    assert list(pd.read_csv(tmp_path / "o.csv", encoding="utf-8-sig")["file"]) == [str(a), str(c)]
    monkeypatch.setattr(predict, "predict_image", odd(c, KeyboardInterrupt()))
    assert predict.run_cli(predict.main, argv) == 130
    assert "interrupted: wrote the 2 rows read so far" in capsys.readouterr().err
    assert list(pd.read_csv(tmp_path / "o.csv", encoding="utf-8-sig")["file"]) == [str(a), str(b)]


def test_the_summary_counts_images_and_videos_apart():
    rows = [dict(face=1, frame=None, how="face"), dict(face=1, frame=0, how="face"),
            dict(face=2, frame=0, how="face"), dict(face=1, frame=5, how="no face")]
    assert predict.summary_line(rows, 1, 3, 1) == ("2 images and 1 video, 2 video frames: 3 faces found in 2 pictures, "
                                                   "1 picture without a face, 1 skipped (unreadable)")
    assert predict.summary_line(rows[:1], 0, 1) == "1 image: 1 face found in 1 photo"


def test_an_image_too_small_for_a_face_is_skipped_with_its_path(trained, tmp_path, capsys):
    Image.new("L", (4, 4), 128).save(tmp_path / "dot.png")
    rc = predict.run_cli(predict.main, [str(tmp_path / "dot.png"), "--checkpoint", str(trained[0])])
    err = capsys.readouterr().err
    assert rc == 2 and f"skipped {tmp_path / 'dot.png'}: 4x4 px is too small to read a face" in err


def test_the_summary_says_files_refused_for_their_size_apart_from_unreadable_ones():
    assert predict.skip_reason("a.png: 4x4 px is too small to read a face") == "refused (too small)"
    assert predict.skip_reason("b.png: refused as a possible decompression bomb (x)") == "refused (too large)"
    line = predict.summary_line([], {"unreadable": 1, "refused (too small)": 2, "refused (too large)": 1}, 4)
    assert line.endswith("1 skipped (unreadable), 2 refused (too small), 1 refused (too large)")


def test_a_still_gif_is_read_as_an_image_and_an_animated_one_as_a_video(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "still.gif")
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:])
    assert not predict.is_video(tmp_path / "still.gif") and predict.is_video(tmp_path / "moving.gif")
    assert predict.is_video(tmp_path / "clip.mp4") and not predict.is_video(tmp_path / "a.jpg")


def test_a_pipe_or_a_locked_file_or_folder_is_named_for_what_it_is(tmp_path, monkeypatch, capsys):
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(predict.UserError, match="pipe.jpg: not a regular file"):
        predict.image_paths([str(tmp_path / "pipe.jpg")])
    with pytest.raises(predict.UserError, match="pipe.jpg: not a regular file"):
        safe_open_image(tmp_path / "pipe.jpg")
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "locked").mkdir()
    real, real_open = os.scandir, Image.open

    def scandir(p="."):                                        # chmod 000 has no effect as root
        if os.fspath(p).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return real(p)

    def locked_open(fp, *a, **kw):
        if str(fp).endswith("ok.png"):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *a, **kw)
    monkeypatch.setattr(os, "scandir", scandir)
    assert predict.image_paths([str(tmp_path)]) == [tmp_path / "ok.png"]
    assert f"skipped folder {tmp_path / 'locked'}: permission denied" in capsys.readouterr().err
    monkeypatch.setattr(Image, "open", locked_open)
    with pytest.raises(predict.UserError, match=r"ok.png: permission denied \(check its permissions\)$"):
        safe_open_image(tmp_path / "ok.png")


def test_images_over_the_pixel_limit_get_one_line_and_no_pil_warning(monkeypatch):
    import io
    import warnings
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)      # PIL warns over 10,000 px and refuses over 20,000
    for side, says in ((120, "120x120"), (150, "22,500 pixels")):
        buf = io.BytesIO()
        Image.new("L", (side, side)).save(buf, "PNG")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(predict.UserError) as e:
                safe_open_image(buf.getvalue(), max_pixels=5_000)
        assert str(e.value) == f"image data: {says} is over the 5,000-pixel limit; resize it first"


def test_a_file_name_with_a_newline_is_printed_on_one_line():
    row = dict(file="a\nb.jpg", frame=None, time_s=None, face=1, person=None, how="face", x0=1, y0=2, x1=3, y1=4,
               happy=0.9)
    assert predict.face_line(row, ["happy"], 1) == "a\\nb.jpg  face 1 at 1,2-3,4: happy 0.90"
