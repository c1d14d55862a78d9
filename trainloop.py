"""Training-loop machinery for train.py: Ctrl-C only between whole steps, an undo for a step interrupted half-way
(BatchNorm statistics), a step/time trigger for mid-epoch checkpoints, plain progress lines for logs, counts of
skipped images, a stop when the loss or the weights turn NaN, the --final-path check, the LR schedule, metrics.csv
and curves.png, the weight EMA over trainable tensors, and the optimizer's parameter groups."""
from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from timm.utils import ModelEmaV3

from distributed import all_ranks
from logs import get_logger
from utils import UserError, check_output_file

log = get_logger(__name__)


class DeferredInterrupt:
    """While installed (`with DeferredInterrupt():`), a Ctrl-C or SIGTERM (a scheduler, `timeout`, torchrun stopping
    its workers) that arrives inside a `with guard.step():` block only sets a flag; the block's end raises
    KeyboardInterrupt, so training stops between whole steps and saves. A second signal, or one outside a block
    (waiting for data, validating), raises at once. deferred=False (torchrun: ranks must not stop at different
    steps): both raise at once. Nothing is installed outside the main thread."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, deferred: bool = True):
        self.deferred, self.installed = deferred, threading.current_thread() is threading.main_thread()
        self.inside, self.pending, self.previous = False, False, {}

    def __enter__(self) -> "DeferredInterrupt":
        if self.installed:
            self.previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self.previous.items():
            signal.signal(s, old if old is not None else signal.default_int_handler if s == signal.SIGINT else
                          signal.SIG_DFL)
        self.previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self.deferred and self.inside and not self.pending:
            self.pending = True
            what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            log.warning(f"\n{what}: stopping after this step (press Ctrl-C again to stop at once)")
            return
        raise KeyboardInterrupt

    @contextmanager
    def step(self):
        """The block runs to its end; a Ctrl-C received meanwhile is raised as KeyboardInterrupt after it."""
        self.inside = True
        try:
            yield
        finally:
            self.inside, pending, self.pending = False, self.pending, False
        if pending:
            raise KeyboardInterrupt


class BufferSnapshot:
    """Copies of a module's buffers (BatchNorm running statistics and batch counts), retaken before each step: a step
    interrupted before its optimizer update is undone with restore(), its forward pass having already moved them."""

    def __init__(self, module: torch.nn.Module):
        self.live = [b for b in module.buffers()]
        self.saved = [b.detach().clone() for b in self.live]

    @torch.no_grad()
    def take(self) -> None:
        if self.live:
            torch._foreach_copy_(self.saved, self.live)

    @torch.no_grad()
    def restore(self) -> None:
        if self.live:
            torch._foreach_copy_(self.live, self.saved)


class Every:
    """Called once per step: True every `steps` calls or once `seconds` have passed since the last True, whichever
    comes first (0 turns a trigger off; both 0: never). need_both: only when both hold (0 then sets no condition).
    reset() restarts both (e.g. after a save made for another reason)."""

    def __init__(self, steps: int = 0, seconds: float = 0.0, need_both: bool = False, clock=time.monotonic):
        self.steps, self.seconds, self.need_both, self.clock = steps, seconds, need_both, clock
        self.count, self.since = 0, clock()

    def reset(self) -> None:
        self.count, self.since = 0, self.clock()

    def __call__(self) -> bool:
        self.count += 1
        by_steps = self.steps > 0 and self.count >= self.steps
        by_time = self.seconds > 0 and self.clock() - self.since >= self.seconds
        if self.need_both:                          # a trigger set to 0 does not hold the other back
            due = (by_steps or self.steps <= 0) and (by_time or self.seconds <= 0)
        else:
            due = by_steps or by_time
        if due:
            self.reset()
        return due


class ProgressLines:
    """Plain progress lines for a log file, where no progress bar is drawn: step, mean loss and images/s since the
    previous line. -> line(step, loss, images) returns the text or None."""

    def __init__(self, every_steps: int, every_seconds: float, total_steps: int, clock=time.monotonic):
        self.due = Every(every_steps, every_seconds, need_both=True, clock=clock)
        self.total, self.clock = total_steps, clock
        self.losses, self.images, self.t0 = [], 0, clock()

    def line(self, prefix: str, step: int, loss: float, images: int) -> str | None:
        self.losses.append(loss)
        self.images += images
        if not self.due():
            return None
        now = self.clock()
        rate = self.images / max(now - self.t0, 1e-9)
        text = f"{prefix} step {step}/{self.total}  loss {sum(self.losses) / len(self.losses):.4f}  {rate:.1f} img/s"
        self.losses, self.images, self.t0 = [], 0, now
        return text


class SkipCount:
    """Unreadable training images of one epoch: a count and the first one's path, for the end-of-epoch line."""

    def __init__(self, count: int = 0, first: str = ""):
        self.count, self.first = count, first

    def add(self, paths: list[str]) -> None:
        if paths and not self.first:
            self.first = str(paths[0])
        self.count += len(paths)

    def summary(self, epoch: int, count: int | None = None) -> str | None:
        """The end-of-epoch line; count: all processes' (torchrun), else this one's."""
        count = self.count if count is None else count
        if not count:
            return None
        noun = "image" if count == 1 else "images"
        return f"epoch {epoch}: {count} unreadable {noun} skipped" + (f" (first: {self.first})" if self.first else "")


