"""One typed config for model, data and training. CLI flags are generated from its fields.

Precedence: dataclass defaults < --preset < --config FILE (YAML/JSON) < explicit flags.
The config is saved inside every checkpoint, so a checkpoint alone rebuilds its model.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

from sentence_towers import is_sentence_tower
from utils import UserError


@dataclass
class Config:
    # --- model ---
    image_model: str = "resnet50"             # any timm model name (resnet50, vit_base_patch16_224, ...)
    image_weights: str = "hub"                # hub | none | pkg:efficientnet-lite0|1|2 | PATH (.pth/.safetensors)
    text_model: str = "distilbert-base-uncased"  # transformers name or local folder (pkg:all-minilm-l6-v2), or a
                                              # packaged multilingual sentence encoder, used frozen:
                                              # pkg:multilingual-e5-small | pkg:multilingual-use
    text_weights: str = "pretrained"          # pretrained | none (random init from the model's config)
    text_layers: int = 0                      # >0: override the number of transformer layers (tiny test models)
    text_width: int = 0                       # >0: override the hidden size (random-init only)
    text_pooling: str = "cls"                 # cls | mean
    embed_dim: int = 256                      # shared embedding size of both projection heads
    proj_dropout: float = 0.1                 # dropout inside the projection heads
    text_head: str = "mlp"                    # mlp (CLIP-tutorial head) | linear | none (identity: the text tower's
                                              # own space; embed_dim is then the tower's width)
    image_size: int = 224                     # square input size in pixels
    grayscale: bool = True                    # faces are converted to gray then 3 channels (FER domain)
    source_side: int = 0                      # >0: images larger than this are first reduced to it (Lanczos): the
                                              # side the training faces had (FER-2013: 48), so a sharp photo crop
                                              # reaches the model as band-limited as they were | 0: off
    max_length: int = 64                      # text tokens
    logit_scale_init: float = 14.285714       # 1 / 0.07; clamped at 100 in the model
    objective: str = "clip"                   # clip (contrastive) | ce (plain classifier baseline on the same towers)
    freeze_text: bool = False                 # keep the pretrained text geometry (projection still trains)
    freeze_image: bool = False                # keep the image tower fixed (only its projection head trains)
    freeze_image_stages: int = 0              # >0: the image tower's stem and its first N stages keep their
                                              # pretrained weights (no gradients, no backward through them)
    freeze_depthwise: bool = False            # the depthwise convolutions keep their pretrained filters in every
                                              # stage (no weight gradient for them: the costliest part of a CPU step)
    image_bn: str = "train"                   # train: BatchNorm as usual | fold: statistics re-estimated on the
                                              # training faces, then folded into the convolutions (faster steps)
    # --- data ---
    data: str = "."                           # folder holding captions.csv (image paths relative to `images`)
    captions: str = "captions.csv"            # the pairs file inside --data (image,caption[,label,split])
    images: str = "images"                    # image folder inside --data that `image` paths are relative to
    val_fraction: float = 0.1                 # carved out (stratified by label) when captions.csv has no split
    positives: str = "caption"                # caption | label: which pairs count as positives in the loss
    targets: str = "hard"                     # hard | soft: soft = the `soft_labels` column (FER+ annotator votes)
                                              # as each image's target distribution over the classes' sentences
    contrast: str = "batch"                   # batch: each image against the batch's captions (CLIP) | classes:
                                              # against every sentence of every training class, each step
    caption_bank: str = ""                    # "" = captions.csv's own captions; paper | rich | PATH (label,caption)
    caption_sampling: str = "first"           # first | random: which bank sentence an image gets each epoch
    sampler: str = "none"                     # none | balanced (label-balanced batches) | weighted (1/class count)
    exclude_classes: str = ""                 # comma list of labels left out of training (unseen-class protocol)
    augment: bool = True                      # train-time flip, small affine, brightness/contrast (albumentations)
    augment_photo: bool = False               # with augment: also degrade faces as photos do (small face upscaled,
                                              # JPEG, blur, gamma, a detector's looser box); not yet in the recipe
    mixup: float = 0.0                        # >0: Mixup's Beta(a, a) on training batches, targets mixed alike
                                              # (needs --targets soft or --contrast classes; 0.2 is typical)
    cutmix: float = 0.0                       # >0: CutMix's Beta(a, a); with --mixup too, one of the two per batch
    num_workers: int = 0                      # DataLoader worker processes (persistent across epochs)
    cache_images: bool = True                 # decode each face once (resized, uint8) and keep it in memory, up
                                              # to 2 GiB per process: later epochs skip PNG decoding and resizing
    # --- training ---
    epochs: int = 50                          # passes over the training split
    batch_size: int = 16                      # pairs per step (per process under torchrun)
    lr_image: float = 1e-4                    # AdamW learning rate of the image tower
    lr_text: float = 1e-5                     # AdamW learning rate of the text tower
    lr_head: float = 1e-3                     # projection heads and temperature
    weight_decay: float = 0.01                # never applied to 1-D params (norms, biases, logit_scale)
    warmup_steps: int = 100                   # linear warmup, then cosine decay (trainloop.get_lr)
    min_lr_ratio: float = 0.0                 # cosine floor as a fraction of each group's LR
    grad_clip: float = 1.0                    # max global gradient norm (0 = off)
    ema_decay: float = 0.0                    # >0: keep an exponential moving average of the weights (timm
                                              # ModelEmaV3 with warmup); it is what gets validated and saved
    accum_steps: int = 1                      # >1: each optimizer step sees accum_steps x batch_size pairs, all
                                              # contrasted with each other (GradCache-style, see accum.py)
    compile: bool = False                     # torch.compile both towers
    amp: str = "auto"                         # auto | bf16 | fp16 | off (auto: CUDA bf16 or fp16+scaler; CPU bf16
                                              # where it has native bf16 (AMX/AVX512-BF16), else fp32)
    channels_last: bool = True                # NHWC memory format (faster for most CNNs on GPU and CPU)
    device: str = "auto"                      # auto = cuda, then mps, then cpu
    seed: int = 0                             # data order, augmentation, dropout and init
    out_dir: str = "runs/exp"                 # last.pth, best.pth, metrics.csv, curves.png
    resume: str = ""                          # a last.pth to continue: its saved config is used (only length,
                                              # logging and output flags may change on top)
    init_from: str = ""                       # a checkpoint (model_final.pth, models/exprclip-ferplus.pth) whose
                                              # weights start this run: fine-tuning on other data, at another
                                              # --image-size or schedule (its towers and heads are kept)
    max_steps: int = 0                        # >0: stop after this many optimizer steps (smoke tests)
    final_path: str = "model_final.pth"       # a finished run's best epoch is copied here (an earlier file is
                                              # renamed aside, never overwritten; "" = leave it in out_dir only)
    select_by: str = "val_top1"               # val_top1 | val_p10 | val_loss: what "best epoch" means
    log_every: int = 10                       # progress-bar loss refresh, in steps; without a terminal, a plain
                                              # progress line every log_every steps and log_seconds
    log_seconds: float = 30.0                 # without a terminal: at most one progress line this often (0 = every
                                              # log_every steps)
    save_every_min: float = 5.0               # also save out_dir/last.pth mid-epoch this often, so a kill loses at
                                              # most this many minutes (0 = at epoch ends only)
    save_every_steps: int = 0                 # >0: also save last.pth mid-epoch every this many optimizer steps
    log_level: str = "info"                   # debug | info | warning | error (logs.py; ranks > 0 log warnings only)


PRESETS: dict[str, dict[str, Any]] = {
    # The source paper: ResNet50 + DistilBERT, 224 px, batch 16, 50 epochs, one T4.
    "paper": dict(image_model="resnet50", image_weights="hub", text_model="distilbert-base-uncased",
                  image_size=224, batch_size=16, epochs=50, lr_image=1e-4, lr_text=1e-5),
    "vit": dict(image_model="vit_base_patch16_224", image_weights="hub", image_size=224),
    # Offline, 2 CPU cores: the packaged ImageNet EfficientNet-Lite0 and all-MiniLM-L6-v2 (frozen), small images.
    "offline": dict(image_model="tf_efficientnet_lite0", image_weights="pkg:efficientnet-lite0",
                    text_model="pkg:all-minilm-l6-v2", text_pooling="mean", freeze_text=True,
                    image_size=64, batch_size=32, epochs=6, warmup_steps=20, lr_image=1e-3, lr_head=3e-3,
                    proj_dropout=0.0, amp="off"),   # Lite0 64 px: CPU bf16 level on Intel, +6-12% on Zen 5 (BENCHMARKS.md)
    # Tiny random-init model for tests and smoke runs: no weights needed at all.
    "tiny": dict(image_model="resnet10t", image_weights="none", text_model="pkg:all-minilm-l6-v2",
                 text_weights="none", text_layers=1, text_width=64, text_pooling="mean", image_size=48,
                 embed_dim=64, batch_size=32, epochs=3, warmup_steps=5, lr_image=2e-3, lr_text=2e-3,
                 lr_head=3e-3, proj_dropout=0.0, max_length=32, amp="off", channels_last=False),
}


CHOICES: dict[str, tuple[str, ...]] = dict(text_pooling=("cls", "mean"), positives=("caption", "label"),
                                           amp=("auto", "bf16", "fp16", "off"), objective=("clip", "ce"),
                                           caption_sampling=("first", "random"),
                                           sampler=("none", "balanced", "weighted"),
                                           select_by=("val_top1", "val_p10", "val_loss"),
                                           targets=("hard", "soft"), contrast=("batch", "classes"),
                                           text_head=("mlp", "linear", "none"), image_bn=("train", "fold"),
                                           log_level=("debug", "info", "warning", "error"),
                                           text_weights=("pretrained", "none"))


def _type_of(f: dataclasses.Field) -> type:
    return get_type_hints(Config)[f.name]


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def field_comments() -> dict[str, str]:
    """Each field's trailing `# comment` in the Config source (continuation lines joined): the flags' help text."""
    import inspect
    import re
    out, last = {}, None
    for line in inspect.getsource(Config).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=[^#]*#\s*(.*)", line)
        if m:
            last = m.group(1)
            out[last] = m.group(2).strip()
        elif last and re.match(r"\s+#\s*(.*)", line) and not line.strip().startswith("# ---"):
            out[last] += " " + line.strip().lstrip("#").strip()
        else:
            last = None
    return out


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """One --flag per Config field (underscores -> dashes), plus --preset and --config."""
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named settings applied before --config and flags")
    parser.add_argument("--config", help="YAML or JSON file of config fields")
    helps = field_comments()
    for f in fields(Config):
        t = _type_of(f)
        text = helps.get(f.name, "").replace("%", "%%")
        kw = dict(default=None, help=f"{text} (default: {f.default!r})".strip(), dest=f.name)
        if t is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), type=_parse_bool, nargs="?", const=True,
                                metavar="BOOL", **kw)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=t, choices=CHOICES.get(f.name), **kw)


def read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: config file not found")
    import yaml
    try:
        text = p.read_text(encoding="utf-8")
        is_yaml = p.suffix.lower() in (".yaml", ".yml")
        data = (yaml.safe_load(text) or {}) if is_yaml else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid {'YAML' if is_yaml else 'JSON'} "
                        f"({' '.join(str(e).split())[:120]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config fields")
    for key in ("resume", "init_from"):     # they pick the run's base config: read before any file is merged
        if key in data:
            raise UserError(f"{path}: {key} is not a config-file key; pass --{key.replace('_', '-')} on the "
                            "command line")
    return data


def make_config(overrides: dict[str, Any] | None = None, preset: str | None = None,
                config_file: str | None = None, base: dict[str, Any] | None = None) -> Config:
    """Defaults < base (--init-from: the file's config) < preset < file < overrides, unknown keys refused in one
    line."""
    merged: dict[str, Any] = dict(base or {})
    if preset:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
        merged.update(PRESETS[preset])
    if config_file:
        merged.update(read_config_file(config_file))
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise UserError(f"unknown config field(s): {', '.join(unknown)}")
    cfg = config_from_dict(merged)
    for name in ("image_weights", "text_model"):      # a `~/...` path (flag or config file), as a shell expands it
        setattr(cfg, name, os.path.expanduser(getattr(cfg, name)))
    for name, options in CHOICES.items():
        if getattr(cfg, name) not in options:
            raise UserError(f"{name} = {getattr(cfg, name)!r} is not one of {', '.join(options)}")
    check_ranges(cfg)
    if (cfg.targets == "soft" or cfg.contrast == "classes") and (cfg.accum_steps > 1 or cfg.objective == "ce"):
        raise UserError("--targets soft / --contrast classes work with --accum-steps 1 and --objective clip")
    if is_sentence_tower(cfg.text_model) and not (cfg.freeze_text and cfg.text_weights == "pretrained"):
        raise UserError(f"{cfg.text_model} is a packaged sentence encoder used as it is: pass --freeze-text "
                        "(and --text-weights pretrained)")
    if not cfg.image_weights.strip():
        raise UserError("--image-weights '': give hub, none, pkg:efficientnet-lite0 (lite1, lite2) or a weights "
                        "file path")
    if cfg.text_width > 0 and cfg.text_weights == "pretrained":
        raise UserError(f"--text-width {cfg.text_width} builds a random-init text tower of that width (pretrained "
                        "weights have their own): pass --text-weights none, or --text-width 0")
    if (cfg.mixup or cfg.cutmix) and not (cfg.targets == "soft" or cfg.contrast == "classes"):
        raise UserError("--mixup / --cutmix mix target distributions: use them with --targets soft or "
                        "--contrast classes")
    return cfg


def check_ranges(cfg: Config) -> None:
    """Numbers no run can use (0 epochs trains nothing, a negative rate climbs the loss, 0 accumulation steps
    divides by zero): every one refused in one line, flag by flag."""
    rules = [("batch_size", cfg.batch_size >= 2, ">= 2 (contrastive: a pair needs others to differ from)"),
             ("image_size", cfg.image_size >= 16, ">= 16"), ("embed_dim", cfg.embed_dim >= 1, ">= 1"),
             ("ema_decay", 0 <= cfg.ema_decay < 1, "in [0, 1) (0 = no EMA; 0.999 is typical)"),
             ("epochs", cfg.epochs >= 1, ">= 1"), ("accum_steps", cfg.accum_steps >= 1, ">= 1"),
             ("seed", 0 <= cfg.seed < 2**32, "in [0, 2**32 - 1]"),
             ("log_every", cfg.log_every >= 1, ">= 1"),
             ("max_length", cfg.max_length >= 1, ">= 1 (text tokens)"),
             ("val_fraction", 0 <= cfg.val_fraction < 1, "in [0, 1)"),
             ("proj_dropout", 0 <= cfg.proj_dropout < 1, "in [0, 1)"),
             ("min_lr_ratio", 0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
             ("logit_scale_init", cfg.logit_scale_init > 0, "> 0 (1 / temperature)")]
    rules += [(name, getattr(cfg, name) >= 0, ">= 0") for name in (
        "lr_image", "lr_text", "lr_head", "weight_decay", "grad_clip", "warmup_steps", "max_steps", "num_workers",
        "text_layers", "text_width", "source_side", "freeze_image_stages", "mixup", "cutmix", "log_seconds",
        "save_every_min", "save_every_steps")]
    rules += [(name, getattr(cfg, name) <= 10, "<= 10 (AdamW diverges at once above)") for name in (
        "lr_image", "lr_text", "lr_head", "weight_decay")]
    rules += [("source_side", cfg.source_side == 0 or cfg.source_side >= 16, "0 (off) or >= 16 px")]
    rules = [(f.name, math.isfinite(getattr(cfg, f.name)), "a finite number") for f in fields(Config)
             if _type_of(f) is float] + rules       # NaN fails no comparison, inf passes ">= 0"
    failed: dict[str, str] = {}
    for name, ok, rule in rules:        # the first broken rule of each flag (a finite number, then its range)
        if not ok:
            failed.setdefault(name, rule)
    bad = [f"--{name.replace('_', '-')} {getattr(cfg, name)} must be {rule}" for name, rule in failed.items()]
    if bad:
        raise UserError("; ".join(bad))


def config_from_args(args: argparse.Namespace) -> Config:
    flags = {f.name: getattr(args, f.name, None) for f in fields(Config)}
    return absolute_data(make_config(flags, preset=args.preset, config_file=args.config))


def absolute_data(cfg: Config) -> Config:
    """A new run keeps its data folder as an absolute path: its checkpoints resume from any working folder."""
    cfg.data = str(Path(cfg.data).resolve())
    return cfg


def init_config(saved: dict[str, Any], args: argparse.Namespace) -> Config:
    """--init-from without --resume: the file's own config as the base (so its towers and heads are rebuilt as
    they were), then --preset, --config and flags on top; where it was written and how long it ran are not kept."""
    keep = {f.name for f in fields(Config)} - {"resume", "out_dir", "final_path", "max_steps", "init_from"}
    flags = {f.name: getattr(args, f.name, None) for f in fields(Config)}
    return absolute_data(make_config(flags, preset=args.preset, config_file=args.config,
                                     base={k: v for k, v in saved.items() if k in keep}))


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild from a checkpoint's (or a config file's) dict: unknown keys (from newer versions) are ignored, each
    value coerced to its field's type (coerce_field: a wrong one is refused in one line)."""
    cfg = Config()
    for f in fields(Config):
        if f.name in d:
            setattr(cfg, f.name, coerce_field(f, d[f.name]))
    return cfg


