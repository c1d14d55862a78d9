"""The contrastive loss against a plain-Python reference, including multi-positive targets."""
import math

import pytest
import torch
import torch.nn.functional as F

from loss import clip_loss, positive_targets


def reference_loss(img, txt, scale, groups):
    """Loop version: each row's target is uniform over the columns sharing its group; both directions averaged."""
    n = len(groups)
    logits = [[scale * float(img[i] @ txt[j]) for j in range(n)] for i in range(n)]

    def direction(L):
        total = 0.0
        for i in range(n):
            lse = math.log(sum(math.exp(v) for v in L[i]))
            pos = [j for j in range(n) if groups[j] == groups[i]]
            total += -sum((L[i][j] - lse) / len(pos) for j in pos)
        return total / n

    transposed = [[logits[j][i] for j in range(n)] for i in range(n)]
    return 0.5 * (direction(logits) + direction(transposed))


def unit(x):
    return F.normalize(x, dim=-1)


@pytest.mark.parametrize("groups", [[0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 1, 2], [3, 3, 3, 3, 3, 3]])
def test_matches_reference_on_hand_made_embeddings(groups):
    g = torch.Generator().manual_seed(0)
    img, txt = unit(torch.randn(6, 5, generator=g)), unit(torch.randn(6, 5, generator=g))
    got = clip_loss(img, txt, torch.tensor(10.0), torch.tensor(groups))
    assert got.item() == pytest.approx(reference_loss(img, txt, 10.0, groups), rel=1e-5)


def test_distinct_groups_equal_classic_clip_cross_entropy():
    g = torch.Generator().manual_seed(1)
    img, txt = unit(torch.randn(8, 4, generator=g)), unit(torch.randn(8, 4, generator=g))
    logits = 7.0 * img @ txt.t()
    classic = 0.5 * (F.cross_entropy(logits, torch.arange(8)) + F.cross_entropy(logits.t(), torch.arange(8)))
    assert clip_loss(img, txt, torch.tensor(7.0)).item() == pytest.approx(classic.item(), rel=1e-6)


def test_symmetric_in_image_and_text():
    g = torch.Generator().manual_seed(2)
    img, txt = unit(torch.randn(5, 3, generator=g)), unit(torch.randn(5, 3, generator=g))
    groups = torch.tensor([0, 1, 1, 2, 0])
    a = clip_loss(img, txt, torch.tensor(5.0), groups)
    b = clip_loss(txt, img, torch.tensor(5.0), groups)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_identical_captions_are_not_negatives():
    """Two images per caption, each pair aligned with its (shared) caption: with multi-positive targets that is the
    optimum -- the loss sits at the target's entropy floor (ln 2) and every perturbation raises it."""
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    groups = torch.tensor([0, 0, 1, 1])
    best = clip_loss(e, e, torch.tensor(100.0), groups).item()
    assert best == pytest.approx(math.log(2), abs=1e-4)
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        moved = unit(e + 0.3 * torch.randn(4, 2, generator=g))
        assert clip_loss(moved, e, torch.tensor(100.0), groups).item() > best


def test_targets_rows_sum_to_one():
    t = positive_targets(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 0, 1, 2, 2, 2]))
    assert torch.allclose(t.sum(1), torch.ones(6))
    assert t[3, 4] == pytest.approx(1 / 3)
    assert t[0, 2] == 0


def test_aligned_pairs_score_lower_than_shuffled():
    g = torch.Generator().manual_seed(3)
    img = unit(torch.randn(16, 8, generator=g))
    aligned = clip_loss(img, img, torch.tensor(20.0))
    shuffled = clip_loss(img, img[torch.randperm(16, generator=g)], torch.tensor(20.0))
    assert aligned < shuffled


# ----------------------------------------------------------------------------- soft (vote-distribution) targets

from loss import soft_clip_loss, soft_targets  # noqa: E402


def reference_soft_loss(img, txt, scale, dist, text_class):
    """Loop version of the soft loss: image i gives class c's mass dist[i][c] evenly to the texts of class c
    (renormalised over the classes present); text j takes images in proportion to dist[i][c_j]."""
    n, m = len(dist), len(text_class)
    L = [[scale * float(img[i] @ txt[j]) for j in range(m)] for i in range(n)]
    count = {c: text_class.count(c) for c in text_class}
    i2t = 0.0
    for i in range(n):
        w = [dist[i][text_class[j]] / count[text_class[j]] for j in range(m)]
        lse = math.log(sum(math.exp(v) for v in L[i]))
        i2t += -sum(w[j] / sum(w) * (L[i][j] - lse) for j in range(m)) if sum(w) > 0 else 0.0
    t2i, rows = 0.0, 0
    for j in range(m):
        w = [dist[i][text_class[j]] for i in range(n)]
        if sum(w) == 0:
            continue
        lse = math.log(sum(math.exp(L[i][j]) for i in range(n)))
        t2i += -sum(w[i] / sum(w) * (L[i][j] - lse) for i in range(n))
        rows += 1
    return 0.5 * (i2t / n + t2i / rows)


def test_soft_loss_equals_multi_positive_loss_when_every_distribution_is_one_hot():
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 2, 2, 1, 0, 2])
    img, txt = unit(torch.randn(6, 5, generator=g)), unit(torch.randn(6, 5, generator=g))
    dist = F.one_hot(labels, 4).float()
    got = soft_clip_loss(img, txt, torch.tensor(10.0), dist, labels)
    assert got.item() == pytest.approx(clip_loss(img, txt, torch.tensor(10.0), labels).item(), rel=1e-6)


def test_soft_loss_matches_reference_on_vote_distributions():
    g = torch.Generator().manual_seed(2)
    dist = torch.tensor([[0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.8], [0.5, 0.0, 0.5]])
    text_class = [0, 1, 1, 2, 0]           # e.g. every class sentence: class 1 has two paraphrases
    img, txt = unit(torch.randn(4, 5, generator=g)), unit(torch.randn(5, 5, generator=g))
    got = soft_clip_loss(img, txt, torch.tensor(7.0), dist, torch.tensor(text_class))
    assert got.item() == pytest.approx(reference_soft_loss(img, txt, 7.0, dist.tolist(), text_class), rel=1e-5)


def test_votes_split_image_mass_between_both_classes_sentences():
    dist = torch.tensor([[0.6, 0.4]])                           # 6 surprise / 4 fear
    i2t, t2i = soft_targets(dist, torch.tensor([0, 1, 1]))      # one surprise sentence, two fear sentences
    assert i2t[0].tolist() == pytest.approx([0.6, 0.2, 0.2])
    assert t2i[:, 0].tolist() == pytest.approx([1.0, 1.0, 1.0])  # one image: every text's target is that image


def test_text_of_a_class_absent_from_the_batch_adds_no_loss():
    g = torch.Generator().manual_seed(3)
    img, txt = unit(torch.randn(3, 4, generator=g)), unit(torch.randn(3, 4, generator=g))
    dist = F.one_hot(torch.tensor([0, 0, 1]), 3).float()
    with_absent = soft_clip_loss(img, torch.cat([txt, unit(torch.randn(1, 4, generator=g))]), torch.tensor(5.0),
                                 dist, torch.tensor([0, 0, 1, 2]))
    assert torch.isfinite(with_absent)
