"""Source weights: image files with another head, prefix, size or wrapper; damaged files; local text folders."""
import json

import pytest
import timm
import torch

from config import make_config
from model import build_image_encoder, build_text_encoder
from utils import UserError, load_state_dict


def image_cfg(path, model="resnet10t", size=32):
    return make_config(dict(image_model=model, image_weights=str(path), image_size=size), preset="tiny")


def saved(tmp_path, sd, name="w.pth"):
    torch.save(sd, tmp_path / name)
    return tmp_path / name


@pytest.fixture(scope="module")
def r10():
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=7).state_dict()      # a 7-class fine-tune


def test_a_file_with_another_class_count_or_no_head_loads_its_backbone_and_says_so(tmp_path, r10, capsys):
    enc = build_image_encoder(image_cfg(saved(tmp_path, r10)))
    assert "ignored fc.weight, fc.bias (a 7-class head)" in capsys.readouterr().out
    assert torch.equal(enc.state_dict()["conv1.0.weight"], r10["conv1.0.weight"])
    headless = {k: v for k, v in r10.items() if not k.startswith("fc.")}
    enc = build_image_encoder(image_cfg(saved(tmp_path, headless, "h.pth")))
    assert torch.equal(enc.state_dict()["layer4.0.conv2.weight"], r10["layer4.0.conv2.weight"])
    assert f"loaded {len(headless)} tensors from" in capsys.readouterr().out


@pytest.mark.parametrize("wrap", [lambda sd: {f"module.{k}": v for k, v in sd.items()},
                                  lambda sd: {"model": {f"model.{k}": v for k, v in sd.items()}},
                                  lambda sd: {"state_dict_ema": sd, "epoch": 3},
                                  lambda sd: {"model_ema": {f"module.{k}": v for k, v in sd.items()}}],
                         ids=["ddp-module", "model-key-lightning-prefix", "state-dict-ema", "model-ema-module"])
def test_a_wrapped_or_prefixed_file_loads_by_name_with_its_head_ignored(tmp_path, r10, wrap, capsys):
    enc = build_image_encoder(image_cfg(saved(tmp_path, wrap(r10))))
    out = capsys.readouterr().out
    assert torch.equal(enc.state_dict()["layer1.0.conv1.weight"], r10["layer1.0.conv1.weight"])
    assert f"loaded {len(r10) - 2} tensors" in out and "(a 7-class head)" in out and "by position" not in out


def test_extra_keys_and_positional_loading_are_reported(tmp_path, r10, capsys):
    extra = dict(r10, **{"aux.weight": torch.zeros(3), "aux.bias": torch.zeros(3)})
    build_image_encoder(image_cfg(saved(tmp_path, extra)))
    assert "2 other (e.g. aux.weight, aux.bias)" in capsys.readouterr().out
    renamed = {f"t{i}": v for i, v in enumerate(r10.values())}              # lukemelas-style: same order, new names
    enc = build_image_encoder(image_cfg(saved(tmp_path, renamed, "r.pth")))
    assert torch.equal(enc.state_dict()["layer2.0.conv1.weight"], r10["layer2.0.conv1.weight"])
    assert "by position (names differ); ignored t" in capsys.readouterr().out


def test_a_vit_file_loads_at_another_image_size_with_its_position_embeddings_resampled(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10).state_dict()
    enc = build_image_encoder(image_cfg(saved(tmp_path, vit), "vit_tiny_patch16_224", size=32))
    assert enc.pos_embed.shape[1] == 1 + 2 * 2 and torch.equal(enc.state_dict()["cls_token"], vit["cls_token"])


def test_a_file_of_another_model_or_shape_is_one_line(tmp_path, r10):
    with pytest.raises(UserError, match=r"missing keys, e\.g\. .*check --image-model"):
        build_image_encoder(image_cfg(saved(tmp_path, r10), "resnet18"))
    wide = dict(r10, **{"conv1.0.weight": torch.zeros(24, 3, 5, 5)})
    with pytest.raises(UserError, match=r"conv1\.0\.weight is \[24, 3, 5, 5\] in the file but \[24, 3, 3, 3\]"):
        build_image_encoder(image_cfg(saved(tmp_path, wide)))


