"""At launch the demo says which model it serves, what it was trained on and when, and warns about drawn-only models."""
from __future__ import annotations

import torch

from conftest import ROOT


def test_launch_description_names_the_training_data_epoch_and_text_tower(trained):
    from served_model import describe_model
    ckpt, _ = trained
    info, warn = describe_model(ckpt)
    ck = torch.load(ckpt, weights_only=True)
    assert str(ck["config"]["data"]) in info and f"best epoch {ck['epoch']}" in info
    assert "pkg:all-minilm-l6-v2" in info and "file written 20" in info
    assert warn is None


def test_a_model_trained_only_on_the_bundled_drawn_sample_is_flagged(trained, tmp_path):
    from served_model import describe_model
    ckpt, _ = trained
    ck = torch.load(ckpt, weights_only=True)
    ck["config"]["data"] = str(ROOT)
    torch.save(ck, tmp_path / "model_final.pth")
    info, warn = describe_model(tmp_path / "model_final.pth")
    assert "bundled drawn sample" in info
    assert warn and "--checkpoint models/exprclip-ferplus.pth" in warn


def test_the_bundled_model_is_described_by_its_card_not_by_the_machine_it_was_made_on():
    from served_model import BUNDLED_MODEL, describe_model
    info, warn = describe_model(BUNDLED_MODEL)
    ck = torch.load(BUNDLED_MODEL, weights_only=True)
    assert "bundled real-face model" in info and "models/README.md" in info and "pkg:multilingual-e5-small" in info
    assert str(ck["config"]["data"]) not in info and "best epoch" not in info and warn is None