class ConfigTypeError(UserError, ValueError):
    """A value that does not fit its field: one line for a config file, a ValueError to checkpoint_checks."""


COMMA_LISTS = ("exclude_classes",)      # str fields holding a comma list: a YAML/JSON list of names is joined
EMPTY_OK = ("final_path",)              # besides the fields whose default is "": null / empty means ""


def coerce_field(f: dataclasses.Field, v: Any) -> Any:
    """One config value as its field's type: YAML null -> "" where "" means off, a list of names -> a comma list,
    "true"/1 -> True, 3.0 -> 3; anything else (a dict, 1.7 for an int, "two", null for a number) is a UserError
    naming the key, the value and what it takes."""
    t, name = _type_of(f), f.name
    if name == "amp" and isinstance(v, bool):        # early checkpoints stored amp as a bool
        v = "auto" if v else "off"
    if name in COMMA_LISTS and isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        v = ",".join(v)
    if v is None and t is str and (f.default == "" or name in EMPTY_OK):
        return ""
    number = isinstance(v, (int, float, str)) and not isinstance(v, bool)
    try:
        if t is bool and (isinstance(v, bool) or (type(v) is int and v in (0, 1))):
            return bool(v)
        if t is bool and isinstance(v, str):
            return _parse_bool(v)
        if t is int and number and float(v) == int(float(v)):     # 3.0 -> 3; 1.7, "two", NaN, inf refused
            return int(v) if isinstance(v, int) else int(float(v))
        if t is float and number:
            return float(v)
        if t is str and number:
            return str(v)
    except (ValueError, OverflowError, argparse.ArgumentTypeError):
        pass
    what = dict(bool="true or false", int="a whole number", float="a number", str="text")[t.__name__]
    if name in COMMA_LISTS:
        what += " (a comma list, or a list of names)"
    raise ConfigTypeError(f"config {name}: {v!r} is not {what}; give {what}")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# What a resumed run may change on top of the checkpoint's config: length, logging, where it writes, and how images
