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
