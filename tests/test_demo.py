"""Retrieval functions (no Gradio), the gallery cache, the demo's handlers and the Blocks app, and which model
`python demo.py` serves."""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import demo
import webguard
from embed import embed_images
from index import list_images
from photos import describe_update
from retrieval import (Engine, clean_query, largest_face, query_warnings, rank_expressions, rank_faces, search_text,
                       similar_images, similar_to_gallery_image)
from utils import UserError, run_cli

HAPPY = ("An expression of contentment and pleasure, with a smile and the corners of the mouth turned up, often "
         "accompanied by crinkling around the eyes. The face may appear relaxed and at ease")


@pytest.fixture(scope="module")
def engine(trained, sample_dir, tmp_path_factory):
    return Engine.load(trained[0], sample_dir / "images", "cpu", tmp_path_factory.mktemp("cache"), progress=False)


def test_search_equals_brute_force_cosine_ranking(engine, sample_dir):
    hits = search_text(engine, HAPPY, k=10)
    assert len(hits) == 10 and all(a[1] >= b[1] for a, b in zip(hits, hits[1:]))
    paths = list_images(sample_dir / "images")
    img, _ = embed_images(engine.model, paths, engine.preprocess, tta=engine.tta)   # the engine's own (flip) path
    cos = dict(zip([p.name for p in paths], img @ engine.embed_text([HAPPY])[0]))
    true = np.array([cos[p.name] for p, _ in hits])                      # exact cosines of the returned images
    assert np.allclose([s for _, s in hits], true, atol=2e-3)            # float16 storage: near-ties may swap
    assert true.min() >= sorted(cos.values())[-10] - 2e-3                # and they are the 10 best


def test_known_model_ranks_the_described_class_first(engine):
    hits = search_text(engine, HAPPY, k=10)
    assert sum(p.name.startswith("happiness") for p, _ in hits) >= 8
    happy_face = Image.open(hits[0][0])
    ranked = rank_expressions(engine, happy_face, demo.PAPER_SENTENCES)
    assert ranked[0][0] == HAPPY.strip()
    assert sum(p for _, p, _ in ranked) == pytest.approx(1.0)
    similar = similar_images(engine, happy_face, k=3)
    assert similar[0][0] == hits[0][0] and similar[0][1] == pytest.approx(1.0, abs=2e-3)   # itself first


def test_python_api_leaves_out_photos_gone_since_indexing_and_refuses_odd_arguments(trained, sample_dir, tmp_path,
                                                                                    capsys):
    gal = tmp_path / "gal"
    gal.mkdir()
    faces = sorted((sample_dir / "images").glob("*.png"))
    for p in [f for f in faces if f.name.startswith("happiness")][:5] + [f for f in faces if "sad" in f.name][:3]:
        shutil.copy2(p, gal / p.name)
    eng = Engine.load(trained[0], gal, "cpu", tmp_path / "cache", progress=False)
    first, second = [p for p, _ in search_text(eng, HAPPY, k=2)]
    first.unlink()                                                     # deleted, and replaced by another face
    shutil.copy(gal / sorted(p.name for p in gal.iterdir() if p.name.startswith("sadness"))[0], second)
    capsys.readouterr()
    hits = search_text(eng, HAPPY, k=3)
    log = capsys.readouterr().out.splitlines()                         # one line for the search, not one per result
    assert [ln for ln in log if "left out" in ln] == ["left out 2 result(s) whose photo changed since indexing"], log
    assert len(hits) == 3 and first not in [p for p, _ in hits] and second not in [p for p, _ in hits]
    assert all(s <= 1.0 for _, s in similar_to_gallery_image(eng, hits[0][0], k=3))
    with pytest.raises(UserError, match="moved, deleted or replaced"):
        similar_to_gallery_image(eng, second)
    face = np.asarray(Image.open(hits[0][0]))
    for bad, says in ((-1, "k -1: give a whole number >= 1"), (True, "k True")):
        with pytest.raises(UserError, match=says):
            search_text(eng, HAPPY, k=bad)
    with pytest.raises(UserError, match="not one string"):
        rank_expressions(eng, hits[0][0], "a smile")                   # ranked its letters
    with pytest.raises(UserError, match="URLs are not fetched"):
        rank_expressions(eng, "http://example.com/face.png", ["a smile", "a frown"])
    by_array = rank_faces(eng, face, demo.PAPER_SENTENCES).probs        # arrays and paths, as PIL images
    assert np.allclose(by_array, rank_faces(eng, Image.open(hits[0][0]), demo.PAPER_SENTENCES).probs, atol=1e-5)
    assert largest_face(str(hits[0][0]))[1] == "crop"


