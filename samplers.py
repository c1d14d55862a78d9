"""Class-balanced sampling for imbalanced expression data (FER-2013 has 16x more happy than disgust faces).

BalancedBatchSampler: every batch holds (almost) the same number of images of each class -> DataLoader(batch_sampler=).
class_weighted_sampler: per-image sampling, classes equally likely on average -> DataLoader(sampler=).
Both are deterministic from a seed (and the epoch, for the batch sampler).
epoch_batches: train.py's batches for one epoch and one process, with any of the three samplings.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler, WeightedRandomSampler

from utils import UserError


def _class_ids(labels: Sequence) -> tuple[np.ndarray, int]:
    """Any labels (names or ints) -> [N] int class ids in 0..C-1, and C."""
    if len(labels) == 0:
        raise UserError("cannot sample from an empty dataset (no labels)")
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    _, ids = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    return ids.reshape(-1), int(ids.max()) + 1


class BalancedBatchSampler(Sampler[list[int]]):
    """Batches of batch_size indices with batch_size // C per class; the remainder goes to classes chosen at random.

    Within a class, indices are drawn from a shuffled cycle: no repeats until the class is used up, then a fresh
    shuffle (small classes are therefore seen many times per epoch -- sampling with replacement across batches).
    """

    def __init__(self, labels: Sequence, batch_size: int, seed: int = 0, num_batches: int | None = None):
        if batch_size < 1:
            raise UserError(f"batch size {batch_size}: must be at least 1")
        ids, n_classes = _class_ids(labels)
        self.members = [np.flatnonzero(ids == c) for c in range(n_classes)]  # per class: dataset indices
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.num_batches = num_batches if num_batches is not None else max(1, len(ids) // batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n_classes = len(self.members)
        base, extra = divmod(self.batch_size, n_classes)
        queues = [rng.permutation(m) for m in self.members]  # shuffled cycle per class
        heads = [0] * n_classes
        for _ in range(self.num_batches):
            counts = np.full(n_classes, base)
            counts[rng.choice(n_classes, extra, replace=False)] += 1
            batch = []
            for c, k in enumerate(counts):
                while heads[c] + k > len(queues[c]):  # class used up: append a fresh shuffle
                    queues[c] = np.concatenate([queues[c][heads[c]:], rng.permutation(self.members[c])])
                    heads[c] = 0
                batch.extend(queues[c][heads[c]:heads[c] + k].tolist())
                heads[c] += k
            yield [batch[i] for i in rng.permutation(len(batch))]


def class_weighted_sampler(labels: Sequence, seed: int = 0, num_samples: int | None = None) -> WeightedRandomSampler:
    """WeightedRandomSampler with weight 1/count(class) per image (with replacement), seeded."""
    ids, _ = _class_ids(labels)
    weights = 1.0 / np.bincount(ids)[ids]  # [N]
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples or len(ids),
                                 replacement=True, generator=torch.Generator().manual_seed(seed))


def epoch_batches(labels: Sequence[int], cfg, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """One epoch's optimizer-step batches (batch_size x accum_steps indices each) for process `rank` of `world`: a
    seeded permutation, label-balanced batches or a class-weighted draw (cfg.sampler), a pure function of
    (cfg.seed, epoch). Full batches only (contrastive batches should be full). Under torchrun, rank r takes batches
    r, r+world, ... (equal counts): batch_size is per process."""
    bs, n = cfg.batch_size * cfg.accum_steps, len(labels)
    if cfg.sampler == "balanced":
        s = BalancedBatchSampler(labels, bs, seed=cfg.seed)
        s.set_epoch(epoch)
        batches = [list(b) for b in s]
    else:
        order = np.fromiter(class_weighted_sampler(labels, seed=cfg.seed * 100_003 + epoch), int) \
            if cfg.sampler == "weighted" else np.random.default_rng((cfg.seed, epoch)).permutation(n)
        batches = [order[k * bs:(k + 1) * bs].tolist() for k in range(max(1, n // bs))]
    if world == 1:
        return batches
    per_rank = len(batches) // world
    if per_rank == 0:
        raise UserError(f"{len(batches)} batches cannot feed {world} processes; lower --batch-size")
    return batches[rank::world][:per_rank]
