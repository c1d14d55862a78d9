"""Demo features: vocabulary save/load, per-face ranking, similar-from-gallery, sequence mode, a concurrent-load
test against the real app, and prepare.py --detect-faces."""
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import demo
import prepare
import faces
from photoviews import result_items
from retrieval import (Engine, frame_crops, largest_face, rank_expressions, rank_faces, score_frames, search_text,
                       similar_images, similar_to_gallery_image)
from sequence import sequence_scores
from utils import UserError, run_cli
from vocab import load_vocab, parse_vocab
from video import load_frames, read_video
from webguard import public_message

FER_FACE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fer2013" / "test" / "happy"
BIG, SMALL = "PublicTest_10248771.png", "PublicTest_10245799.png"      # faces the cascades find (see test_faces)
VOCAB = "happy: a wide smile\nsad: a frown with a downturned mouth\nsurprised: wide-open eyes and an open mouth\n"


@pytest.fixture(scope="module")
def engine(trained, sample_dir, tmp_path_factory):
    return Engine.load(trained[0], sample_dir / "images", "cpu", tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture(scope="module")
def h(engine):
    return demo.make_handlers(engine, max_faces=5, max_frames=8)


def _fer(name: str, size: int) -> Image.Image:
    path = FER_FACE / name
    if not path.is_file():
        pytest.skip(f"FER-2013 not found at {path}")
    return Image.open(path).convert("L").resize((size, size), Image.BICUBIC)


def _two_faces(path: Path) -> str:
    canvas = Image.new("L", (640, 360), 128)
    canvas.paste(_fer(SMALL, 140), (420, 180))
    canvas.paste(_fer(BIG, 180), (40, 40))
    canvas.convert("RGB").save(path)
    return str(path)


def _sample_faces(sample_dir: Path, n: int) -> list[str]:
    return [str(p) for p in sorted((sample_dir / "images").glob("*.png"))[:n]]


# ----------------------------------------------------------------------------- 1. vocabularies

def test_save_then_load_vocab_round_trips_the_fine_grained_list(h, tmp_path):
    text = (Path(demo.__file__).parent / "vocab" / "fine_grained.txt").read_text()
    path, msg = h["save_vocab"](text)
    assert Path(path).name == "expressions.txt" and "saved 30 expressions" in msg
    assert load_vocab(path) == parse_vocab(text) and len(load_vocab(path)) == 30
    loaded, msg = h["load_vocab"](path, "old: text")
    assert parse_vocab(loaded) == parse_vocab(text) and "loaded 30 expressions from expressions.txt" in msg


def test_bad_vocab_files_get_a_message_with_the_line_and_keep_the_list(h, tmp_path):
    bad = tmp_path / "mine.txt"
    bad.write_text("# my list\nhappy: a smile\nsad:\n")
    text, msg = h["load_vocab"](str(bad), VOCAB)
    assert text == VOCAB and "mine.txt line 3" in msg and "no sentence" in msg
    (tmp_path / "latin1.txt").write_bytes("caf\xe9: un sourire".encode("latin-1"))
    text, msg = h["load_vocab"](str(tmp_path / "latin1.txt"), VOCAB)
    assert text == VOCAB and "not UTF-8" in msg
    assert "choose a text file" in h["load_vocab"](None, VOCAB)[1]
    (tmp_path / "many.txt").write_text("".join(f"e{i}: sentence number {i}\n" for i in range(201)))
    text, msg = h["load_vocab"](str(tmp_path / "many.txt"), VOCAB)              # refused when loaded, as ranked
    assert text == VOCAB and msg == "many.txt has 201 expressions; at most 200 are ranked at once"
    (tmp_path / "long.txt").write_text("calm: a calm face\nwordy: " + "a smile " * 80 + "\n")
    text, msg = h["load_vocab"](str(tmp_path / "long.txt"), VOCAB)
    assert text == VOCAB and "the sentence of `wordy` is 639 characters long; at most 500" in msg
    assert "at most 500" in h["rank"](None, "wordy: " + "a smile " * 80, True)[-1]
    assert h["save_vocab"]("   ") == (None, "the expression list is empty: one `name: sentence` per line")
    path, msg = h["save_vocab"]("happy: a smile\nHappy: a grin")
    assert path is None and "line 2" in msg and "already used" in msg


# ----------------------------------------------------------------------------- 2. faces in a photo

def test_rank_faces_largest_first_capped_and_numbered(engine, h, tmp_path):
    photo = _two_faces(tmp_path / "two.png")
    res = rank_faces(engine, Image.open(photo).convert("RGB"), [s for _, s in parse_vocab(VOCAB)], max_faces=5)
    assert res.found and not res.more and len(res.boxes) == 2 and res.probs.shape == (2, 3)
    assert res.boxes[0].area > res.boxes[1].area and res.boxes[0].x0 < 200          # the 180 px face is #1
    assert np.allclose(res.probs.sum(1), 1)
    boxed, bars, md = h["rank"](photo, VOCAB, True)
    assert boxed.size == (640, 360) and set(bars) == {"happy", "sad", "surprised"}
    assert "| face 1 |" in md and "| face 2 |" in md and "2 face(s) found" in md
    assert bars == pytest.approx({n: float(p) for n, p in zip(["happy", "sad", "surprised"], res.probs[0])})
    _, _, md = demo.make_handlers(engine, max_faces=1)["rank"](photo, VOCAB, True)
    assert "| face 1 |" in md and "| face 2 |" not in md and "More than 1 faces: showing the 1 largest" in md


def test_rank_says_when_no_face_is_found(h, tmp_path):
    blank = tmp_path / "wall.png"
    Image.new("RGB", (320, 240), (200, 190, 180)).save(blank)
    img, bars, md = h["rank"](str(blank), VOCAB, True)
    assert "No face found: ranked the whole image" in md and len(bars) == 3
    assert "| whole image (no face) |" in md and "| face 1 |" not in md and "not a face" in md
    _, _, md = h["rank"](str(blank), VOCAB, False)
    assert "No face found" not in md


def test_rank_with_detection_off_names_the_row_the_whole_image_not_face_1(h, tmp_path):
    _, bars, md = h["rank"](_two_faces(tmp_path / "two.png"), VOCAB, False)
    assert "| whole image (detection off) |" in md and "| face 1 |" not in md and "face(s) found" not in md
    assert "Detection off: the whole image was ranked" in md and len(bars) == 3


def test_a_face_crop_sized_upload_is_read_whole_not_searched_for_faces(engine, h, sample_dir, tmp_path):
    face = _sample_faces(sample_dir, 1)[0]                          # the tests' sample: 48 px, <= CROP_MAX_SIDE
    _, bars, md = h["rank"](face, VOCAB, True)
    _, whole, _ = h["rank"](face, VOCAB, False)
    assert "Read as a face crop: the image is 48x48 px" in md and "| face crop |" in md and "No face found" not in md
    assert bars == pytest.approx(whole)                                     # the same pixels, scored whole
    big = tmp_path / "big.png"                                              # one pixel over: searched, none found
    Image.open(face).resize((faces.CROP_MAX_SIDE + 1, faces.CROP_MAX_SIDE + 1)).save(big)
    assert "Read as a face crop" not in h["rank"](str(big), VOCAB, True)[2]


def _captions(engine, hits) -> list[str]:
    return [item[1] for item in result_items(engine, hits)]


def test_similar_faces_say_what_the_query_was(engine, h, sample_dir, tmp_path):
    wall = tmp_path / "wall.png"
    Image.new("RGB", (320, 240), (200, 190, 180)).save(wall)
    assert "the whole upload (no face found)" in h["similar"](str(wall), 3, True)[1]
    assert "the whole upload (detection off)" in h["similar"](str(wall), 3, False)[1]
    face = _sample_faces(sample_dir, 1)[0]
    hits, msg = h["similar"](face, 3, True)
    assert "the upload (a face crop)" in msg
    assert [c for _, c in hits] == _captions(engine, similar_images(engine, Image.open(face).convert("RGB"), 3))
    assert "closest expression" in h["similar"](face, 3)[1]                 # API callers of (image, k) still work


def test_similar_faces_are_queried_with_the_uploads_largest_face(engine, h, tmp_path):
    photo = _two_faces(tmp_path / "two.png")
    im = Image.open(photo).convert("RGB")
    face, how = largest_face(im, True, engine.cfg.grayscale)
    assert how == "face" and max(face.size) < 300                           # the 180 px face, not the 640 px photo
    hits, msg = h["similar"](photo, 3, True)
    assert "the largest face in the upload" in msg
    assert [c for _, c in hits] == _captions(engine, similar_images(engine, face, 3))
    assert [c for _, c in h["similar"](photo, 3, False)[0]] == _captions(engine, similar_images(engine, im, 3))


def test_max_faces_flag_is_checked(tmp_path, capsys):
    assert run_cli(demo.main, ["--max-faces", "0", "--checkpoint", str(tmp_path / "none.pth")]) == 2
    assert "--max-faces" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 3. similar faces from a click

def test_similar_from_gallery_click_puts_the_query_first(engine, h):
    hits = search_text(engine, "a wide smile", k=6)
    paths = [str(p) for p, _ in hits]
    sim = similar_to_gallery_image(engine, paths[2], k=4)
    assert len(sim) == 4 and str(sim[0][0]) == paths[2] and sim[0][1] == pytest.approx(1.0, abs=5e-3)
    assert len({str(p) for p, _ in sim}) == 4 and all(a[1] >= b[1] for a, b in zip(sim[1:], sim[2:]))
    items, msg = h["similar_gallery"](paths, 2, 4)
    assert items[0][0] == paths[2] and len(items) == 4 and "itself first" in msg
    assert h["similar_gallery"]([], 0, 4) == ([], "search first, then click one of the results")
    assert h["similar_gallery"](paths, 99, 4)[0] == []


def test_gallery_select_event_reaches_the_handler(engine):
    """The Blocks wiring: Gradio must see the gr.SelectData parameter and pass the clicked index."""
    import gradio as gr
    from gradio.helpers import special_args
    app = demo.build_app(engine)
    search = next(f.fn for f in app.fns.values() if f.api_name == "search")
    items, paths, msg = search("a wide smile", 5)
    assert len(paths) == 5 and paths == [p for p, _ in items]
    pick = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "pick")
    click = gr.SelectData(None, {"index": 1, "value": None})
    args, _, event_index, _ = special_args(pick, [paths, 3], event_data=click)
    assert event_index == 2 and not (Path(demo.__file__).parent / "demo.pyi").exists()
    shown, items, msg = pick(*args)
    assert items[0][0] == paths[1] and len(items) == 3 and shown is not None