def test_empty_query_is_a_message_not_a_search(engine):
    with pytest.raises(UserError, match="type a description"):
        clean_query("   ")
    gallery, _, msg = demo.make_handlers(engine)["search"]("", 5)
    assert gallery == [] and "type a description" in msg


def test_relaunch_encodes_nothing_and_changed_files_only(engine, trained, sample_dir, tmp_path):
    import shutil
    gal = tmp_path / "gal"
    shutil.copytree(sample_dir / "images", gal)
    from utils import file_digest
    digest = file_digest(trained[0])
    first = engine.index_gallery(gal, digest, tmp_path / "cache", progress=False)
    again = engine.index_gallery(gal, digest, tmp_path / "cache", progress=False)
    assert first["added"] == len(list_images(gal)) and again["added"] == again["changed"] == 0
    victim = sorted(gal.iterdir())[0]
    Image.open(victim).transpose(Image.FLIP_LEFT_RIGHT).save(victim)
    os.utime(victim, (time.time() + 5, time.time() + 5))
    (gal / "broken.png").write_bytes(b"not an image")
    third = engine.index_gallery(gal, digest, tmp_path / "cache", progress=False)
    assert third["changed"] == 1 and third["added"] == 0 and third["failed"] == 1
    assert [p.name for p in engine.failed] == ["broken.png"]


def test_bad_uploads_get_a_message(engine, tmp_path):
    h = demo.make_handlers(engine)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    img, bars, msg = h["rank"](str(text), "happy: a smile", True)
    assert img is None and bars == {} and msg
    img, bars, msg = h["rank"](None, "happy: a smile", True)
    assert "upload" in msg
    big = tmp_path / "big.png"
    Image.new("L", (8000, 6000)).save(big)
    _, _, msg = h["rank"](str(big), "happy: a smile", True)
    assert "pixel limit" in msg
    _, _, msg = h["rank"](str(big), "", True)
    assert "empty" in msg


def test_rank_handler_whole_image_when_no_face(engine, sample_dir):
    h = demo.make_handlers(engine)
    face = str(sorted((sample_dir / "images").glob("happiness_*.png"))[0])
    img, bars, msg = h["rank"](face, "happy: a smile\nsad: a frown", False)
    assert set(bars) == {"happy", "sad"} and "| whole image (detection off) |" in msg and "face 1" not in msg


def test_blocks_app_builds(engine):
    import gradio as gr
    assert isinstance(demo.build_app(engine), gr.Blocks)


