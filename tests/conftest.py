"""Shared fixtures: a small procedurally drawn sample and one tiny model trained on it (session-scoped)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

FER = ROOT.parent / "shared" / "data" / "fer2013"

# Tiny, weight-free training recipe that separates the sample's 8 classes in a few dozen steps.
TINY_FLAGS = ["--preset", "tiny", "--caption-bank", "paper", "--augment", "false", "--image-size", "48",
              "--batch-size", "32", "--epochs", "16", "--num-workers", "0"]


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    from synth import make_sample
    d = tmp_path_factory.mktemp("sample")
    make_sample(d, per_class=60, size=48, seed=1)
    return d


@pytest.fixture(scope="session")
def trained(sample_dir, tmp_path_factory):
    """(checkpoint path, run dir) of a tiny model trained through train.main on the sample."""
    import train
    out = tmp_path_factory.mktemp("run")
    final = out / "model_final.pth"
    rc = train.main(TINY_FLAGS + ["--data", str(sample_dir), "--out-dir", str(out), "--final-path", str(final)])
    assert rc == 0
    return final, out


@pytest.fixture
def tiny_cfg(sample_dir):
    from config import make_config
    return make_config(dict(data=str(sample_dir), image_size=32), preset="tiny")
