"""Gradient accumulation keeps the whole accumulated batch's negatives: same loss and gradients as one big batch."""
from contextlib import nullcontext

import pytest
import torch

import train
from accum import accumulated_backward, micro_slices
from config import make_config
from loss import clip_loss, make_loss
from model import ExprCLIP


def test_micro_slices_cover_every_row_once():
    for n, k in [(10, 3), (7, 7), (5, 9), (32, 4)]:
        s = micro_slices(n, k)
        assert sorted(i for sl in s for i in range(n)[sl]) == list(range(n)) and all(sl.stop > sl.start for sl in s)


@pytest.mark.parametrize("objective", ["clip", "ce"])
def test_accumulated_gradients_equal_one_full_batch(objective):
    torch.manual_seed(0)
    cfg = make_config(dict(image_size=32, objective=objective), preset="tiny")
    model = ExprCLIP(cfg, class_names=["a", "b", "c"]).eval()     # eval: no dropout, fixed BatchNorm statistics
    caps = ["happy face", "sad face", "happy face", "angry face", "sad face", "happy face", "angry face"]
    uniq = list(dict.fromkeys(caps))
    tok = model.tokenize(uniq)
    batch = dict(pixels=torch.randn(7, 3, 32, 32), input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                 text_index=torch.tensor([uniq.index(c) for c in caps]), groups=torch.tensor([0, 1, 0, 2, 1, 0, 2]),
                 labels=torch.tensor([0, 1, 0, 2, 1, 0, 2]))

    def grads():
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return g

    if objective == "clip":
        out = model(batch["pixels"], batch["input_ids"], batch["attention_mask"], batch["text_index"])
        full = clip_loss(out["image_features"], out["text_features"], out["logit_scale"], batch["groups"])
    else:
        logits = model(batch["pixels"])["logits"]
        full = torch.nn.functional.cross_entropy(logits, batch["labels"])
    full.backward()
    ref = grads()
    loss = accumulated_backward(model, batch, 3, nullcontext, lambda l: l.backward(), torch.device("cpu"),
                                make_loss(cfg))
    got = grads()
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)
    assert ref.keys() == got.keys()
    for n in ref:
        assert torch.allclose(ref[n], got[n], atol=1e-5, rtol=1e-4), (n, (ref[n] - got[n]).abs().max())


def test_trainer_runs_with_accumulation(sample_dir, tmp_path):
    cfg = make_config(dict(data=str(sample_dir), image_size=32, batch_size=8, accum_steps=4, epochs=1, max_steps=2,
                           out_dir=str(tmp_path), final_path=""), preset="tiny")
    t = train.Trainer(cfg)
    assert len(t.train_batches(0)[0]) == 32                      # one optimizer step = accum_steps x batch_size
    t.fit()
    assert t.step == 2