def test_foreign_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "model_final.pth"
    torch.save({"hello": torch.zeros(1)}, bad)
    assert run_cli(demo.main, ["--checkpoint", str(bad), "--gallery", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not an ExprCLIP checkpoint" in err and "\n" not in err


@pytest.fixture(autouse=True)
def any_port(monkeypatch):
    """demo.main called in-process does not check the default port (a server on 7860 must not fail these tests)."""
    monkeypatch.setattr(demo, "check_port_free", lambda host, port: None if port == 7860 else
                        webguard.check_port_free(host, port))


# ----------------------------------------------------------------------------- which model `python demo.py` serves

@pytest.fixture
def launched(monkeypatch):
    """demo.main runs up to launch(); the keyword arguments of each launch are collected instead of serving."""
    import gradio as gr
    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: calls.append(kw))
    return calls


def _gallery(sample_dir, dest, n: int = 12):
    """The first n sample images copied to `dest` (a small gallery: quick to embed)."""
    dest.mkdir()
    for p in sorted((sample_dir / "images").glob("*.png"))[:n]:
        shutil.copy2(p, dest / p.name)
    return dest


def _serve_args(gallery, tmp_path) -> list[str]:
    return ["--gallery", str(gallery), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]


def _models(monkeypatch, root_model, bundled) -> None:
    monkeypatch.setattr(demo, "ROOT_MODEL", root_model)
    monkeypatch.setattr(demo, "BUNDLED_MODEL", bundled)


def test_no_arguments_serves_the_bundled_model(trained, sample_dir, tmp_path, monkeypatch, launched, capsys):
    _models(monkeypatch, tmp_path / "model_final.pth", trained[0])          # no model in the project root
    assert run_cli(demo.main, _serve_args(_gallery(sample_dir, tmp_path / "gal"), tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"{trained[0].name} (the bundled model: no model_final.pth in the project root)" in out
    assert len(launched) == 1 and launched[0]["server_port"] == 7860


def test_sigterm_closes_the_server_like_ctrl_c_and_the_handler_is_put_back(trained, sample_dir, tmp_path,
                                                                          monkeypatch):
    import signal
    import gradio as gr
    seen = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: seen.append(signal.getsignal(signal.SIGTERM)))
    _models(monkeypatch, tmp_path / "model_final.pth", trained[0])
    before = signal.getsignal(signal.SIGTERM)
    assert run_cli(demo.main, _serve_args(_gallery(sample_dir, tmp_path / "gal", n=2), tmp_path)) == 0
    assert seen == [webguard.sigterm_as_ctrl_c] and signal.getsignal(signal.SIGTERM) == before
    with pytest.raises(KeyboardInterrupt):                  # what Gradio's launch() closes the server on
        webguard.sigterm_as_ctrl_c(signal.SIGTERM, None)


def test_gradio_files_of_a_run_are_removed_when_it_closes(trained, sample_dir, tmp_path, monkeypatch):
    import gradio as gr
    from gradio.utils import get_upload_folder
    folders = []

    def serve_then_sigterm(self, **kw):                     # Gradio writes uploads and served copies, then SIGTERM
        folders.append(Path(get_upload_folder()))
        (folders[-1] / "0123abcd").mkdir(parents=True)
        (folders[-1] / "0123abcd" / "face.jpg").write_bytes(b"x")
        # then Ctrl-C or SIGTERM: launch() closes the server and returns

    monkeypatch.setattr(gr.Blocks, "launch", serve_then_sigterm)
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    _models(monkeypatch, tmp_path / "model_final.pth", trained[0])
    assert run_cli(demo.main, _serve_args(_gallery(sample_dir, tmp_path / "gal", n=2), tmp_path)) == 0
    assert folders and folders[0] != Path(tempfile.gettempdir()) / "gradio" and not folders[0].exists()
    assert "GRADIO_TEMP_DIR" not in os.environ
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "mine"))       # a folder the user chose: one run under it
    assert run_cli(demo.main, _serve_args(tmp_path / "gal", tmp_path)) == 0
    assert folders[1].parent == tmp_path / "mine" and list((tmp_path / "mine").iterdir()) == []
    assert os.environ["GRADIO_TEMP_DIR"] == str(tmp_path / "mine")


