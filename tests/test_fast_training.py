"""The faster CPU training paths: BatchNorm folded into the convolutions, frozen early stages, frozen depthwise
filters, depthwise convolutions kept in fp32 under CPU bf16 autocast, the frozen class
sentences reused step to step, and the packaged sentence tower's embeddings kept on disk between runs."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn

import sentence_towers
import train
from config import make_config
from image_tower import depthwise_convs, depthwise_in_fp32, fold_batchnorm, freeze_depthwise, freeze_stages
from model import ExprCLIP, load_checkpoint
from utils import UserError


def bn_count(m: nn.Module) -> int:
    return sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet10t"])
def test_folding_batchnorm_keeps_the_eval_output_and_leaves_no_batchnorm(name):
    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=0).eval()
    for m in net.modules():                      # statistics far from the defaults, so folding has work to do
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        before = net(x)
        after = fold_batchnorm(net).eval()(x)
    assert bn_count(net) == 0
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None and c.bias.requires_grad for c in convs)    # the BN shift trains on


def test_frozen_stages_get_no_gradient_and_keep_eval_mode(sample_dir):
    cfg = make_config(dict(data=str(sample_dir), image_size=32, freeze_image_stages=1), preset="tiny")
    model = ExprCLIP(cfg).train()
    enc = model.image_encoder
    frozen = {n for n, p in enc.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("conv1", "bn1", "layer1.")) for n in frozen)
    assert all(p.requires_grad for n, p in enc.named_parameters() if n.startswith("layer2."))
    bns = lambda m: [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]          # noqa: E731
    assert not enc.bn1.training and not any(b.training for b in bns(enc.layer1))      # statistics kept
    assert all(b.training for b in bns(enc.layer2))
    with pytest.raises(UserError, match="stages"):
        freeze_stages(timm.create_model("resnet10t", num_classes=0), 9)


def test_frozen_depthwise_filters_stay_put_while_the_pointwise_layers_train(sample_dir, tmp_path):
    cfg = make_config(dict(data=str(sample_dir), image_size=32, image_model="tf_efficientnet_lite0",
                           image_weights="none", freeze_depthwise=True, augment=False, num_workers=0, batch_size=16,
                           out_dir=str(tmp_path)), preset="tiny")
    tr = train.Trainer(cfg)
    enc = tr.model.image_encoder
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    tr.model.train()
    tr.epoch_batches.set(0, tr.train_batches(0)[:2])
    for batch in tr.train_loader:
        tr.train_step(batch)
    after = enc.state_dict()
    ids = {id(c) for c in depthwise_convs(enc)}
    dw = [n for n, m in enc.named_modules() if id(m) in ids]
    assert len(dw) == 16                                                 # one per block of Lite0
    assert all(torch.equal(after[f"{n}.weight"], before[f"{n}.weight"]) for n in dw)
    pointwise = [k for k in after if k.endswith("conv_pwl.weight")]
    assert pointwise and all(not torch.equal(after[k], before[k]) for k in pointwise)   # the rest trained


def test_frozen_depthwise_filters_leave_a_folded_batchnorm_shift_training():
    net = fold_batchnorm(timm.create_model("tf_efficientnet_lite0", num_classes=0).eval())
    assert freeze_depthwise(net) == 16
    conv = depthwise_convs(net)[0]
    assert not conv.weight.requires_grad and conv.bias is not None and conv.bias.requires_grad


def test_freezing_depthwise_filters_of_a_tower_without_them_is_refused():
    with pytest.raises(UserError, match="no depthwise"):
        freeze_depthwise(timm.create_model("resnet10t", num_classes=0))


def test_depthwise_convolutions_run_in_fp32_under_cpu_bf16_autocast_and_keep_their_keys():
    torch.manual_seed(0)
    plain = timm.create_model("tf_efficientnet_lite0", num_classes=0).eval()
    net = depthwise_in_fp32(copy.deepcopy(plain))
    assert list(net.state_dict()) == list(plain.state_dict())
    conv = depthwise_convs(net)[3]
    assert type(conv).__name__.startswith("Fp32") and isinstance(conv, type(depthwise_convs(plain)[3]))
    x = torch.randn(2, conv.in_channels, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_plain = conv(x.bfloat16()), depthwise_convs(plain)[3](x.bfloat16())
    assert y.dtype == torch.float32 and y_plain.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(y, depthwise_convs(plain)[3](x.bfloat16().float()))
        img = torch.randn(1, 3, 32, 32)
        assert torch.equal(net(img), plain(img))                          # fp32: nothing changes
    assert type(copy.deepcopy(net).blocks[1][0].conv_dw) is type(net.blocks[1][0].conv_dw)


def test_training_with_folded_batchnorm_saves_a_checkpoint_that_loads_the_same(sample_dir, tmp_path):
    from conftest import TINY_FLAGS
    out = tmp_path / "run"
    flags = TINY_FLAGS + ["--data", str(sample_dir), "--out-dir", str(out), "--final-path", "", "--epochs", "1",
                          "--image-bn", "fold", "--freeze-image-stages", "1"]
    assert train.main(flags) == 0
    model, cfg = load_checkpoint(out / "best.pth")
    assert cfg.image_bn == "fold" and bn_count(model.image_encoder) == 0
    again, _ = load_checkpoint(out / "best.pth")
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), again.encode_image(x))


def test_folding_starts_from_statistics_of_the_training_faces(sample_dir, tmp_path):
    cfg = make_config(dict(data=str(sample_dir), image_size=32, image_bn="fold", out_dir=str(tmp_path)),
                      preset="tiny")
    seen = []
    real = torch.optim.swa_utils.update_bn
    try:
        torch.optim.swa_utils.update_bn = lambda batches, enc, device=None: seen.extend(b.shape for b in batches)
        train.Trainer(cfg)
    finally:
        torch.optim.swa_utils.update_bn = real
    assert seen and all(s[1:] == (3, 32, 32) for s in seen)
    assert sum(s[0] for s in seen) == min(train.BN_CALIBRATION_FACES, sum(1 for _ in seen) * cfg.batch_size)


def test_the_same_frozen_batch_again_is_reused_and_equals_recomputing(tiny_cfg):
    model = ExprCLIP(make_config({**tiny_cfg.__dict__, "freeze_text": True}))
    a = model.tokenize(["a happy face", "a sad face", "an angry face"])
    b = model.tokenize(["a sad face", "a happy face", "an angry face"])
    first = model.frozen_features(a["input_ids"], a["attention_mask"])
    assert model.frozen_features(a["input_ids"], a["attention_mask"]) is first          # reused
    other = model.frozen_features(b["input_ids"], b["attention_mask"])                   # not confused with it
    torch.testing.assert_close(other[[1, 0, 2]], first)
    model.reuse_frozen_batch = False
    torch.testing.assert_close(model.frozen_features(a["input_ids"], a["attention_mask"]), first)


@pytest.fixture
def fake_tower(monkeypatch, tmp_path):
    """The e5 source with a counting stand-in engine and the disk cache in tmp_path."""
    calls = []

    def encode(source, texts):
        calls.append(len(texts))
        return torch.stack([torch.full((384,), float(len(t))) for t in texts]).numpy()
    monkeypatch.setattr(sentence_towers, "_encode", encode)
    monkeypatch.setattr(sentence_towers, "DISK_DIR", tmp_path / "sentences")
    monkeypatch.setitem(sentence_towers._CACHES, "pkg:multilingual-e5-small",
                        (sentence_towers.OrderedDict(), sentence_towers.threading.Lock()))
    return calls


def fresh_tower():
    sentence_towers._CACHES.pop("pkg:multilingual-e5-small")          # a new process: nothing in memory
    return sentence_towers.SentenceTower("pkg:multilingual-e5-small")


def test_a_bank_is_embedded_once_then_read_back_from_disk(fake_tower):
    bank = [f"sentence number {i}" for i in range(300)]
    first = sentence_towers.SentenceTower("pkg:multilingual-e5-small").embed(bank)
    assert fake_tower == [300] and len(list(sentence_towers.DISK_DIR.glob("*.safetensors"))) == 1
    again = fresh_tower().embed(bank + ["one new query"])
    assert fake_tower == [300, 1]                                       # only the new sentence was embedded
    torch.testing.assert_close(again[:300], first)


def test_single_queries_are_not_written_to_disk(fake_tower):
    sentence_towers.SentenceTower("pkg:multilingual-e5-small").embed(["my private query"])
    assert not sentence_towers.DISK_DIR.exists()


def test_a_corrupt_cache_file_costs_one_line_and_a_rebuild(fake_tower, caplog):
    bank = [f"s{i}" for i in range(300)]
    sentence_towers.SentenceTower("pkg:multilingual-e5-small").embed(bank)
    path = next(sentence_towers.DISK_DIR.glob("*.safetensors"))
    path.write_bytes(b"not a safetensors file")
    out = fresh_tower().embed(bank)
    assert fake_tower == [300, 300] and out.shape == (300, 384)
    assert sum("ignoring the sentence cache" in r.getMessage() for r in caplog.records) == 1
