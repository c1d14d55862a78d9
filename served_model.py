"""Which model the demo serves, and what it is (no Gradio inside): --checkpoint, else model_final.pth in the project
root, else the bundled model; what that model was trained on and when, read from the checkpoint's own metadata."""
from __future__ import annotations

import time
from pathlib import Path

from utils import UserError

ROOT = Path(__file__).resolve().parent
ROOT_MODEL = ROOT / "model_final.pth"                        # the paper's workflow: drop a trained model here
BUNDLED_MODEL = ROOT / "models" / "exprclip-ferplus.pth"     # shipped; served when ROOT_MODEL is absent
TRAIN_COMMAND = "python train.py --preset offline --data ."


def choose_checkpoint(given: str | None, root_model: Path = ROOT_MODEL,
                      bundled: Path = BUNDLED_MODEL) -> tuple[Path, str]:
    """(checkpoint to serve, why): --checkpoint, else `root_model` (model_final.pth in the project root), else the
    bundled model; neither there -> UserError saying what to do."""
    if given:
        return Path(given), "--checkpoint"
    if root_model.is_file():
        return root_model, f"{root_model.name} in the project root, which takes precedence over the bundled model"
    if bundled.is_file():
        return bundled, f"the bundled model: no {root_model.name} in the project root"
    raise UserError(f"no model to serve: neither {root_model} nor the bundled {bundled} exists; put a trained "
                    f"{root_model.name} in the project root, pass --checkpoint PATH, or train one with "
                    f"`{TRAIN_COMMAND}`")


def describe_model(path: Path) -> tuple[str, str | None]:
    """(what the served model is: trained on what, when, which text tower; a warning when it only knows the
    bundled drawn sample) from the checkpoint's own metadata."""
    from checkpoint import read_checkpoint
    ck = read_checkpoint(path)
    cfg, counts = ck["config"], ck.get("label_counts") or {}
    data = Path(str(cfg.get("data", "?")))
    drawn = data.resolve() == ROOT and cfg.get("captions", "captions.csv") == "captions.csv"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
    if path.resolve() == BUNDLED_MODEL:        # its fields name the machine it was made on: the card says how
        return (f"the bundled real-face model (FER+, {sum(counts.values()) or '?'} faces, {len(counts) or '?'} "
                f"classes; text tower {cfg.get('text_model')}; how it was made: models/README.md)"), None
    info = (f"trained on {'the bundled drawn sample' if drawn else data} ({sum(counts.values()) or '?'} faces, "
            f"{len(counts) or '?'} classes), best epoch {ck.get('epoch', '?')}, text tower {cfg.get('text_model')}, "
            f"file written {when}")
    warn = (f"{path.name} was trained only on the bundled drawn sample: it reads drawn faces, not photos; serve the "
            f"bundled real-face model with --checkpoint {BUNDLED_MODEL.relative_to(ROOT)}") if drawn else None
    return info, warn


def shown_path(path: Path, base: Path | None = None) -> str:
    """`path` relative to `base` (default: the working folder) when inside it, else as given (for log lines)."""
    try:
        return str(Path(path).resolve().relative_to(base or Path.cwd()))
    except ValueError:
        return str(path)


def checkpoint_info(path: str | Path) -> dict:
    """What a checkpoint holds, from its validated metadata alone (no model is built, nothing is downloaded):
    towers, input, embedding, classes and training counts, epoch and metrics, storage, whether it can --resume,
    and for each packaged tower whether the installed package matches (`checkpoint.py info`)."""
    from checkpoint import read_checkpoint
    from package_refs import check_package
    path = Path(path)
    ck = read_checkpoint(path, hint="FILE")
    cfg, refs = ck["config"], ck.get("references") or {}
    packages = {}
    for tower, ref in refs.items():
        try:
            check_package(ref, tower, path)
            packages[tower] = f"{ref['distribution']} {ref['version']}: installed, files match"
        except UserError as e:
            packages[tower] = str(e).split(": ", 1)[-1]
    keys = ("image_model", "image_weights", "image_size", "grayscale", "source_side", "text_model", "text_head",
            "freeze_text", "embed_dim", "objective", "amp")
    t = ck.get("trainer") or {}
    resume = dict(epochs_done=t.get("epoch"), epochs=cfg.get("epochs"), step=t.get("step"), best=t.get("best")) \
        if t else None
    return dict(file=str(path), megabytes=round(path.stat().st_size / 1e6, 1), format=ck["format"],
                storage=ck.get("storage_dtype", "float32"), resumable="trainer" in ck, resume=resume,
                config={k: cfg.get(k) for k in keys}, class_names=list(ck.get("class_names") or []),
                label_counts=dict(ck.get("label_counts") or {}), epoch=_plain(ck.get("epoch")),
                metrics={str(k)[:80]: _plain(v) for k, v in dict(ck.get("metrics") or {}).items()}, packages=packages)


def _plain(v):
    """A metadata value from an untrusted file as a short JSON-able one (a tensor or a list becomes its text)."""
    return v if v is None or isinstance(v, (bool, int, float)) else str(v)[:80]


def info_text(info: dict) -> str:
    """checkpoint_info as the lines `checkpoint.py info` prints."""
    c, counts = info["config"], info["label_counts"]
    side = f", faces reduced to {c['source_side']} px first" if c.get("source_side") else ""
    lines = [f"{info['file']}: {info['format']}, {info['megabytes']} MB, {info['storage']} tensors, "
             + ("with trainer state (--resume works)" if info["resumable"] else "weights only (serve, evaluate, "
                                                                                   "--init-from; not --resume)"),
             f"image tower: {c['image_model']} ({c['image_weights']}), {c['image_size']} px, "
             f"{'grayscale' if c['grayscale'] else 'colour'}{side}",
             f"text tower: {c['text_model']} ({'frozen' if c['freeze_text'] else 'trained'}), "
             f"{c['text_head']} head; {c['embed_dim']}-d embeddings; objective {c['objective']}; amp {c['amp']}"]
    if counts:
        lines.append(f"trained on {sum(counts.values()):,} faces: "
                     + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    if info["class_names"]:
        lines.append(f"classifier classes: {', '.join(info['class_names'])}")
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in info["metrics"].items() if k != "epoch"}
    if info["epoch"] is not None:
        lines.append(f"epoch {info['epoch']}" + ("; metrics: " + ", ".join(f"{k} {v}" for k, v in shown.items())
                                                 if shown else ""))
    if info["resume"]:
        r = info["resume"]
        best = f", best validation {r['best']:.4f}" if isinstance(r["best"], (int, float)) else ""
        lines.append(f"run state: {r['epochs_done']} of {r['epochs']} epochs done, step {r['step']}{best} "
                     f"(python train.py --resume {info['file']} [--epochs N])")
    lines += [f"{tower} package: {what}" for tower, what in info["packages"].items()]
    return "\n".join(lines)