# ----------------------------------------------------------------------------- 4. sequence mode

def _video(path: Path, n: int = 50) -> Path:
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(n):
        out.write(np.full((48, 64, 3), i * 5, np.uint8))                 # frame i has brightness 5 i
    out.release()
    return path


def test_video_frames_sampled_evenly(tmp_path):
    frames = read_video(_video(tmp_path / "clip.avi"), max_frames=8)
    want = np.linspace(0, 49, 8).round() * 5                             # frames 0, 7, 14, ..., 49
    assert len(frames) == 8 and frames[0].size == (64, 48) and frames[0].mode == "RGB"
    assert np.allclose([np.asarray(f).mean() for f in frames], want, atol=4)
    assert len(read_video(tmp_path / "clip.avi", max_frames=100)) == 50


def test_a_photo_named_like_a_video_is_told_to_be_renamed(tmp_path):
    Image.new("RGB", (64, 48), (90, 90, 90)).save(tmp_path / "holiday.avi", format="JPEG")
    with pytest.raises(UserError, match=r"holiday.avi: a JPEG image, not a video; rename it .jpeg"):
        read_video(tmp_path / "holiday.avi")
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match=r"junk.mp4: not a video OpenCV can read \(use MP4"):
        read_video(tmp_path / "junk.mp4")