def test_pickled_objects_truncated_and_foreign_files_are_refused_in_whole_words(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(UserError) as e:
        load_state_dict(tmp_path / "module.pth")
    assert str(e.value).endswith("holds pickled objects, not a plain state dict (refused: loading it could run "
                                 "code); re-save with torch.save(model.state_dict(), ...) or as .safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"notes\.txt: not a loadable weights file: empty, truncated or not written"):
        load_state_dict(tmp_path / "notes.txt")
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1000)}, str(tmp_path / "w.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:200])
    with pytest.raises(UserError, match=r"cut\.safetensors: not a readable \.safetensors file, truncated"):
        load_state_dict(tmp_path / "cut.safetensors")


def test_error_text_strips_ansi_and_cuts_at_a_word():
    from utils import error_text
    text = error_text(RuntimeError("Weights \x1b[1monly\x1b[0m load\nfailed " + "because " * 40))
    assert "\x1b" not in text and "\n" not in text and text.endswith("because ...") and len(text) <= 154


def test_a_tilde_path_is_expanded_in_flags_and_config_files(tmp_path, monkeypatch, r10):
    monkeypatch.setenv("HOME", str(tmp_path))
    saved(tmp_path, r10)
    conf = tmp_path / "run.json"
    conf.write_text(json.dumps({"image_weights": "~/w.pth", "text_model": "~/text"}))
    cfg = make_config(preset="tiny", config_file=str(conf))
    assert (cfg.image_weights, cfg.text_model) == (str(tmp_path / "w.pth"), str(tmp_path / "text"))
    build_image_encoder(image_cfg("~/w.pth"))


def test_a_packaged_tower_rebuilt_from_a_checkpoint_says_nothing_and_a_resume_may_retype_its_path(
        tmp_path, monkeypatch, r10, capsys):
    import argparse
    from config import config_to_dict, resumed_config
    from package_refs import build_tower
    build_tower(make_config(preset="offline", overrides=dict(image_size=32)), "image_encoder")  # load, export, resume
    assert "loaded" not in capsys.readouterr().out
    monkeypatch.setenv("HOME", str(tmp_path))
    saved(tmp_path, r10)
    run = config_to_dict(image_cfg(tmp_path / "w.pth"))
    args = argparse.Namespace(image_weights="~/w.pth", preset=None, config=None, resume=str(tmp_path / "last.pth"))
    cfg, changed = resumed_config(run, args)                 # `--image-weights=~/w.pth` as typed at first training
    assert cfg.image_weights == str(tmp_path / "w.pth") and changed == []


# ----------------------------------------------------------------------------- local text folders

@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """A tiny DistilBERT saved as save_pretrained writes it (config, weights, tokenizer)."""
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizerFast
    d = tmp_path_factory.mktemp("db")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "smile"]
                                           + [f"w{i}" for i in range(40)]) + "\n")
    tok = DistilBertTokenizerFast(vocab=str(d / "vocab.txt"))
    DistilBertModel(DistilBertConfig(vocab_size=len(tok), dim=32, hidden_dim=64, n_layers=1, n_heads=2,
                                     max_position_embeddings=32)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def text_cfg(folder):
    return make_config(dict(text_model=str(folder), text_weights="pretrained", text_layers=0, text_width=0),
                       preset="tiny")


def copy_of(folder, tmp_path, drop=(), name="t"):
    import shutil
    d = tmp_path / name
    shutil.copytree(folder, d, ignore=lambda _, names: [n for n in names if n in drop])
    return d


def test_a_text_folder_loads_and_one_without_tokenizer_files_is_refused(text_folder, tmp_path):
    model, tok = build_text_encoder(text_cfg(text_folder))
    assert tok.convert_tokens_to_ids("smile") != tok.unk_token_id
    bare = copy_of(text_folder, tmp_path, drop=("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                                                "special_tokens_map.json"))
    with pytest.raises(UserError, match=r"has no tokenizer \(tokenizer\.json or vocab\.txt\); copy the tokenizer"):
        build_text_encoder(text_cfg(bare))
    (bare / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")       # 5 of the model's 47 tokens
    with pytest.raises(UserError, match=r"has no tokenizer"):
        build_text_encoder(text_cfg(bare))


def _no_config(folder, tmp_path):
    return copy_of(folder, tmp_path, drop=("config.json",))


def _no_weights(folder, tmp_path):
    return copy_of(folder, tmp_path, drop=("model.safetensors",))


def _wider_config(folder, tmp_path):
    d = copy_of(folder, tmp_path)
    conf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(conf, dim=64, hidden_dim=128)))
    return d


def _truncated(folder, tmp_path):
    d = copy_of(folder, tmp_path)
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:300])
    return d


def _clip(folder, tmp_path):
    from transformers import CLIPConfig, CLIPModel
    d = copy_of(folder, tmp_path, drop=("config.json", "model.safetensors"))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=dict(small, vocab_size=47, max_position_embeddings=32),
                         vision_config=dict(small, image_size=32, patch_size=16), projection_dim=16)).save_pretrained(d)
    return d


@pytest.mark.parametrize("spoil, match", [
    (lambda f, t: t / "gone", r"gone: no such folder$"),
    (_no_config, r"t: no config\.json; --text-model takes a folder saved by save_pretrained"),
    (_no_weights, r"t: no model\.safetensors or pytorch_model\.bin"),
    (_wider_config, r"t: its config\.json does not fit its weights"),
    (_truncated, r"t/model\.safetensors: truncated or damaged weights file"),
    (_clip, r"holds a whole clip model \(image and text\); pass its text model only")],
    ids=["missing", "no-config", "no-weights", "config-not-fitting", "truncated", "whole-clip"])
def test_a_broken_text_folder_is_one_line_naming_what_is_wrong(text_folder, tmp_path, spoil, match):
    with pytest.raises(UserError, match=match) as e:
        build_text_encoder(text_cfg(spoil(text_folder, tmp_path)))
    assert "\n" not in str(e.value) and "no network" not in str(e.value)
