"""samplers.py: balanced batches are even per class, cover minority classes and are deterministic per seed/epoch."""
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samplers import BalancedBatchSampler, class_weighted_sampler  # noqa: E402
from utils import UserError  # noqa: E402

# FER-like imbalance: 200 happy, 50 sad, 5 disgust
LABELS = ["happy"] * 200 + ["sad"] * 50 + ["disgust"] * 5


def per_class(batch, labels=LABELS):
    return Counter(labels[i] for i in batch)


@pytest.mark.parametrize("batch_size", [9, 10, 11, 2, 1])
def test_batches_are_even_per_class(batch_size):
    s = BalancedBatchSampler(LABELS, batch_size, seed=0)
    batches = list(s)
    assert len(batches) == len(s) == len(LABELS) // batch_size
    for b in batches:
        counts = [per_class(b).get(c, 0) for c in ("happy", "sad", "disgust")]
        assert len(b) == batch_size and max(counts) - min(counts) <= 1 and sum(counts) == batch_size
        if batch_size < 3:
            assert len(set(LABELS[i] for i in b)) == batch_size  # one each of batch_size distinct classes
    if batch_size % 3:  # remainder spread at random: every class sometimes gets an extra one
        assert all(any(per_class(b)[c] == batch_size // 3 + 1 for b in batches) for c in ("happy", "sad", "disgust"))


def test_minority_class_covered_and_majority_not_repeated_early():
    batches = list(BalancedBatchSampler(LABELS, 9, seed=1))
    flat = [i for b in batches for i in b]
    assert set(i for i in flat if LABELS[i] == "disgust") == set(range(250, 255))  # all 5 minority images used
    happy = [i for i in flat if LABELS[i] == "happy"]
    assert len(set(happy)) == len(happy)  # 84 happy draws from 200: no repeat before the class is used up
    assert set(happy) != set(range(84))  # a shuffled pass, not the dataset order
    sad = [[i for i in b if LABELS[i] == "sad"] for b in batches]  # 3 per batch, class of 50
    assert len(set(sum(sad[:16], []))) == 48 and len(set(sum(sad[:17], []))) == 50  # a pass is a permutation


def test_deterministic_per_seed_and_epoch():
    a, b = BalancedBatchSampler(LABELS, 8, seed=3), BalancedBatchSampler(LABELS, 8, seed=3)
    assert list(a) == list(b) == list(a)  # iterating again repeats the epoch
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(BalancedBatchSampler(LABELS, 8, seed=4)) != first


def test_num_batches_dataloader_and_errors():
    s = BalancedBatchSampler(torch.tensor([0, 1, 1, 1, 2, 2]), batch_size=3, seed=0, num_batches=7)
    data = TensorDataset(torch.arange(6))
    loaded = [x.tolist() for (x,) in DataLoader(data, batch_sampler=s)]
    assert len(loaded) == 7
    assert all(sorted({0: 0, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2}[i] for i in b) == [0, 1, 2] for b in loaded)
    with pytest.raises(UserError):
        BalancedBatchSampler([], 4)
    with pytest.raises(UserError):
        BalancedBatchSampler(LABELS, 0)


def test_class_weighted_sampler_balances_on_average_and_is_seeded():
    s = class_weighted_sampler(LABELS, seed=0)
    assert isinstance(s, WeightedRandomSampler) and len(s) == len(LABELS)
    draws = [i for _ in range(12) for i in s]  # 12 epochs x 255
    freq = Counter(LABELS[i] for i in draws)
    assert all(abs(freq[c] / len(draws) - 1 / 3) < 0.04 for c in ("happy", "sad", "disgust"))
    assert list(class_weighted_sampler(LABELS, seed=0)) == list(class_weighted_sampler(LABELS, seed=0))
    assert list(class_weighted_sampler(LABELS, seed=0)) != list(class_weighted_sampler(LABELS, seed=1))
    assert np.isclose(float(s.weights[0] * 200), float(s.weights[-1] * 5))