def test_a_video_named_like_an_image_is_told_to_be_renamed(h, tmp_path):
    (tmp_path / "video.jpg").write_bytes(_video(tmp_path / "clip.avi").read_bytes())
    _, _, msg = h["sequence"]([str(tmp_path / "video.jpg"), str(tmp_path / "clip.avi")], VOCAB, False, 0.5)
    assert "video.jpg: a video (AVI), not an image; rename it .avi to score it as a video" in msg, msg


def test_load_frames_orders_by_name_caps_and_reports_bad_files(tmp_path):
    for i in (10, 2, 1):
        Image.new("L", (40, 40), i * 20).save(tmp_path / f"frame{i}.png")
    (tmp_path / "notes.png").write_text("not an image")
    frames, skipped = load_frames([tmp_path / n for n in ("frame10.png", "notes.png", "frame2.png", "frame1.png")])
    assert [np.asarray(f)[0, 0, 0] for f in frames] == [20, 40, 200]   # frame1, frame2, frame10
    assert len(skipped) == 1 and skipped[0].startswith("notes.png: not an image")
    frames, _ = load_frames([_video(tmp_path / "v.avi"), tmp_path / "frame1.png"], max_frames=4)
    assert len(frames) == 4
    with pytest.raises(Exception, match="no readable frame"):
        load_frames([tmp_path / "notes.png"])


