"""One image-embedding path: evaluate, the gallery index and the demo engine embed the same file to the same vector,
through the preprocessing the checkpoint hands back (create_model_and_transforms); logging is set up in one place."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from checkpoint import create_model_and_transforms
from dataset import PairDataset, build_vocabs
from embed import embed_images, embed_texts, text_prototypes
from logs import get_logger, setup_logging
from retrieval import Engine
from utils import UserError


@pytest.fixture(scope="module")
def loaded(trained):
    return create_model_and_transforms(trained[0])


@pytest.fixture(scope="module")
def files(sample_dir):
    return sorted((sample_dir / "images").glob("*.png"))[:6]


def test_a_file_and_its_pil_image_embed_the_same_through_every_caller(trained, loaded, files, tmp_path):
    model, _, preprocess = loaded
    by_path, ok = embed_images(model, files, preprocess, batch_size=4)              # evaluate.py's call
    flipped, _ = embed_images(model, files, preprocess, batch_size=4, tta=True)     # evaluate.py --tta flip
    pil = [Image.open(p).convert("RGB") for p in files]
    by_pil, _ = embed_images(model, pil, preprocess, batch_size=4)
    engine = Engine.load(trained[0], files[0].parent, "cpu", tmp_path / "cache", progress=False)
    by_engine = engine.embed_images(pil)                                              # the demo's uploads (flip)
    scores, hits = engine.index.search(flipped[:1], k=1)                              # the cached gallery (flip)
    plain = Engine.load(trained[0], files[0].parent, "cpu", tmp_path / "cache", progress=False, tta=False)
    assert ok.all() and by_path.shape == (6, model.embed_dim)
    np.testing.assert_allclose(by_pil, by_path, atol=1e-6)
    np.testing.assert_allclose(by_engine, flipped, atol=1e-6)
    np.testing.assert_allclose(plain.embed_images(pil), by_path, atol=1e-6)
    assert np.abs(flipped - by_path).max() > 1e-3                                    # the mirror really counts
    assert hits[0][0].name == files[0].name and scores[0][0] == pytest.approx(1, abs=2e-3)   # float16 storage
    scores, hits = plain.index.search(by_path[:1], k=1)                               # its own cache, not flip's
    assert hits[0][0].name == files[0].name and scores[0][0] == pytest.approx(1, abs=2e-3)


def test_undecodable_files_are_flagged_and_the_rest_keep_their_order(loaded, files, tmp_path):
    model, _, preprocess = loaded
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    emb, ok = embed_images(model, [files[0], bad, files[1]], preprocess, batch_size=2)
    ref, _ = embed_images(model, files[:2], preprocess)
    assert ok.tolist() == [True, False, True] and emb.shape[0] == 2
    np.testing.assert_allclose(emb, ref, atol=1e-6)
    assert embed_images(model, [], preprocess)[0].shape == (0, model.embed_dim)


def test_eval_preprocessing_is_what_validation_trains_against(loaded, files):
    """The transform a checkpoint hands back equals the one train.py's validation dataset applies."""
    model, train_pre, preprocess = loaded
    df = pd.DataFrame(dict(path=[str(p) for p in files], caption="x", label="happiness"))
    ds = PairDataset(df, model.cfg, False, *build_vocabs(df, None))
    assert torch.equal(ds[0][0], preprocess(files[0]))
    assert train_pre(files[0]).shape == preprocess(files[0]).shape


def test_class_prototypes_average_each_class_sentences(loaded):
    model, _, _ = loaded
    bank = {"happiness": ["a wide smile", "a grin"], "sadness": ["a frown"]}
    protos = text_prototypes(model, bank, ["sadness", "happiness"])                  # [2, D], in the asked order
    txt = embed_texts(model, ["a frown", "a wide smile", "a grin"])
    mean = txt[1:].mean(0) / np.linalg.norm(txt[1:].mean(0))
    np.testing.assert_allclose(protos[0], txt[0], atol=1e-6)
    np.testing.assert_allclose(protos[1], mean, atol=1e-6)
    with pytest.raises(UserError, match="no sentence for class"):
        text_prototypes(model, bank, ["fear"])


def test_logging_is_rank_aware_and_splits_info_from_warnings(capsys):
    log = get_logger("test")
    setup_logging("info", rank=0)
    log.info("an info line")
    log.warning("a warning line")
    out, err = capsys.readouterr()
    assert out == "an info line\n" and err == "a warning line\n"
    setup_logging("info", rank=1)                     # torchrun rank 1: warnings only
    log.info("hidden")
    log.warning("shown")
    out, err = capsys.readouterr()
    assert out == "" and err == "shown\n"
    setup_logging("warning", rank=0)
    log.info("hidden too")
    assert capsys.readouterr().out == ""
    setup_logging()
    assert len(logging.getLogger("exprclip").handlers) == 1                  # set up again, never stacked


def test_embeddings_are_unit_vectors_under_bf16_autocast(loaded, files):
    """bf16 autocast normalises in bf16 (norms 0.997-1.001 on the bundled model): embed.py renormalises in fp32, so
    the demo's, index's and predict.py's cosines are the ones evaluate.py's prototypes give."""
    model, _, preprocess = loaded
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)                      # noqa: E731
    texts = embed_texts(model, ["a wide smile", "a frown with narrowed eyes", "wide open eyes and a gasp"], bf16)
    images, _ = embed_images(model, files, preprocess, batch_size=4, autocast=bf16)
    for e in (texts, images):
        assert e.dtype == np.float32 and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
