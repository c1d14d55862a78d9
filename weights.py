"""Source weights for the towers: a weights file into a timm image tower (load_matching), and the checks on a local
text-model folder before transformers reads it (check_text_folder). What was loaded, left out or missing: one line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from logs import get_logger
from utils import UserError, error_text

log = get_logger(__name__)

PREFIXES = ("module.", "model.", "backbone.")      # DDP, Lightning and training-script wrappers
TEXT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                     "pytorch_model.bin.index.json")
TEXT_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                        "tokenizer.model")


# ----------------------------------------------------------------------------- image tower

def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (module., model., backbone.) that at least half the keys share, again while one does."""
    while sd:
        p = next((p for p in PREFIXES if 2 * sum(k.startswith(p) for k in sd) >= len(sd)), None)
        if p is None:
            return sd
        sd = {k[len(p):] if k.startswith(p) else k: v for k, v in sd.items()}
    return sd


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """'fc.', 'head.', 'classifier.' ...: the classifier's module names as timm's pretrained_cfg gives them."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))


def _vit_filter(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ViT file through timm's own filter: position embeddings resampled to --image-size (patch embedding too)."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
    if not isinstance(model, VisionTransformer):
        return sd
    try:
        return checkpoint_filter_fn(sd, model)
    except Exception:          # left as it is: the shape check below names what does not fit
        return sd


def _by_position(sd: dict, full: list[str], own: dict, heads: tuple[str, ...]) -> tuple[dict, list[str]] | None:
    """Tensors in the model's order when they line up one to one in shape (the file's classifier, at the model's
    classifier positions, left out): ({name: tensor}, ignored file keys), else None."""
    names, values = list(sd), list(sd.values())
    if len(values) == len(full) != len(own):
        keep = [i for i, k in enumerate(full) if not k.startswith(heads)]
        ignored = [names[i] for i in range(len(names)) if i not in set(keep)]
        names, values = [names[i] for i in keep], [values[i] for i in keep]
    else:
        ignored = []
    if len(values) != len(own) or any(a.shape != b.shape for a, b in zip(values, own.values())):
        return None
    return dict(zip(own, values)), ignored


def load_matching(module: nn.Module, sd: dict[str, torch.Tensor], source: str, report: bool = True) -> None:
    """Load a weights file into a timm model, leaving it without a classifier (num_classes=0). A wrapper prefix is
    dropped, and so is the file's classifier (any class count); by key names, else, when the tensors line up one to
    one in order and shape (e.g. the lukemelas EfficientNet-Lite0 file vs timm's tf_efficientnet_lite0), by
    position. One info line says how many tensors were loaded and which were ignored."""
    sd, heads = strip_prefixes(sd), classifier_prefixes(module)
    full = list(module.state_dict())                 # with its classifier: the order a positional file has
    if hasattr(module, "reset_classifier"):
        module.reset_classifier(0)
    own = module.state_dict()
    head = [k for k in sd if k.startswith(heads)] if heads else []
    body = _vit_filter(module, {k: v for k, v in sd.items() if k not in head})
    need = [k for k in own if not k.endswith("num_batches_tracked")]     # older files lack these counters
    if set(body) >= set(need):
        pairs, extra, by_position = {k: body[k] for k in own if k in body}, [k for k in body if k not in own], False
    elif (found := _by_position(sd, full, own, heads)) is not None:
        (pairs, head), extra, by_position = found, [], True
    else:
        missing = [k for k in need if k not in body]
        raise UserError(f"{source}: weights do not fit this model ({len(missing)} missing keys, e.g. {missing[0]}); "
                        "check --image-model matches the file")
    for k, v in pairs.items():
        if v.shape != own[k].shape:
            raise UserError(f"{source}: {k} is {list(v.shape)} in the file but {list(own[k].shape)} in the model; "
                            "check --image-model (and --image-size) match the file")
    module.load_state_dict(pairs, strict=False)      # every key but num_batches_tracked checked present above
    (log.info if report else log.debug)(load_report(source, len(pairs), [(k, sd[k]) for k in head], extra,
                                                    by_position))


def load_report(source: str, n: int, head: list[tuple[str, torch.Tensor]], extra: list[str], by_position: bool) -> str:
    """'loaded 320 tensors from FILE; ignored fc.weight, fc.bias (a 7-class head); 2 other (e.g. ...)'."""
    parts = []
    if head:
        classes = next((v.shape[0] for _, v in head if v.dim() == 2), None)
        names = ", ".join(k for k, _ in head[:2]) + (f" and {len(head) - 2} more" if len(head) > 2 else "")
        parts.append(f"{names} ({f'a {classes}-class head' if classes else 'its classifier'})")
    if extra:
        parts.append(f"{len(extra)} other (e.g. {', '.join(extra[:2])})")
    return (f"loaded {n} tensors from {source}" + (" by position (names differ)" if by_position else "")
            + ("; ignored " + "; ".join(parts) if parts else ""))


# ----------------------------------------------------------------------------- text tower

def is_path(name: str) -> bool:
    """A --text-model that names a folder rather than a hub model ('org/name' is a hub name)."""
    return os.path.exists(name) or name.startswith(("/", "~", ".")) or name.count("/") > 1 or "\\" in name


def check_text_folder(folder: str, config: bool, weights: bool, tokenizer: bool) -> None:
    """What a local --text-model folder lacks (only the parts that will be read), in one line."""
    p = Path(folder)
    saved = "a folder saved by save_pretrained (config.json, model.safetensors, tokenizer files)"
    if not p.is_dir():
        raise UserError(f"{folder}: no such folder" if not p.exists() else f"{folder}: not a folder; --text-model "
                        f"takes {saved}")
    if config:
        if not (p / "config.json").is_file():
            raise UserError(f"{folder}: no config.json; --text-model takes {saved}")
        try:
            conf = json.loads((p / "config.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{folder}/config.json: not valid JSON ({error_text(e, 100)})")
        if isinstance(conf, dict) and "text_config" in conf and "vision_config" in conf:
            raise UserError(f"{folder} holds a whole {conf.get('model_type', 'CLIP')} model (image and text); pass "
                            f"its text model only: CLIPTextModel.from_pretrained({folder!r}).save_pretrained(OUT), "
                            f"copy its tokenizer files into OUT, then --text-model OUT")
    if weights and not any((p / f).is_file() for f in TEXT_WEIGHT_FILES):
        raise UserError(f"{folder}: no model.safetensors or pytorch_model.bin; save the model into it with "
                        f"save_pretrained, or pass --text-weights none")
    if tokenizer and not any((p / f).is_file() for f in TEXT_TOKENIZER_FILES):
        raise UserError(no_tokenizer(folder))


def no_tokenizer(folder: str) -> str:
    return f"{folder} has no tokenizer (tokenizer.json or vocab.txt); copy the tokenizer files into it"


def text_load_error(source: str, e: Exception) -> str:
    """One line for a text model that transformers could not load from `source`."""
    if "ignore_mismatched_sizes" in str(e) or "size mismatch" in str(e):
        return (f"{source}: its config.json does not fit its weights (tensor shapes differ); save config and "
                f"weights together with save_pretrained")
    if type(e).__name__ == "SafetensorError" or "deserializ" in str(e):
        file = next((f for f in TEXT_WEIGHT_FILES if (Path(source) / f).is_file()), "its weights file")
        return f"{Path(source) / file}: truncated or damaged weights file ({error_text(e, 100)})"
    return f"{source}: its text model could not be loaded ({type(e).__name__}: {error_text(e)})"
