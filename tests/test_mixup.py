"""Mixup / CutMix on training batches: what a mixed face and its target are, and how train.py uses them."""
from __future__ import annotations

import pytest
import torch

import train
from config import make_config
from mixup import cutmix_box, mix_batch
from utils import UserError


def batch(b: int = 6, c: int = 4, size: int = 16):
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(b, 3, size, size, generator=g)
    dist = torch.softmax(torch.randn(b, c, generator=g), -1)
    return pixels, dist


def test_mixup_blends_each_face_with_its_mirror_and_mixes_the_targets_by_the_same_weight():
    pixels, dist = batch()
    before = pixels.clone(), dist.clone()
    torch.manual_seed(1)
    mixed, target, lam = mix_batch(pixels, dist, mixup=0.4, cutmix=0.0)
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * pixels + (1 - lam) * pixels.flip(0))
    torch.testing.assert_close(target, lam * dist + (1 - lam) * dist.flip(0))
    torch.testing.assert_close(target.sum(1), torch.ones(len(dist)))
    assert torch.equal(pixels, before[0]) and torch.equal(dist, before[1])           # inputs untouched


def test_cutmix_pastes_one_box_from_the_mirror_and_weighs_the_targets_by_its_area():
    pixels, dist = batch(size=32)
    torch.manual_seed(3)
    mixed, target, lam = mix_batch(pixels, dist, mixup=0.0, cutmix=1.0)
    changed = (mixed != pixels).any(1).any(0)                                        # [H, W] pixels replaced
    inside = (mixed == pixels.flip(0)).all(1).all(0)
    assert changed.any(), "this seed draws a non-empty box"
    assert torch.equal(changed & ~inside, torch.zeros_like(changed))                 # replaced = from the mirror
    assert abs(lam - (1 - changed.float().mean().item())) < 1e-6                     # weight = area kept
    torch.testing.assert_close(target, lam * dist + (1 - lam) * dist.flip(0))


def test_the_same_seed_mixes_the_same_way_so_a_resumed_run_repeats_its_steps():
    pixels, dist = batch()
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(mix_batch(pixels, dist, mixup=0.2, cutmix=1.0))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][2] == runs[1][2]


def test_mixing_off_returns_the_batch_as_it_is():
    pixels, dist = batch()
    out = mix_batch(pixels, dist, 0.0, 0.0)
    assert out[0] is pixels and out[1] is dist and out[2] == 1.0


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.99])
def test_a_cutmix_box_stays_inside_the_image(lam):
    torch.manual_seed(0)
    for _ in range(50):
        y0, y1, x0, x1 = cutmix_box((20, 30), lam)
        assert 0 <= y0 <= y1 <= 20 and 0 <= x0 <= x1 <= 30


def test_mixup_needs_distribution_targets_and_a_non_negative_concentration():
    with pytest.raises(UserError, match="--targets soft"):
        make_config(dict(mixup=0.2), preset="tiny")
    with pytest.raises(UserError, match=">= 0"):
        make_config(dict(cutmix=-1.0, contrast="classes"), preset="tiny")
    assert make_config(dict(mixup=0.2, contrast="classes"), preset="tiny").mixup == 0.2


def test_training_with_mixup_and_cutmix_finishes_and_saves(sample_dir, tmp_path):
    from conftest import TINY_FLAGS
    out = tmp_path / "run"
    flags = TINY_FLAGS + ["--data", str(sample_dir), "--out-dir", str(out), "--final-path", "", "--epochs", "1",
                          "--contrast", "classes", "--mixup", "0.4", "--cutmix", "1.0", "--max-steps", "3"]
    assert train.main(flags) == 0
    assert (out / "best.pth").is_file()