def test_score_frames_matches_single_image_ranking(engine, sample_dir):
    images = [Image.open(p).convert("RGB") for p in _sample_faces(sample_dir, 3)]
    sentences = [s for _, s in parse_vocab(VOCAB)]
    scores = score_frames(engine, images, sentences)
    assert scores.shape == (3, 3) and np.allclose(scores.sum(1), 1)
    single = {s: p for s, p, _ in rank_expressions(engine, images[1], sentences)}
    assert np.allclose(scores[1], [single[s] for s in sentences], atol=1e-5)
    crops, found, _, _, away = frame_crops(images, detect=False)
    assert crops == images and found == away == [False] * 3


def test_sequence_handler_label_plot_and_message(engine, h, sample_dir, tmp_path):
    files = _sample_faces(sample_dir, 4) + [str(tmp_path / "broken.png")]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    bars, fig, msg = h["sequence"](files, VOCAB, False, 0.5)
    frames, _ = load_frames(files[:4])
    want, w = sequence_scores(score_frames(engine, frames, [s for _, s in parse_vocab(VOCAB)]), 0.5)
    assert bars == pytest.approx(dict(zip(["happy", "sad", "surprised"], want)))
    assert fig is not None and len(fig.axes[0].lines) == 3
    assert "**4 frames**" in msg and "Skipped 1 file(s): broken.png" in msg and f"{w[-1]:.0%}" in msg
    assert fig.axes[0].get_xlabel() == "frame"                        # stills: numbered
    fig = h["sequence"]([str(_video(tmp_path / "clip.avi"))], VOCAB, False, 0.5)[1]
    assert fig.axes[0].get_xlabel() == "time (s)" and fig.axes[0].lines[0].get_xdata()[-1] == pytest.approx(4.9)
    for i in (1, 2):
        Image.new("L", (320, 240), 100 * i).save(tmp_path / f"blank{i}.png")
    _, _, msg = h["sequence"]([str(tmp_path / "blank1.png"), str(tmp_path / "blank2.png")], VOCAB, True, 1.0)
    assert "**2 frames**" in msg and "No face found in frame(s) 1, 2" in msg
    _, _, msg = h["sequence"](files[:2], VOCAB, True, 1.0)             # small sample faces: crops, read whole
    assert "**2 frames**" in msg and "No face found" not in msg
    bars, fig, msg = h["sequence"]([], VOCAB, True, 0.5)
    assert bars == {} and fig is None and "upload several images" in msg
    assert "decay" in h["sequence"](files[:2], VOCAB, False, 2.0)[2]


# ----------------------------------------------------------------------------- 5. bad requests

def test_every_handler_answers_garbage_with_a_message(engine, h, sample_dir, tmp_path):
    face = str(search_text(engine, "a wide smile", k=1)[0][0])                  # a gallery image (clickable)
    (tmp_path / "list.txt").write_text(VOCAB)
    (tmp_path / "notes.txt").write_text("hello")
    good = dict(search=("a wide smile", 3), rank=(face, VOCAB, False), similar=(face, 3),
                similar_gallery=([face], 0, 3), sequence=([face], VOCAB, False, 0.5), save_vocab=(VOCAB,),
                load_vocab=(str(tmp_path / "list.txt"), VOCAB), preset=("paper", VOCAB), pick=([face], 0, 3),
                add_photos=(str(tmp_path / "notes.txt"),))      # not an image: the shared gallery stays as it is
    assert set(good) == set(h)                               # a new handler must be added here
    garbage = [None, "", str(tmp_path / "notes.txt"), "x" * 1_000_000, float("nan"), ["a", None], {"path": 1}]
    for name, args in good.items():
        want = len(h[name](*args))
        requests = [(g,) * len(args) for g in garbage]
        requests += [args[:i] + (g,) + args[i + 1:] for i in range(len(args)) for g in garbage]
        for bad in requests:
            out = h[name](*bad)                               # never raises
            assert isinstance(out, tuple) and len(out) == want, (name, bad[:1])
            assert isinstance(out[-1], str) and out[-1].strip() and len(out[-1]) < 2000, (name, out[-1][:200])
            assert "could not handle this request" not in out[-1], (name, out[-1])    # every case is foreseen


