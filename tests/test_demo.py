"""Retrieval functions (no Gradio), the gallery cache, the demo's handlers and the Blocks app."""
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

import demo
from dataset import load_image_tensor
from index import list_images
from retrieval import Engine, clean_query, rank_expressions, search_text, similar_images
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
    with torch.no_grad():
        img = engine.model.encode_image(torch.stack([load_image_tensor(p, engine.cfg) for p in paths])).numpy()
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


def test_empty_query_is_a_message_not_a_search(engine):
    with pytest.raises(UserError, match="type a description"):
        clean_query("   ")
    gallery, msg = demo.make_handlers(engine)["search"]("", 5)
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
    assert set(bars) == {"happy", "sad"} and "face 1" in msg


def test_blocks_app_builds(engine):
    import gradio as gr
    assert isinstance(demo.build_app(engine), gr.Blocks)


def test_foreign_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "model_final.pth"
    torch.save({"hello": torch.zeros(1)}, bad)
    assert run_cli(demo.main, ["--checkpoint", str(bad), "--gallery", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not an ExprCLIP checkpoint" in err and "\n" not in err