# are loaded (the decode cache and the worker count give identical batches: tests/test_dataset.py, test_resume_cli.py).
RESUME_SAFE = ("resume", "epochs", "max_steps", "out_dir", "final_path", "log_every", "log_seconds",
               "save_every_min", "save_every_steps", "log_level", "device", "cache_images", "num_workers")


def moved_data(saved: str, given: str) -> bool:
    """--data under --resume: the same folder spelled another way, or the run's folder (an absolute path) no longer
    exists (moved, or another machine), so the given one is taken; an existing, different folder would change the
    run, and a relative one names no folder for sure (it depends on where the run was started)."""
    return Path(given).resolve() == Path(saved).resolve() or (Path(saved).is_absolute() and not Path(saved).exists())


def same_path(a: str, b: str) -> bool:
    """`~/w.pth` and `/root/w.pth` (or `./w.pth` from its folder) name one file: a weights source typed again."""
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def resumed_config(saved: dict[str, Any], args: argparse.Namespace) -> tuple[Config, list[str]]:
    """The run's own config from its checkpoint, with the safe flags given on top (-> [what changed]); a flag,
    --preset or --config value that would change the model, the data or the schedule is refused in one line."""
    cfg = config_from_dict(saved)
    asked = {f.name: getattr(args, f.name, None) for f in fields(Config)}
    from_files = make_config(preset=args.preset, config_file=args.config) if args.preset or args.config else None
    set_by_files = set(PRESETS.get(args.preset) or {}) | set(read_config_file(args.config) if args.config else {})
    changed = []
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        want = asked[f.name]
        if want is None and f.name in set_by_files and f.name not in RESUME_SAFE:
            want, flag = getattr(from_files, f.name), f"--preset/--config ({f.name})"
        if want is None or want == getattr(cfg, f.name) or (f.name in ("image_weights", "text_model") and same_path(
                want, getattr(cfg, f.name))):
            continue
        if f.name == "data" and moved_data(cfg.data, want):
            changed.append(f"--data {cfg.data!r} -> {want!r} (the same folder, or the run's one is gone: moved)")
            cfg.data = str(Path(want).resolve())        # absolute: a later resume finds it from anywhere
            continue
        if f.name not in RESUME_SAFE:
            raise UserError(f"{flag} {want!r} would change the resumed run (it has {getattr(cfg, f.name)!r}); "
                            f"only {', '.join('--' + n.replace('_', '-') for n in RESUME_SAFE[1:])} may change"
                            + (" (and --data, once the run's own folder is gone: moved)" if f.name == "data" else ""))
        if f.name != "resume":
            changed.append(f"{flag} {getattr(cfg, f.name)!r} -> {want!r}")
        setattr(cfg, f.name, want)
    if asked["out_dir"] is None:
        cfg.out_dir = str(Path(cfg.resume).parent)      # the run's folder, wherever it was moved
    return cfg, changed