def test_numpy_images_from_python_float_and_16_bit_are_read_like_8_bit(h, sample_dir):
    face = np.asarray(Image.open(_sample_faces(sample_dir, 1)[0]).convert("RGB"))
    want = h["rank"](face, VOCAB, False)[1]
    for a in (face / 255.0, face.astype(np.float32) / 255, face.astype(np.uint16) * 257):
        _, bars, md = h["rank"](a, VOCAB, False)
        assert bars == pytest.approx(want, abs=0.02), (a.dtype, md)
    items, msg = h["similar"](face / 255.0, 3)
    assert len(items) == 3 and "closest expression" in msg
    assert "shape (3,)" in h["rank"](np.zeros(3), VOCAB, False)[-1]
    assert "complex128 values" in h["similar"](face.astype(complex), 3)[-1]
    assert h["similar"](None, 3)[-1] == "upload a face image first"


def test_an_add_request_whose_every_file_is_unreadable_leaves_no_folder_behind(engine, h, tmp_path):
    (tmp_path / "fake.png").write_bytes(b"not a png")
    before = set(engine.upload_dir.iterdir()) if engine.upload_dir.is_dir() else set()
    (msg,) = h["add_photos"]([str(tmp_path / "fake.png")])
    assert msg.startswith("Added 0 photo(s)") and "skipped (unreadable): fake.png" in msg
    assert set(engine.upload_dir.iterdir()) == before


def test_the_add_reply_counts_only_the_faces_of_this_requests_files(engine, h, sample_dir, tmp_path):
    face, other = _sample_faces(sample_dir, 2)
    mine = Image.open(face).convert("RGB")
    mine.putpixel((0, 0), (1, 2, 3))                   # a photo of its own (not already added by another test)
    mine.save(tmp_path / "mine.png")
    (msg,) = h["add_photos"]([str(tmp_path / "mine.png")])
    assert msg.startswith("Added 1 photo(s) (1 faces found)"), msg
    saved = max(engine.upload_dir.rglob("mine*.png"), key=lambda p: p.stat().st_mtime_ns)
    shutil.copyfile(other, saved)                      # changed since: re-indexed by the next request's reindex
    (tmp_path / "fake.png").write_bytes(b"not a png")
    (msg,) = h["add_photos"]([str(tmp_path / "fake.png")])
    assert msg.startswith("Added 0 photo(s) (0 faces found)"), msg


def test_unreadable_added_files_are_logged_under_the_names_the_user_sent(h, tmp_path, capsys):
    for folder, data in (("a", b"not a jpeg"), ("b", b"nor this one")):        # two uploads named the same
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "same.jpg").write_bytes(data)
    capsys.readouterr()
    (msg,) = h["add_photos"]([str(tmp_path / "a" / "same.jpg"), str(tmp_path / "b" / "same.jpg")])
    log = [ln for ln in capsys.readouterr().out.splitlines() if "add_photos request" in ln]
    assert "skipped (unreadable): same.jpg (1st file):" in msg and "skipped (unreadable): same.jpg (2nd file):" in msg
    assert "same-1" not in msg and len(log) == 1 and "same.jpg (2nd file)" in log[0], (msg, log)


def test_a_photo_added_twice_is_indexed_once(engine, h, sample_dir, tmp_path):
    mine = Image.open(_sample_faces(sample_dir, 1)[0]).convert("RGB")
    mine.putpixel((0, 0), (4, 5, 6))                   # a photo no other test adds
    mine.save(tmp_path / "twice.png")
    (msg,) = h["add_photos"]([str(tmp_path / "twice.png")] * 2)            # a double click's two files
    assert msg.startswith("Added 1 photo(s)") and "skipped: twice.png (2nd file): already in the gallery" in msg
    faces = len(engine.index)
    (msg,) = h["add_photos"]([str(tmp_path / "twice.png")])                # the same photo again, later
    assert msg.startswith("Added 0 photo(s)") and "skipped: twice.png: already in the gallery" in msg, msg
    assert len(engine.index) == faces


