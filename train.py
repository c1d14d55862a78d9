"""Train ExprCLIP on captions.csv.   python train.py --preset offline   |   python train.py --epochs 5 --image-model vit_base_patch16_224

Each epoch: train, then validation loss + retrieval accuracy (text->image precision@10 per class, image->text top-1),
an atomic checkpoint (out_dir/last.pth), metrics.csv and curves.png. When the run finishes, its best epoch
(out_dir/best.pth) is copied to --final-path (model_final.pth); a model already there is kept, renamed aside
(model_final.YYYYmmdd-HHMMSS.pth), and the log names it. A killed run never touches --final-path.
last.pth is also saved mid-epoch every --save-every-min minutes, so a kill loses at most that much. `--resume
out_dir/last.pth` continues exactly (bit-identical weights and BatchNorm statistics); Ctrl-C or SIGTERM stops after
the current step and saves first. Without a terminal, a plain progress line every --log-every steps / --log-seconds.
Multi-GPU: torchrun --nproc_per_node N train.py ...
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import validation
from config import Config, add_config_args, config_from_args
from dataset import Collate, EpochBatches, build_train_data, class_sentences
from accum import accumulated_backward
from distributed import all_ranks, cleanup, gather_for_loss, init_distributed, sum_over_ranks, sync_grads
from logs import get_logger, setup_logging
from loss import make_loss
from mixup import mix_batch
from checkpoint import (checkpoint_payload, init_from_config, load_weights_into, publish_final, read_checkpoint,
                        resume_config, save_checkpoint)
from model import ExprCLIP
from precision import amp_setup
from samplers import epoch_batches
from trainloop import (BufferSnapshot, DeferredInterrupt, Every, ProgressLines, SkipCount, TrainableEma,
                       check_final_path, check_finite_loss, check_finite_weights, check_same_world, get_lr,
                       param_groups, start_line, write_logs)
from utils import UserError, atomic_save, first_line, pick_device, run_cli, seed_everything

log = get_logger(__name__)
BN_CALIBRATION_FACES = 2048          # --image-bn fold: faces whose statistics are folded (~10 s at 64 px on 2 cores)


class Trainer:
    """One training run: data (dataset.build_train_data), model and optimizer, then fit(): train_epoch and
    end_epoch (validate, log, checkpoint) until cfg.epochs or cfg.max_steps; resumable from last.pth."""

    def __init__(self, cfg: Config, checkpoint: dict | None = None):
        """checkpoint: cfg.resume's (or cfg.init_from's) file as read_checkpoint returned it, when the caller has
        read it already (main: for the config); otherwise it is read here."""
        self.cfg = cfg
        if cfg.resume and not Path(cfg.resume).is_file():       # before minutes of setup
            raise UserError(f"--resume {cfg.resume}: no such checkpoint file; pass the last.pth an earlier run "
                            "wrote in its --out-dir")
        if cfg.final_path:
            check_final_path(cfg)                               # before minutes of training, not after them
        self.rank, self.world, local_rank = init_distributed()
        self.is_main = self.rank == 0
        self.device = torch.device("cuda", local_rank) if self.world > 1 and torch.cuda.is_available() \
            else pick_device(cfg.device)
        seed_everything(cfg.seed)
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.data = build_train_data(cfg)
        if self.world > 1 and self.data.train_classes is not None:
            raise UserError("--targets soft / --contrast classes run in one process for now (not under torchrun)")
        self.steps_per_epoch = len(self.train_batches(0))      # too few batches for the processes: said before the model
        checkpoint = self.build_model(local_rank, checkpoint)      # --resume's file: read once, for load_state too
        self.collate = Collate(self.model.tokenizer, cfg.max_length)
        self.epoch_batches = EpochBatches()          # one loader for the run: its workers persist across epochs
        self.train_loader = self.loader(self.data.train_ds, self.epoch_batches, persistent=True)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.loss_fn = make_loss(cfg)
        # fused AdamW: one kernel for all tensors (4x faster than the per-tensor loop on a 2-core CPU, where the
        # loop was a fifth of an EfficientNet-Lite0 step); same update rule
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg), betas=(0.9, 0.98), eps=1e-6,
                                     fused=self.device.type in ("cpu", "cuda"))
        self.autocast, self.scaler = amp_setup(cfg, self.device)
        self.step, self.epoch, self.batch_in_epoch, self.best, self.history = 0, 0, 0, -math.inf, []
        self.epoch_losses, self.skips = [], SkipCount()      # this epoch so far (saved: a resumed epoch reports all)
        self.guard = DeferredInterrupt(deferred=self.world == 1)   # torchrun: ranks must not stop at different steps
        self.buffers = BufferSnapshot(self.model)
        self.autosave = Every(cfg.save_every_steps, 60 * cfg.save_every_min)
        if cfg.resume:
            self.load_state(cfg.resume, checkpoint)

    def build_model(self, local_rank: int, ck: dict | None = None) -> dict | None:
        """self.model on its device (channels-last), its weight EMA, compiled towers, and self.net: what the training
        step calls, DDP-wrapped under torchrun. ck: cfg.resume's (or cfg.init_from's) dict if read; returned."""
        cfg = self.cfg
        class_names = list(self.data.label_vocab) if cfg.objective == "ce" else None
        if cfg.resume:        # every weight comes from last.pth: the source weights file, folder or hub is not read
            from checkpoint import rebuild_model
            ck = ck if ck is not None else read_checkpoint(cfg.resume, hint="--resume")
            self.model = rebuild_model(ck, cfg, cfg.resume, class_names)
        elif cfg.init_from:
            from checkpoint import init_model
            ck = ck if ck is not None else read_checkpoint(cfg.init_from, hint="--init-from")
            self.model = init_model(ck, cfg, cfg.init_from, class_names)
            log.info(f"weights from {cfg.init_from} (fine-tuning)")
        else:
            self.model = ExprCLIP(cfg, class_names=class_names, calibrate=self.calibrate_bn)
        self.model = self.model.to(self.device)
        self.channels_last = cfg.channels_last and self.device.type in ("cuda", "cpu")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # weight EMA (open_clip/timm style): validated, selected and saved instead of the raw weights
        self.ema = TrainableEma(self.model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema_decay > 0 else None
        if cfg.compile:
            self.model.image_encoder.compile(), self.model.text_encoder.compile()
        self.net = self.model
        if self.world > 1:      # accumulation (accum.py) calls self.model and syncs gradients itself; BatchNorm
                                # statistics then stay per rank (rank 0's are saved)
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[local_rank] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.objective == "ce")
        return ck

    def calibrate_bn(self, encoder: torch.nn.Module) -> None:
        """--image-bn fold: BatchNorm statistics over the first BN_CALIBRATION_FACES training faces, as epoch 0
        augments them (a cumulative average, no gradients: torch's swa_utils.update_bn), before they are folded."""
        idx = [i for b in self.train_batches(0) for i in b][:BN_CALIBRATION_FACES]
        size = self.cfg.batch_size

        def batches():
            for k in range(0, len(idx), size):
                items = [self.data.train_ds[(0, i)] for i in idx[k:k + size]]
                if pixels := [it[0] for it in items if isinstance(it, tuple)]:
                    yield torch.stack(pixels)                      # [B, 3, H, W]
        torch.optim.swa_utils.update_bn(batches(), encoder.to(self.device), device=self.device)
        log.info(f"BatchNorm statistics re-estimated on {len(idx)} training faces, folded into the convolutions")

    # ------------------------------------------------------------------ data
    def train_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of the epoch, as index lists (samplers.epoch_batches)."""
        labels = [self.data.label_vocab.get(l, -1) for l in self.data.train_df["label"]]
        return epoch_batches(labels, self.cfg, epoch, self.rank, self.world)

    def loader(self, ds, batches, persistent: bool = False) -> torch.utils.data.DataLoader:
        cfg = self.cfg
        return torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=self.collate,
                                           num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                                           persistent_workers=persistent and cfg.num_workers > 0)

    # ------------------------------------------------------------------ steps
    def forward_loss(self, batch, net=None) -> torch.Tensor:
        """The configured loss (loss.make_loss) over the batch: the CLIP loss over the (global, under torchrun)
        batch's captions, the soft loss over class distributions, or cross-entropy for objective=ce."""
        dev, net = self.device, net or self.net
        pixels = batch["pixels"].to(dev, non_blocking=True)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        targets = dict(groups=batch["groups"].to(dev), labels=batch["labels"].to(dev))
        if self.cfg.contrast == "classes":          # every sentence of every trained class, each step
            ids, mask, targets["text_class"] = self.class_sentences
            text_index = None
        else:
            ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
            text_index = batch["text_index"].to(dev)
            if "dist" in batch:                     # a caption's class is its image's label (drawn by label)
                targets["text_class"] = self.data.caption_class[batch["labels"]].to(dev)
        if "dist" in batch:
            targets["dist"] = batch["dist"].to(dev)
        with self.autocast():
            out = net(pixels, ids, mask, text_index)
        if self.world > 1 and net is self.net and not self.loss_fn.rowwise:
            out["image_features"], out["text_features"], targets["groups"] = gather_for_loss(
                out["image_features"].float(), out["text_features"].float(), targets["groups"])
        return self.loss_fn(out, targets)

    @property
    def class_sentences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every sentence of every trained class, tokenized once: (ids [M, L], mask [M, L], class index [M])."""
        if getattr(self, "_class_sentences", None) is None:
            texts, index = class_sentences(self.data.class_texts, self.data.train_classes)
            tok = self.model.tokenize(texts)
            self._class_sentences = (tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device),
                                     torch.tensor(index, device=self.device))
        return self._class_sentences

    def train_step(self, batch) -> float:
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.step)   # dropout etc.: a function of the step (exact resume)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * get_lr(self.step, self.cfg, self.total_steps)
        self.opt.zero_grad(set_to_none=True)
        backward = (lambda l: self.scaler.scale(l).backward()) if self.scaler is not None else (lambda l: l.backward())
        if self.cfg.accum_steps > 1:
            if self.channels_last:
                batch = dict(batch, pixels=batch["pixels"].contiguous(memory_format=torch.channels_last))
            loss = accumulated_backward(self.model, batch, self.cfg.accum_steps, self.autocast, backward,
                                        self.device, self.loss_fn)
            sync_grads(self.model, average=self.loss_fn.rowwise)   # all-reduce under torchrun; no-op otherwise
        else:
            if self.cfg.mixup or self.cfg.cutmix:          # targets are distributions here (config checks it)
                pixels, dist, _ = mix_batch(batch["pixels"], batch["dist"], self.cfg.mixup, self.cfg.cutmix)
                batch = dict(batch, pixels=pixels, dist=dist)
            loss = self.forward_loss(batch)
            backward(loss)
        check_finite_loss(loss, self.step, self.epoch, self.out, self.device)
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        return float(loss.detach())

    def train_epoch(self) -> float:
        """Train from batch_in_epoch (where a resumed run stopped) to the epoch's end; the whole epoch's mean loss."""
        self.model.train()
        todo = self.train_batches(self.epoch)[self.batch_in_epoch:]
        self.epoch_batches.set(self.epoch, todo)
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                   leave=False, dynamic_ncols=True, disable=None if self.is_main else True)
        lines = ProgressLines(self.cfg.log_every, self.cfg.log_seconds, self.total_steps) \
            if self.is_main and (bar.disable or not sys.stdout.isatty()) else None      # logs get plain lines
        for k, (batch, indices) in enumerate(zip(bar, todo)):
            with self.guard.step():                 # a Ctrl-C lands between steps, never inside one
                loss = self.guarded_step(batch, indices)
            if loss is not None:
                self.show_progress(bar, lines, loss, len(batch["labels"]))
            if self.step >= self.total_steps:
                break
            if self.is_main and k < len(todo) - 1 and self.autosave():   # mid-epoch: a kill loses minutes, not an epoch
                self.save_last()
        return float(np.mean(self.epoch_losses)) if self.epoch_losses else float("nan")

    def guarded_step(self, batch, indices: list[int]) -> float | None:
        """train_step plus the epoch's bookkeeping; interrupted before its optimizer update, the step is undone (its
        forward pass already moved the BatchNorm statistics). None (skipped) when fewer than two of the batch's images
        could be read, on any rank: all skip together (one alone would leave the others waiting in its collectives)."""
        if not all_ranks(batch is not None and len(batch["labels"]) > 1, self.device):
            self.skips.add(batch["unreadable"] if batch else [self.data.train_ds.df["path"].iloc[i] for i in indices])
            self.batch_in_epoch += 1
            return None
        step = self.step
        self.buffers.take()
        try:
            loss = self.train_step(batch)
        except KeyboardInterrupt:
            if self.step == step:
                self.buffers.restore()
            else:                                   # interrupted after the update: the batch counts as done
                self.batch_in_epoch += 1
            raise
        self.skips.add(batch["unreadable"])
        self.epoch_losses.append(loss)
        self.batch_in_epoch += 1
        return loss

    def show_progress(self, bar, lines: ProgressLines | None, loss: float, images: int) -> None:
        """Loss and temperature on the progress bar; a plain line now and then when stdout is a log (rank 0)."""
        every = self.cfg.log_every
        if not bar.disable and self.batch_in_epoch % every == 0:
            bar.set_postfix(loss=f"{np.mean(self.epoch_losses[-every:]):.3f}", T=f"{1 / self.model.scale().item():.3f}")
        text = lines and lines.line(f"epoch {self.epoch + 1}/{self.cfg.epochs}", self.step, loss, images * self.world)
        if text:
            log.info(text)

    @property
    def eval_model(self) -> ExprCLIP:
        """The weights that are validated and saved: the EMA copy when --ema-decay > 0."""
        return self.ema.module if self.ema is not None else self.model

    def validate(self) -> dict:
        """Val loss, text->image precision@10 per class (mean), image->text top-1 (validation.validate)."""
        model, n, bs = self.eval_model, len(self.data.val_ds), self.cfg.batch_size
        model.eval()
        batches = self.loader(self.data.val_ds, [list(range(k, min(n, k + bs))) for k in range(0, n, bs)])
        return validation.validate(model, batches, lambda b: self.forward_loss(b, net=model), self.data.class_texts,
                                   self.data.label_vocab, self.cfg.objective, self.device, self.autocast)

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return dict(optimizer=self.opt.state_dict(), scaler=self.scaler.state_dict() if self.scaler else None,
                    step=self.step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch, best=self.best, world=self.world,
                    history=self.history, epoch_losses=list(self.epoch_losses),
                    skipped=[self.skips.count, self.skips.first],
                    ema={k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()} if self.ema else None)

    def save_last(self) -> None:
        check_finite_weights(self.model, self.step, self.epoch, self.out)
        atomic_save(checkpoint_payload(self.model, label_counts=self.data.label_counts, trainer=self.state()),
                    self.out / "last.pth")
        self.autosave.reset()

    def load_state(self, path: str, ck: dict | None = None) -> None:
        """Weights, optimizer, EMA and progress from last.pth (ck: that file already read, or None to read it)."""
        ck = ck if ck is not None else read_checkpoint(path, hint="--resume")
        if "trainer" not in ck:
            raise UserError(f"{path}: holds weights only (no optimizer state); resume from out_dir/last.pth")
        try:
            load_weights_into(self.model, ck, path=path)       # compact: frozen package towers by reference
            self.opt.load_state_dict(ck["trainer"]["optimizer"])
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{path}: was trained with another config ({first_line(e)}); "
                            "resume with the same flags")
        t = ck["trainer"]
        check_same_world(path, t.get("world", self.world), self.world)
        if self.scaler and t["scaler"]:
            self.scaler.load_state_dict(t["scaler"])
        if self.ema is not None:    # a run that had no EMA yet starts it from the resumed weights
            load_weights_into(self.ema.module, ck, state_dict=t.get("ema") or ck["state_dict"], path=path)
        self.step, self.epoch, self.batch_in_epoch = t["step"], t["epoch"], t["batch_in_epoch"]
        self.best, self.history = t["best"], list(t["history"])
        self.epoch_losses, self.skips = list(t.get("epoch_losses", [])), SkipCount(*t.get("skipped", (0, "")))
        log.info(f"resumed from {path}: epoch {self.epoch + 1}, batch {self.batch_in_epoch}, step {self.step}")
        if self.epoch >= self.cfg.epochs or self.step >= self.total_steps:
            log.warning(f"{path}: the run already trained {self.epoch} of {self.cfg.epochs} epochs (step "
                        f"{self.step}); nothing left to train: pass --epochs N (more than {self.epoch}) to go on")

    def end_epoch(self, train_loss: float, seconds: float) -> None:
        """Validate (rank 0), log, checkpoint (last.pth always; best.pth and final_path when improved). The state
        moves on to the next epoch in one Ctrl-C-deferred block: interrupted before it (say while validating), a
        resumed run repeats just this epoch's end, with the same numbers. An epoch cut short by --max-steps stays
        where it stopped (its row says partial): a resumed run trains the rest of it."""
        check_finite_weights(self.model, self.step, self.epoch, self.out)     # on every rank: the same weights
        total = len(self.train_batches(self.epoch))
        partial = self.batch_in_epoch < total
        skipped = self.skips.summary(self.epoch + 1, sum_over_ranks(self.skips.count, self.device))   # every rank's
        val = self.validate() if self.is_main else {}
        row = dict(epoch=self.epoch + 1, step=self.step, train_loss=train_loss, **val,
                   lr_image=self.opt.param_groups[0]["lr"], temperature=1 / self.model.scale().item(),
                   seconds=round(seconds, 1), images_per_s=round(
                       self.batch_in_epoch * self.cfg.batch_size * self.world / max(seconds, 1e-3), 1))
        row["partial"] = f"{self.batch_in_epoch}/{total} batches" if partial else ""
        with self.guard.step():
            if not partial:
                self.epoch, self.batch_in_epoch, self.epoch_losses, self.skips = self.epoch + 1, 0, [], SkipCount()
            if not self.is_main:
                return
            self.history.append(row)
            score = -row["val_loss"] if self.cfg.select_by == "val_loss" else row[self.cfg.select_by]
            score = -row["val_loss"] if math.isnan(score) else score     # unlabelled data: fall back to the loss
            if math.isnan(score) or score > self.best:     # nan: no validation pairs at all, the latest epoch is kept
                self.best = self.best if math.isnan(score) else score
                save_checkpoint(self.out / "best.pth", self.eval_model, epoch=row["epoch"], metrics=row,
                                label_counts=self.data.label_counts)
            self.save_last()
        write_logs(self.history, self.out)
        log.info("epoch {epoch}: train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  val_p@10 {val_p10:.3f}  "
                 "val_top1 {val_top1:.3f}  {images_per_s} img/s".format(**row)
                 + (f"  (partial: {row['partial']}; --resume {self.out / 'last.pth'} trains the rest)" if partial
                    else ""))
        if skipped:
            log.info(skipped)

    def fit(self) -> list[dict]:
        if self.epoch < self.cfg.epochs and self.step < self.total_steps:     # else "nothing left to train" was said
            log.info(f"training on {self.device}: " + start_line(self.cfg, self.data, self.steps_per_epoch,
                                                                 self.world, self.total_steps))
        if self.is_main and len(self.data.val_ds) == 0:
            log.warning("no validation pairs (too few faces per class to carve --val-fraction out of, and no `val` "
                        "rows in the split column): best.pth will be the latest epoch, not the best one")
        trained_before = len(self.history)
        try:
            with self.guard:                        # Ctrl-C: stop after the current step (see DeferredInterrupt)
                while self.epoch < self.cfg.epochs and self.step < self.total_steps:
                    t0 = time.time()
                    loss = self.train_epoch()
                    self.end_epoch(loss, time.time() - t0)
        except KeyboardInterrupt:
            if self.is_main:                        # the one line under torchrun too (rank 0 saves)
                self.save_last()
                log.warning(f"\ninterrupted: saved {self.out / 'last.pth'} (step {self.step}); "
                            f"continue with --resume {self.out / 'last.pth'}")
            raise
        if self.cfg.final_path and self.is_main and len(self.history) > trained_before:
            publish_final(self.out / "best.pth", Path(self.cfg.final_path))
        return self.history


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    args = ap.parse_args(argv)
    changed, ck = [], None          # ck: the checkpoint read for the config, handed on (each file is read once)
    if args.resume:
        cfg, changed, ck = resume_config(args)
    elif args.init_from:
        cfg, ck = init_from_config(args)
    else:
        cfg = config_from_args(args)
    setup_logging(cfg.log_level)        # rank-aware: under torchrun, ranks > 0 log warnings only
    for line in changed:
        log.info(f"resume: {line} (given on the command line)")
    try:
        trainer, ck = Trainer(cfg, ck), None      # the dict is not held through training
        trainer.fit()
    except BaseException:
        cleanup(wait=False)
        raise
    cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