def test_a_busy_or_impossible_port_is_one_line(trained, sample_dir, tmp_path, monkeypatch, capsys):
    import gradio as gr

    def busy(self, **kw):
        raise OSError(f"Cannot find empty port in range: {kw['server_port']}-{kw['server_port']}. You can ...")

    monkeypatch.setattr(gr.Blocks, "launch", busy)
    _models(monkeypatch, tmp_path / "model_final.pth", trained[0])
    args = _serve_args(_gallery(sample_dir, tmp_path / "gal", n=2), tmp_path)
    assert run_cli(demo.main, args + ["--port", "7861"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --port 7861") and "--port 7862" in err
    assert run_cli(demo.main, args + ["--port", "70000"]) == 2
    assert "1-65535" in capsys.readouterr().err


def test_a_port_already_listened_on_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import socket
    monkeypatch.setattr(demo.Engine, "load", lambda *a, **k: pytest.fail("loaded before the port was checked"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert run_cli(demo.main, ["--port", str(port), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert f"error: --port {port} on 127.0.0.1: in use" in err and f"--port {port + 1}" in err


def test_an_unusable_cache_folder_is_one_line_naming_it(trained, sample_dir, tmp_path, monkeypatch, capsys):
    _models(monkeypatch, tmp_path / "model_final.pth", trained[0])
    args = _serve_args(_gallery(sample_dir, tmp_path / "gal", n=2), tmp_path)
    assert run_cli(demo.main, args + ["--cache-dir", "/proc/no/such/cache"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: /proc/no" in err and err.count("\n") == 1, err


def test_model_final_in_the_project_root_wins_over_the_bundled_one(trained, sample_dir, tmp_path, monkeypatch,
                                                                  launched, capsys):
    root_model = tmp_path / "model_final.pth"
    shutil.copyfile(trained[0], root_model)
    _models(monkeypatch, root_model, trained[0])
    args = _serve_args(_gallery(sample_dir, tmp_path / "gal"), tmp_path)
    assert run_cli(demo.main, args) == 0
    assert f"{root_model.name} (model_final.pth in the project root, which takes precedence" in \
        capsys.readouterr().out
    other = tmp_path / "other.pth"
    shutil.copyfile(trained[0], other)
    assert run_cli(demo.main, ["--checkpoint", str(other)] + args) == 0
    assert f"{other.name} (--checkpoint)" in capsys.readouterr().out and len(launched) == 2


def test_no_model_anywhere_is_one_line_saying_what_to_do(tmp_path, monkeypatch, launched, capsys):
    _models(monkeypatch, tmp_path / "model_final.pth", tmp_path / "models" / "exprclip-ferplus.pth")
    assert run_cli(demo.main, _serve_args(tmp_path, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no model to serve" in err and "exprclip-ferplus.pth" in err
    assert "--checkpoint PATH" in err and demo.TRAIN_COMMAND in err and launched == []


def test_quickstart_is_a_deprecated_alias_and_demo_never_imports_train(trained, sample_dir, tmp_path):
    """In a fresh interpreter (other tests import train): --quickstart prints one line, serves the bundled model."""
    args = _serve_args(_gallery(sample_dir, tmp_path / "gal"), tmp_path)
    code = textwrap.dedent(f"""
        import sys
        import gradio as gr
        gr.Blocks.launch = lambda self, **kw: print("launched")
        import demo
        demo.check_port_free = lambda host, port: None       # a server on 7860 must not fail this test
        demo.ROOT_MODEL = demo.Path({str(tmp_path / "model_final.pth")!r})
        demo.BUNDLED_MODEL = demo.Path({str(trained[0])!r})
        assert demo.main(["--quickstart"] + {args!r}) == 0
        print("train imported:", "train" in sys.modules)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(env, PYTHONPATH=str(demo.ROOT)),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("--quickstart is deprecated") and demo.TRAIN_COMMAND in lines[0]
    assert str(trained[0]) in lines[0] and "the bundled model" in lines[1]
    assert "launched" in lines and "train imported: False" in lines
    assert not (tmp_path / "model_final.pth").exists()                       # nothing was trained


def test_launch_log_says_how_many_images_were_reused_and_encoded(trained, sample_dir, tmp_path, launched, capsys):
    gal = _gallery(sample_dir, tmp_path / "gal")
    args = ["--checkpoint", str(trained[0])] + _serve_args(gal, tmp_path)
    assert run_cli(demo.main, args) == 0
    assert "12 images: 0 reused from the cache, 12 encoded (12 new, 0 changed)" in capsys.readouterr().out
    victim = sorted(gal.iterdir())[0]
    Image.open(victim).transpose(Image.FLIP_LEFT_RIGHT).save(victim)
    os.utime(victim, (time.time() + 5, time.time() + 5))
    shutil.copy2(sorted((sample_dir / "images").glob("*.png"))[20], gal / "new.png")
    (gal / "broken.png").write_bytes(b"not an image")
    assert run_cli(demo.main, args) == 0
    assert "13 images: 11 reused from the cache, 2 encoded (1 new, 1 changed), 1 unreadable" in \
        capsys.readouterr().out
    line = describe_update(dict(added=0, changed=0, unchanged=5, removed=3, failed=0), 5)
    assert line == "5 images: 5 reused from the cache, 0 encoded (0 new, 0 changed), 3 removed"


def test_an_empty_gallery_starts_with_one_warning_saying_how_to_add_photos(trained, tmp_path, launched, capsys):
    (tmp_path / "empty").mkdir()
    args = ["--checkpoint", str(trained[0])] + _serve_args(tmp_path / "empty", tmp_path)
    assert run_cli(demo.main, args) == 0 and len(launched) == 1
    warned = [ln for ln in "".join(capsys.readouterr()).splitlines() if "has no images" in ln]
    assert len(warned) == 1 and "put photos" in warned[0] and "Add photos" in warned[0], warned


# ----------------------------------------------------------------------------- queries the text tower cannot read

def test_foreign_script_queries_get_a_warning(engine):
    tok = engine.model.tokenizer
    for q in ["행복한 얼굴", "一张快乐的脸", "улыбающееся лицо"]:       # Korean becomes jamo, Chinese mostly [UNK]
        notes = query_warnings(tok, q, 32)
        assert len(notes) == 1 and "does not know most of this query" in notes[0], q
    assert query_warnings(tok, "a wide smile", 32) == []
    assert query_warnings(tok, "a 😀 face", 32) == []                  # one unknown piece of three: still readable
    gallery, _, msg = demo.make_handlers(engine)["search"]("행복한 얼굴", 5)
    assert len(gallery) == 5 and "**Warning:**" in msg and "in English" in msg
    gallery, _, msg = demo.make_handlers(engine)["search"]("a wide smile", 5)
    assert len(gallery) == 5 and "Warning" not in msg


def test_long_queries_say_how_many_tokens_were_ignored(engine):
    tok = engine.model.tokenizer
    assert query_warnings(tok, " ".join(["smile"] * 30), 32) == []     # 30 + [CLS] + [SEP] = 32: all read
    notes = query_warnings(tok, " ".join(["smile"] * 40), 32)
    assert len(notes) == 1 and "the last 10 token(s) of this query were ignored" in notes[0]
    huge = "a wide smile " * 1000
    notes = query_warnings(tok, huge, 32)
    assert len(notes) == 1 and f"{len(huge.strip()):,} characters long: only the first 500 were read" in notes[0]
    gallery, _, msg = demo.make_handlers(engine)["search"](huge, 5)
    assert len(gallery) == 5 and "only the first 500 were read" in msg
    assert msg.startswith("5 best matches for “a wide smile a wide") and len(msg) < 1000   # the echo is shortened


def test_a_multilingual_tower_still_says_a_long_query_was_cut():
    from sentence_towers import SentenceTokenizer
    tok = SentenceTokenizer()                                        # reads every script, any number of tokens
    assert query_warnings(tok, "행복한 얼굴", 32) == [] and query_warnings(tok, "smile " * 80, 32) == []
    notes = query_warnings(tok, "a calm neutral face. " * 24 + "actually laughing", 32)
    assert len(notes) == 1 and "characters long: only the first 500 were read" in notes[0]