def test_images_too_small_for_a_face_and_invisible_queries_are_refused(h, sample_dir, tmp_path):
    Image.new("L", (1, 1), 128).save(tmp_path / "dot.png")
    Image.new("L", (600, 8), 128).save(tmp_path / "strip.png")
    dot, strip = str(tmp_path / "dot.png"), str(tmp_path / "strip.png")
    assert "dot.png: 1x1 px is too small to read a face" in h["rank"](dot, VOCAB, True)[-1]
    assert "strip.png: 600x8 px is too small to read a face" in h["similar"](strip, 3)[-1]
    bars, _, msg = h["sequence"]([dot] + _sample_faces(sample_dir, 2), VOCAB, True, 0.5)
    assert "**2 frames**" in msg and "Skipped 1 file(s): dot.png: 1x1 px is too small" in msg and bars
    for query in ("\u200b\u202e", "\x00\x00", " \u2060 "):
        assert "type a description" in h["search"](query, 3)[-1], repr(query)
    items, _, msg = h["search"]("a wide\x00smile", 3)
    assert len(items) == 3 and "\x00" not in msg


def test_api_values_a_page_cannot_send_are_refused_not_guessed(h, sample_dir):
    face = _sample_faces(sample_dir, 1)[0]
    assert "Top K must be a whole number from 1 to 100 (got 2.5)" in h["search"]("a smile", 2.5)[-1]
    assert len(h["search"]("a smile", 3.0)[0]) == 3
    assert "Detect faces must be true or false (got 'no')" in h["rank"](face, VOCAB, "no")[-1]
    assert h["rank"](face, VOCAB, "false")[-1] == h["rank"](face, VOCAB, False)[-1]


def test_error_messages_name_the_uploaded_file_not_the_server_folder(h, tmp_path, monkeypatch):
    uploads = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    folder = uploads / "3f2a9c0e1b77d0c4"                                    # Gradio: <temp>/<hash>/<user's name>
    folder.mkdir(parents=True)
    (folder / "holiday notes.txt").write_text("hello")
    (folder / "my list.txt").write_text("happy: a smile\nsad:\n")
    (folder / "clip.mp4").write_bytes(b"not a video")
    notes, vocab, clip = (str(folder / n) for n in ("holiday notes.txt", "my list.txt", "clip.mp4"))
    answers = [("holiday notes.txt: not an image", h["rank"](notes, VOCAB, True)[-1]),
               ("holiday notes.txt: not an image", h["similar"](notes, 3)[-1]),
               ("my list.txt line 2: no sentence", h["load_vocab"](vocab, VOCAB)[-1]),
               ("no readable frame: clip.mp4: ", h["sequence"]([clip, notes], VOCAB, False, 0.5)[-1])]
    for want, msg in answers:
        assert want in msg and str(tmp_path) not in msg and "3f2a9c0e1b77d0c4" not in msg, msg
    assert "holiday notes.txt: not an image" in answers[-1][1]
    library_error = f"cannot identify image file '{folder / 'face 1.png'}'"      # a path not among the arguments
    assert public_message(library_error) == "cannot identify image file 'face 1.png'"