def get_lr(step: int, cfg: Config, total_steps: int) -> float:
    """LR multiplier: linear warmup to 1, then cosine down to min_lr_ratio at total_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model, cfg) -> list[dict]:
    """Image / text / heads+temperature groups at their own LRs; no weight decay on 1-D params."""
    towers = [("image", model.image_encoder, cfg.lr_image), ("text", model.text_encoder, cfg.lr_text)]
    heads = [p for n, p in model.named_parameters() if not n.startswith(("image_encoder.", "text_encoder."))]
    groups = []
    for name, params, lr in [(n, list(m.parameters()), lr) for n, m, lr in towers] + [("head", heads, cfg.lr_head)]:
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups += [dict(name=name, params=decay, lr=lr, base_lr=lr, weight_decay=cfg.weight_decay),
                   dict(name=name + "_nd", params=no_decay, lr=lr, base_lr=lr, weight_decay=0.0)]
    return [g for g in groups if g["params"]]


def write_logs(history: list[dict], out: Path) -> None:
    """metrics.csv and curves.png (loss and accuracy per epoch) beside the checkpoints."""
    df = pd.DataFrame(history)
    df.to_csv(out / "metrics.csv", index=False)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(df["epoch"], df["train_loss"], "o-", label="train")
    a.plot(df["epoch"], df["val_loss"], "o-", label="val")
    a.set(xlabel="epoch", ylabel="contrastive loss")
    a.legend()
    b.plot(df["epoch"], df["val_p10"], "o-", label="text->image P@10")
    b.plot(df["epoch"], df["val_top1"], "o-", label="image->text top-1")
    b.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)


class TrainableEma(ModelEmaV3):
    """timm's ModelEmaV3 over the tensors that change: trainable parameters and the buffers (BatchNorm statistics).
    A frozen tower (the offline preset's text tower) stays as copied: averaging it was 4/5 of the update's cost."""

    def __init__(self, model: torch.nn.Module, **kwargs):
        super().__init__(model, **kwargs)
        ema_p, ema_b = dict(self.module.named_parameters()), dict(self.module.named_buffers())
        self.pairs = [(ema_p[n], p) for n, p in model.named_parameters() if p.requires_grad]
        self.pairs += [(ema_b[n], b) for n, b in model.named_buffers()]

    @torch.no_grad()
    def apply_update_(self, model, decay: float) -> None:     # model: the module given at construction
        floats = [(e, m) for e, m in self.pairs if e.is_floating_point()]
        for e, m in self.pairs:
            if not e.is_floating_point():
                e.copy_(m)                                     # e.g. BatchNorm's num_batches_tracked
        self._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], weight=1.0 - decay)


def diverged(what: str, step: int, epoch: int, out: Path) -> UserError:
    """The one line of a run that diverged: where, what is still good on disk, what to change."""
    kept = [n for n in ("best.pth", "last.pth") if (out / n).is_file()]
    saved = f"{' and '.join(str(out / n) for n in kept)} hold earlier weights" if kept else "nothing was saved yet"
    again = f", or fine-tune from {out / kept[0]} with --init-from" if kept else ""
    return UserError(f"epoch {epoch + 1}, step {step}: {what} (training diverged); {saved}. Train again with lower "
                     f"--lr-image / --lr-head (or --amp off){again}")


def check_finite_loss(loss: torch.Tensor, step: int, epoch: int, out: Path, device) -> None:
    """Stop a diverged run before its optimizer step writes NaN into the weights (and later into best.pth): one line
    on every rank together (all_ranks)."""
    if not all_ranks(bool(torch.isfinite(loss.detach()).all()), device):
        raise diverged(f"the loss is {float(loss.detach()):.4g}; this step's update was not applied", step + 1,
                       epoch, out)


def check_finite_weights(model: torch.nn.Module, step: int, epoch: int, out: Path) -> None:
    """Before anything is validated or saved: weights and buffers (BatchNorm statistics can overflow while the loss
    is still finite) must be finite; no checkpoint is written from a diverged model."""
    bad = next((k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()),
               None)
    if bad:
        raise diverged(f"{bad} holds NaN or infinite values", step, epoch, out)


def check_same_world(path, saved: int, now: int) -> None:
    """A run resumes with the number of processes that wrote it: the position in an epoch is counted in each
    process's batches (rank r takes batches r, r + world, ...) and the schedule in steps of the global batch, so
    another count would skip or repeat data and stretch the learning-rate schedule."""
    if saved != now:
        how = f"python train.py --resume {path}" if saved == 1 else \
            f"torchrun --nproc_per_node {saved} train.py --resume {path} on one machine"
        raise UserError(f"{path}: written by {saved} process(es), resumed with {now}; resume with {saved} in all "
                        f"({how}), or start a new run from its weights with --init-from {path}")


def start_line(cfg, data, steps_per_epoch: int, world: int, total_steps: int) -> str:
    """What a run is about to do: '480 train (60 without a label) / 120 val pairs, 15 steps/epoch x 1 process(es),
    90 steps', with the source side and what validation scores under --exclude-classes."""
    bare = f" ({k} without a label)" if (k := int((data.train_df["label"] == "").sum())) else ""
    side = f"; images over {s} px reduced to it first (--source-side {s})" if (s := cfg.source_side) else ""
    unseen = "; val scores the trained classes only (evaluate.py --unseen: the excluded ones)" \
        if cfg.exclude_classes else ""
    step = cfg.batch_size * cfg.accum_steps
    small = f"; a step takes {step} pairs (--batch-size x --accum-steps), more than there are: each step sees " \
        "all of them" if step > len(data.train_ds) else ""
    warm = f"; --warmup-steps {cfg.warmup_steps} is not below the run's {total_steps} steps: the learning rate " \
        "never leaves its warmup" if cfg.warmup_steps >= total_steps else ""
    return (f"{len(data.train_ds)} train{bare} / {len(data.val_ds)} val pairs, {steps_per_epoch} steps/epoch x "
            f"{world} process(es), {total_steps} steps{side}{unseen}{small}{warm}")


def check_final_path(cfg) -> None:
    """--final-path checked before training: a folder or an unwritable place (check_output_file), the run's own
    best.pth / last.pth, a name that is no model file (captions.csv), or the data's image folder: one line each."""
    final = Path(cfg.final_path)
    check_output_file(final, "--final-path")
    own = {(Path(cfg.out_dir) / n).resolve(): n for n in ("best.pth", "last.pth")}
    if final.resolve() in own:
        raise UserError(f"--final-path {final} is this run's own {own[final.resolve()]}; give a path outside "
                        f"--out-dir {cfg.out_dir} (default: model_final.pth)")
    if final.suffix.lower() not in (".pth", ".pt"):
        raise UserError(f"--final-path {final}: a model file ends in .pth or .pt; give such a name")
    faces = (Path(cfg.data) / cfg.images).resolve()         # a model beside captions.csv is fine; among the faces not
    if final.resolve().is_relative_to(faces):
        raise UserError(f"--final-path {final} is inside the image folder {faces} of --data; write the model "
                        "elsewhere")