# ----------------------------------------------------------------------------- 6. the real server under load

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_keeps_serving_20_concurrent_requests(engine, sample_dir, tmp_path):
    from gradio_client import Client, handle_file
    face = _sample_faces(sample_dir, 1)[0]
    (tmp_path / "notes.txt").write_text("hello")
    bomb = tmp_path / "bomb.png"
    Image.new("L", (8000, 6000)).save(bomb)                               # 48 MP: over the 40 MP limit
    app = demo.build_app(engine).queue(default_concurrency_limit=4, max_size=64)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, max_file_size="20mb")
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        good = [("search", ("a wide smile", 5))] * 10 + [
            ("rank", (handle_file(face), VOCAB, True)), ("similar", (handle_file(face), 3)),
            ("sequence", ([handle_file(face)] * 3, VOCAB, False, 0.5))]
        bad = [("search", ("", 5), "type a description"), ("search", ("   ", 5), "type a description"),
               ("rank", (handle_file(str(tmp_path / "notes.txt")), VOCAB, True), "not an image"),
               ("rank", (handle_file(str(bomb)), VOCAB, True), "pixel limit"),
               ("similar", (handle_file(str(bomb)), 3), "pixel limit"),
               ("rank", (handle_file(face), "", True), "empty"),
               ("sequence", ([handle_file(str(tmp_path / "notes.txt"))], VOCAB, True, 0.5), "no readable frame")]
        calls = [(name, args) for name, args in good] + [(name, args) for name, args, _ in bad]
        assert len(calls) == 20
        t0 = time.time()
        with ThreadPoolExecutor(len(calls)) as pool:
            results = list(pool.map(lambda c: client.predict(*c[1], api_name="/" + c[0]), calls))
        elapsed = time.time() - t0
        for (name, args), out in zip(good, results[:len(good)]):
            if name in ("search", "similar"):
                assert len(out[0]) == args[1] and ("best matches" in out[1] or "closest" in out[1]), (name, out)
            else:
                rows = ("| face 1 |", "| whole image (no face) |", "| face crop |")
                label, texts = (out[1], rows) if name == "rank" \
                    else (out[0], ("frames",))
                assert label["label"] in {"happy", "sad", "surprised"} and any(t in out[2] for t in texts), (name, out)
        for (name, _, expect), out in zip(bad, results[len(good):]):
            assert expect in out[-1] and tempfile.gettempdir() not in out[-1], (name, out[-1])   # no server paths
        gallery, msg = client.predict("a frown", 4, api_name="/search")       # still serving afterwards
        assert len(gallery) == 4 and "best matches" in msg
        print(f"20 concurrent requests answered in {elapsed:.1f} s")
    finally:
        app.close()


# ----------------------------------------------------------------------------- 7. prepare.py --detect-faces

def _photos(root: Path) -> Path:
    (root / "happy").mkdir(parents=True)
    canvas = Image.new("RGB", (420, 300), (128, 128, 128))
    canvas.paste(_fer(BIG, 180).convert("RGB"), (60, 50))
    canvas.save(root / "happy" / "party.png")
    Image.new("RGB", (300, 300), (200, 200, 200)).save(root / "happy" / "blank.png")
    return root


def test_prepare_detect_faces_crops_and_counts_no_face(tmp_path, capsys):
    src = _photos(tmp_path / "photos")
    out = tmp_path / "data"
    assert run_cli(prepare.main, [str(src), "--format", "folder", "--out", str(out), "--detect-faces",
                                  "--grayscale"]) == 0
    report = capsys.readouterr().out
    assert "skipped 1: no face found (--no-face skip)" in report and "face detected and cropped: 1" in report
    table = prepare.pd.read_csv(out / "captions.csv")
    assert table["image"].tolist() == ["images/photos/happy/party.png"]
    crop = Image.open(out / table["image"][0])
    assert crop.mode == "L" and crop.width == crop.height and 150 <= crop.width <= 300    # aligned (MTCNN) or square
    assert np.asarray(crop).std() > 20                                     # a face, not the flat background

    kept = prepare.convert(src, "folder", tmp_path / "kept", detect_faces=True, no_face="keep")
    assert sorted(kept["image"]) == ["images/photos/happy/blank.png", "images/photos/happy/party.png"]
    assert kept.attrs["report"]["converted"] == {"face detected and cropped": 1,
                                                 "no face found, kept whole (--no-face keep)": 1}
    assert Image.open(tmp_path / "kept" / "images/photos/happy/blank.png").size == (300, 300)
    assert Image.open(tmp_path / "kept" / "images/photos/happy/party.png").mode == "RGB"
    assert run_cli(prepare.main, [str(src), "--format", "folder", "--out", str(out), "--grayscale"]) == 2
    assert "--grayscale goes with --detect-faces" in capsys.readouterr().err


def test_sequence_follows_the_person_seen_most_when_another_face_is_larger(monkeypatch):
    """frame_crops keeps to one person (sequence.track_faces): the one in most frames (here a tie, so the one seen
    first: the left face), even in frames where the right face is the largest; a frame without them is marked away
    (its crop: the largest face)."""
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)) for _ in range(4)]
    left_big, left_small = faces.Box(20, 60, 120, 160, 0.99), faces.Box(30, 70, 110, 150, 0.98)
    right_big, right_small = faces.Box(190, 60, 290, 160, 0.99), faces.Box(200, 70, 280, 150, 0.98)
    listed = {0: [left_big, right_small], 1: [right_big, left_small], 2: [left_small], 3: [right_big]}
    monkeypatch.setattr(faces, "detect_faces", lambda image, max_faces=10, min_size_frac=0.05, detector="auto":
                        listed[next(i for i, f in enumerate(frames) if f is image)])
    crops, found, people, followed, away = frame_crops(frames, detect=True)
    want = [left_big, left_small, left_small, right_big]
    assert found == [True] * 4 and (people, followed) == (2, 3) and away == [False, False, False, True]
    for crop, frame, box in zip(crops, frames, want):
        assert np.array_equal(np.asarray(crop), np.asarray(faces.crop_face(frame, box, faces.FACE_MARGIN)))


def test_sequence_page_says_how_many_people_were_in_view_and_whom_it_followed(h, tmp_path, monkeypatch):
    files = []
    for i in range(3):
        Image.new("RGB", (320, 240), (60 + 40 * i,) * 3).save(tmp_path / f"frame{i}.png")
        files.append(str(tmp_path / f"frame{i}.png"))
    two = [faces.Box(20, 60, 120, 160, 0.99), faces.Box(190, 60, 290, 160, 0.99)]
    monkeypatch.setattr(faces, "detect_faces", lambda image, max_faces=10, min_size_frac=0.05, detector="auto":
                        two if np.asarray(image).mean() < 120 else two[1:])
    _, _, msg = h["sequence"](files, VOCAB, True, 1.0)
    assert "**3 frames**" in msg and "2 people in view: followed the one in the most frames (3 of 3)" in msg
    monkeypatch.setattr(faces, "detect_faces", lambda image, max_faces=10, min_size_frac=0.05, detector="auto":
                        two[1:])
    assert "people in view" not in h["sequence"](files, VOCAB, True, 1.0)[2]


def test_sequence_leaves_out_frames_without_the_followed_person_and_names_them_by_time(engine, h, tmp_path,
                                                                                     monkeypatch):
    path = tmp_path / "talk.avi"
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    for i in range(4):
        out.write(np.full((240, 320, 3), 40 + 40 * i, np.uint8))          # frame i: brightness 40 (i + 1)
    out.release()
    left, right = faces.Box(20, 60, 120, 160, 0.99), faces.Box(190, 60, 290, 160, 0.99)
    shown = {1: [left, right], 2: [right], 3: [left], 4: []}             # frame 2: only the other person
    monkeypatch.setattr(faces, "detect_faces", lambda image, max_faces=10, min_size_frac=0.05, detector="auto":
                        shown[round(np.asarray(image).mean() / 40)])
    bars, fig, msg = h["sequence"]([str(path)], VOCAB, True, 1.0)
    assert "**3 frames**" in msg and "Frame(s) at 0.10 s: the followed person not in view, left out." in msg
    assert "No face found in frame(s) at 0.30 s: the whole frame was scored." in msg
    assert list(fig.axes[0].lines[0].get_xdata()) == [0.0, 0.2, 0.3]


def test_a_video_uploaded_as_a_photo_is_sent_to_the_sequence_tab(h, tmp_path):
    _video(tmp_path / "clip.avi", 3)
    assert "clip.avi: a video, not a photo; score videos in the Sequence tab" in h["rank"](
        str(tmp_path / "clip.avi"), VOCAB, True)[2]
    (tmp_path / "clip.jpg").write_bytes((tmp_path / "clip.avi").read_bytes())      # by its bytes, not its name
    assert "clip.jpg: a video, not a photo" in h["rank"](str(tmp_path / "clip.jpg"), VOCAB, True)[2]


def test_a_video_cut_short_is_said_on_the_page(h, tmp_path):
    data = _video(tmp_path / "full.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[:len(data) // 2])
    msg = h["sequence"]([str(tmp_path / "cut.avi")], VOCAB, False, 0.5)[2]
    assert "**8 frames**" in msg and "cut.avi: the video ends at frame " in msg and "of the 50 its header" in msg
