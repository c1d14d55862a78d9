"""train.py end to end on the bundled-style sample: learning, outputs, schedule, resume, bad input."""

import re

import numpy as np
import pandas as pd
import pytest
import torch

import metrics
import train
from config import make_config
from dataset import class_texts, read_captions, split_table
from model import ExprCLIP, load_checkpoint
from transform import Preprocess
from utils import run_cli


def held_out_p10(model, cfg, sample_dir) -> float:
    """Text->image precision@10 per class on the held-out split, computed from scratch (not train.py's code)."""
    cfg = make_config({**cfg.__dict__, "data": str(sample_dir)})
    df = read_captions(cfg)
    _, val = split_table(df, cfg)
    texts = class_texts(df, __import__("captions").load_caption_bank("paper"))
    with torch.no_grad():
        img = model.encode_image(torch.stack([Preprocess(cfg)(p) for p in val["path"]])).numpy()
        names = sorted(texts)
        protos = model.encode_text([texts[n][0] for n in names]).numpy()
    relevant = np.array([[lab == n for lab in val["label"]] for n in names])
    return float(np.mean(metrics.precision_at_k(protos @ img.T, relevant, 10)))


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = make_config(dict(warmup_steps=10, min_lr_ratio=0.1))
    lrs = [train.get_lr(s, cfg, 100) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))          # monotone after warmup
    assert lrs[100] == pytest.approx(0.1) and lrs[55] == pytest.approx(0.55)


def test_param_groups_lrs_and_no_decay_on_1d():
    model = ExprCLIP(make_config(preset="tiny"))
    cfg = model.cfg
    groups = {g["name"]: g for g in train.param_groups(model, cfg)}
    assert groups["image"]["lr"] == cfg.lr_image and groups["text"]["lr"] == cfg.lr_text
    assert groups["head"]["lr"] == cfg.lr_head
    assert all(p.ndim < 2 for n in groups if n.endswith("_nd") for p in groups[n]["params"])
    assert all(g["weight_decay"] == 0 for n, g in groups.items() if n.endswith("_nd"))
    assert any(p is model.logit_scale for p in groups["head_nd"]["params"])
    n_all = sum(len(g["params"]) for g in groups.values())
    assert n_all == len([p for p in model.parameters() if p.requires_grad])


def test_tiny_model_learns_to_retrieve_held_out_faces(trained, sample_dir):
    final, out = trained
    model, cfg = load_checkpoint(final)
    assert held_out_p10(model, cfg, sample_dir) >= 0.9
    torch.manual_seed(123)
    untrained = ExprCLIP(cfg, load_weights=False).eval()
    assert held_out_p10(untrained, cfg, sample_dir) < 0.5


def test_training_writes_metrics_curves_and_checkpoints(trained):
    final, out = trained
    m = pd.read_csv(out / "metrics.csv")
    assert {"epoch", "train_loss", "val_loss", "val_p10", "val_top1"} <= set(m.columns)
    assert m["train_loss"].iloc[-1] < m["train_loss"].iloc[0]
    assert (out / "curves.png").stat().st_size > 1000
    ck = torch.load(final, weights_only=True)
    assert "trainer" not in ck                                  # model_final.pth holds weights + config only
    assert ck["metrics"]["val_top1"] == pytest.approx(m["val_top1"].max())     # best epoch = best val top-1


RESUME_FLAGS = dict(image_size=16, epochs=2, final_path="", batch_size=32, ema_decay=0.9, save_every_min=0)


def resume_cfg(sample_dir, out, **more):
    return make_config({**RESUME_FLAGS, "data": str(sample_dir), "out_dir": str(out), **more}, preset="tiny")


@pytest.fixture(scope="module")
def uninterrupted(sample_dir, tmp_path_factory):
    """The reference: two epochs without a break."""
    ref = train.Trainer(resume_cfg(sample_dir, tmp_path_factory.mktemp("ref")))
    ref.fit()
    return ref


def assert_same_run(ref, other):
    """Every tensor of the model and its EMA bit-identical (weights AND BatchNorm buffers), same per-epoch metrics."""
    assert other.step == ref.step
    for a, b in ((ref.model, other.model), (ref.ema.module, other.ema.module)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    timing = ("seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in other.history] == \
        [{k: v for k, v in r.items() if k not in timing} for r in ref.history]


def resume(sample_dir, out) -> "train.Trainer":
    t = train.Trainer(resume_cfg(sample_dir, out, resume=str(out / "last.pth")))
    t.fit()
    return t


@pytest.mark.parametrize("how", ["signal", "sigterm", pytest.param("raise", marks=pytest.mark.slow),
                                 pytest.param("validate", marks=pytest.mark.slow)])
def test_ctrl_c_mid_step_then_resume_is_bit_identical(uninterrupted, sample_dir, tmp_path, monkeypatch, how):
    """Ctrl-C in the middle of a forward pass (a real SIGINT or SIGTERM, or a KeyboardInterrupt raised there), or while
    validating: the saved state is that of the last whole step, and the resumed run equals the uninterrupted one."""
    import signal
    calls, real_tokens, real_validate = [0], ExprCLIP.encode_tokens, train.Trainer.validate

    def tokens(self, *a, **k):                       # runs after the image tower has moved BatchNorm statistics
        calls[0] += self.training
        if self.training and calls[0] == uninterrupted.steps_per_epoch + 3:    # mid second epoch
            if how == "raise":
                raise KeyboardInterrupt
            signal.raise_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
        return real_tokens(self, *a, **k)

    def validate(self):
        raise KeyboardInterrupt
    if how == "validate":                            # the first epoch's validation
        monkeypatch.setattr(train.Trainer, "validate", validate)
    else:
        monkeypatch.setattr(ExprCLIP, "encode_tokens", tokens)
    b = train.Trainer(resume_cfg(sample_dir, tmp_path))
    with pytest.raises(KeyboardInterrupt):
        b.fit()
    monkeypatch.setattr(ExprCLIP, "encode_tokens", real_tokens)
    monkeypatch.setattr(train.Trainer, "validate", real_validate)
    saved = torch.load(tmp_path / "last.pth", weights_only=True)["trainer"]
    expected = {"raise": uninterrupted.steps_per_epoch + 2, "signal": uninterrupted.steps_per_epoch + 3,
                "sigterm": uninterrupted.steps_per_epoch + 3,
                "validate": uninterrupted.steps_per_epoch}[how]    # a SIGINT lets the step it hit finish
    assert saved["step"] == expected
    assert_same_run(uninterrupted, resume(sample_dir, tmp_path))


class Killed(BaseException):
    """Stands for SIGKILL: nothing in train.py catches it, so nothing is saved on the way out."""


def test_kill_mid_epoch_loses_only_the_steps_since_the_last_periodic_save(uninterrupted, sample_dir, tmp_path,
                                                                         monkeypatch):
    real_step = train.Trainer.train_step

    def killed_at_7(self, batch):
        if self.step == 7:
            raise Killed
        return real_step(self, batch)
    monkeypatch.setattr(train.Trainer, "train_step", killed_at_7)
    with pytest.raises(Killed):
        train.Trainer(resume_cfg(sample_dir, tmp_path, save_every_steps=3)).fit()
    monkeypatch.setattr(train.Trainer, "train_step", real_step)
    assert uninterrupted.steps_per_epoch > 7                               # the kill came in the first epoch
    assert torch.load(tmp_path / "last.pth", weights_only=True)["trainer"]["step"] == 6
    assert_same_run(uninterrupted, resume(sample_dir, tmp_path))


def test_periodic_save_is_on_by_default_every_few_minutes():
    from trainloop import Every
    assert 0 < make_config().save_every_min <= 10
    now = [0.0]
    due = Every(seconds=60 * make_config().save_every_min, clock=lambda: now[0])
    ticks = []
    for _ in range(100):                              # one step every 30 s for 50 minutes
        now[0] += 30
        ticks.append(due())
    assert sum(ticks) == 50 * 60 // (60 * make_config().save_every_min)
    assert not Every(clock=lambda: now[0])()          # 0 and 0: never


def test_resume_from_a_missing_file_names_the_resume_flag(sample_dir, tmp_path, capsys):
    argv = ["--preset", "tiny", "--data", str(sample_dir), "--out-dir", str(tmp_path), "--resume", str(tmp_path / "x")]
    assert run_cli(train.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume" in err and "--checkpoint" not in err and "\n" not in err


def test_ema_follows_its_recursion_and_is_what_gets_saved(sample_dir, tmp_path, monkeypatch):
    decay = 0.9
    t = train.Trainer(make_config(dict(data=str(sample_dir), image_size=32, epochs=1, batch_size=32,
                                       ema_decay=decay, out_dir=str(tmp_path), final_path=str(tmp_path / "f.pth")),
                                  preset="tiny"))
    seen, real_step = [], train.Trainer.train_step

    def step_and_record(self, batch):
        loss = real_step(self, batch)
        seen.append(self.model.logit_scale.detach().clone())
        return loss
    monkeypatch.setattr(train.Trainer, "train_step", step_and_record)
    t.fit()
    ema = seen[0]                                                     # plain reference: timm's warmup decay
    for s, p in enumerate(seen[1:], start=1):
        d = min(decay, 1 - (1 + s) ** (-2 / 3))
        ema = d * ema + (1 - d) * p
    assert torch.allclose(t.ema.module.logit_scale, ema, atol=1e-6)
    assert not torch.allclose(t.model.logit_scale, ema, atol=1e-6)    # the EMA lags the raw weights
    saved = load_checkpoint(tmp_path / "f.pth")[0].state_dict()
    for k, v in t.ema.module.state_dict().items():                    # the EMA weights are the ones saved
        assert torch.equal(saved[k].float(), v.float()), k


def test_bad_input_is_one_line(tmp_path, capsys):
    assert run_cli(train.main, ["--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "captions file not found" in err and "\n" not in err
    (tmp_path / "captions.csv").write_text("img,text\na.png,hello\n")
    assert run_cli(train.main, ["--data", str(tmp_path)]) == 2
    assert "missing required column(s) image, caption" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hostile_log(tmp_path_factory):
    """train.main on a small sample with 2 corrupt training images and a row climbing out of the data folder, its
    output going to files as in a batch job (no terminal, so no progress bar). -> (stdout, stderr)."""
    import contextlib
    import io
    from synth import make_sample
    d = tmp_path_factory.mktemp("hostile")
    table = make_sample(d, per_class=6, size=32, seed=2)             # 40 train / 8 val
    for name in table.loc[table["split"] == "train", "image"].iloc[[0, 5]]:
        (d / "images" / name).write_bytes(b"\x89PNG truncated")
    outside = d.parent / f"{d.name}_outside.png"
    outside.write_bytes((d / "images" / table["image"].iloc[-1]).read_bytes())
    rows = pd.concat([table, pd.DataFrame([dict(image=f"../{outside.name}", caption="x", label="happiness",
                                                split="train")])])
    rows.to_csv(d / "captions.csv", index=False)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run_cli(train.main, ["--preset", "tiny", "--data", str(d), "--image-size", "32", "--batch-size", "8",
                                  "--epochs", "2", "--log-every", "2", "--log-seconds", "0", "--num-workers", "0",
                                  "--out-dir", str(d / "run"), "--final-path", ""])
    assert rc == 0, err.getvalue()[-2000:]
    return out.getvalue(), err.getvalue()


def test_log_without_a_terminal_gets_plain_progress_lines(hostile_log):
    out, _ = hostile_log
    lines = re.findall(r"^epoch (\d)/2 step (\d+)/10  loss \d+\.\d{4}  \d+\.\d img/s$", out, re.M)
    assert lines == [("1", "2"), ("1", "4"), ("2", "7"), ("2", "9")]         # every --log-every 2 steps


def test_unreadable_images_get_one_line_each_and_an_epoch_summary(hostile_log):
    out, err = hostile_log
    skips = [l for l in err.splitlines() if "unreadable" in l]
    assert len(skips) == 4 and all(l.startswith("skipping unreadable image ") for l in skips)   # 2 per epoch
    assert "Warning" not in err and "warn(" not in err
    for epoch in (1, 2):
        assert re.search(rf"^epoch {epoch}: 2 unreadable images skipped \(first: .+\.png\)$", out, re.M)


def test_training_refuses_a_row_outside_the_data_folder(hostile_log):
    _, err = hostile_log
    (line,) = [l for l in err.splitlines() if "outside" in l]
    assert "1 of 49 relative image paths outside" in line and "_outside.png" in line


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_torchrun_two_processes_train_end_to_end(sample_dir, tmp_path, accum):
    """train.py under torchrun (2 processes, gloo on CPU): rank 0 logs and writes checkpoints, the run completes;
    also with gradient accumulation (accum.py gathers the cached embeddings of both ranks)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "train.py"), "--preset", "tiny", "--data", str(sample_dir), "--image-size", "32",
           "--batch-size", "16", "--epochs", "1", "--max-steps", "3", "--out-dir", str(out),
           "--final-path", str(out / "final.pth"), "--accum-steps", str(accum)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "x 2 process(es)" in p.stdout and p.stdout.count("epoch 1:") == 1      # only rank 0 prints
    model, cfg = load_checkpoint(out / "final.pth")
    assert pd.read_csv(out / "metrics.csv")["step"].iloc[-1] == 3


@pytest.mark.slow
def test_torchrun_ranks_skip_a_batch_together_when_one_ranks_faces_are_all_unreadable(tmp_path):
    """Two faces a process, half the files garbage: at some steps one rank has fewer than two faces to train on. It
    used to skip alone and leave the other waiting in the step's collectives (a hang until gloo's 30-minute
    timeout), or fail in BatchNorm on a single face."""
    import subprocess
    import sys
    from pathlib import Path

    from synth import make_sample
    make_sample(tmp_path / "data", per_class=4, size=32, seed=1)
    for f in sorted((tmp_path / "data" / "images").iterdir())[::2]:
        f.write_text("garbage")
    root, out = Path(__file__).resolve().parents[1], tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "train.py"), "--preset", "tiny", "--data", str(tmp_path / "data"), "--image-size", "32",
           "--batch-size", "2", "--epochs", "1", "--out-dir", str(out), "--final-path", "", "--num-workers", "0"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert torch.load(out / "last.pth", weights_only=True)["trainer"]["epoch"] == 1
    rows = pd.read_csv(tmp_path / "data" / "captions.csv")
    bad = sum((tmp_path / "data" / "images" / Path(p).name).read_bytes() == b"garbage"
              for p in rows[rows["split"] == "train"]["image"])
    assert len(rows[rows["split"] == "train"]) == 24 and f"epoch 1: {bad} unreadable images skipped" in p.stdout  # both ranks'



def test_too_few_faces_for_a_validation_split_still_publishes_the_latest_epoch(tmp_path, capfd):
    from synth import make_sample
    make_sample(tmp_path, per_class=2, size=48, seed=1)                 # 2 a class: 10% of 2 rounds to 0
    pd.read_csv(tmp_path / "captions.csv").drop(columns="split").to_csv(tmp_path / "captions.csv", index=False)
    final = tmp_path / "final.pth"
    assert train.main(["--preset", "tiny", "--caption-bank", "paper", "--image-size", "32", "--batch-size", "8",
                       "--epochs", "2", "--data", str(tmp_path), "--out-dir", str(tmp_path / "run"),
                       "--final-path", str(final), "--num-workers", "0"]) == 0
    assert "no validation pairs" in capfd.readouterr().err
    assert torch.load(final, weights_only=True)["epoch"] == 2                   # the latest, not none at all


def test_a_folder_as_final_path_is_refused_before_training_and_left_where_it_is(sample_dir, tmp_path, capsys):
    keep = tmp_path / "models"
    keep.mkdir()
    (keep / "mine.pth").write_text("x")
    argv = ["--preset", "tiny", "--data", str(sample_dir), "--out-dir", str(tmp_path / "run"), "--final-path", str(keep)]
    assert run_cli(train.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --final-path {keep}: is a folder") and "\n" not in err
    assert (keep / "mine.pth").read_text() == "x" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--out-dir", "--image-weights"])
def test_a_file_where_a_folder_goes_or_an_empty_weights_file_is_one_line(sample_dir, tmp_path, capsys, flag):
    (tmp_path / "afile").write_bytes(b"")
    argv = ["--preset", "tiny", "--data", str(sample_dir), "--out-dir", str(tmp_path / "run"), "--final-path", "",
            flag, str(tmp_path / "afile")]
    assert run_cli(train.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'afile'}: ") and "\n" not in err and "Traceback" not in err
    assert (tmp_path / "afile").read_bytes() == b""


def test_the_start_line_counts_unlabelled_rows_says_what_validation_scores_and_notes_a_batch_over_the_data():
    from types import SimpleNamespace

    import pandas as pd

    from config import make_config
    from trainloop import start_line
    data = SimpleNamespace(train_df=pd.DataFrame({"label": ["happiness", "", "", "fear"]}), train_ds=[0] * 4,
                           val_ds=[0] * 2)
    line = start_line(make_config(dict(exclude_classes="fear")), data, 2, 1, 12)
    assert line.startswith("4 train (2 without a label) / 2 val pairs, 2 steps/epoch x 1 process(es), 12 steps")
    assert "val scores the trained classes only" in line
    data.train_df = pd.DataFrame({"label": ["happiness"] * 4})
    assert start_line(make_config(dict(batch_size=2, warmup_steps=5)), data, 2, 1, 12) == \
        "4 train / 2 val pairs, 2 steps/epoch x 1 process(es), 12 steps"
    assert start_line(make_config(dict(batch_size=16, warmup_steps=5)), data, 1, 1, 6).endswith(
        "; a step takes 16 pairs (--batch-size x --accum-steps), more than there are: each step sees all of them")


@pytest.mark.parametrize("how", ["loss", "buffer"])
def test_a_run_that_diverges_stops_in_one_line_and_publishes_nothing(sample_dir, tmp_path, capsys, monkeypatch, how):
    """A NaN loss stops before its update; a weight or BatchNorm buffer gone non-finite while the loss still looked
    fine stops before anything is validated or saved. Either way no checkpoint holds a NaN and nothing is published."""
    real_loss, real_step = train.Trainer.forward_loss, train.Trainer.train_step
    if how == "loss":                                              # diverges in the second epoch (7 steps each)
        monkeypatch.setattr(train.Trainer, "forward_loss", lambda self, batch, net=None: real_loss(self, batch, net)
                            * (float("nan") if self.step >= 9 else 1))
    else:
        def overflow(self, batch):
            loss = real_step(self, batch)
            if self.step == 10:
                next(v for v in self.model.state_dict().values() if v.is_floating_point()).fill_(float("inf"))
            return loss
        monkeypatch.setattr(train.Trainer, "train_step", overflow)
    out, final = tmp_path / "run", tmp_path / "final.pth"
    argv = ["--preset", "tiny", "--caption-bank", "paper", "--image-size", "32", "--epochs", "2", "--augment",
            "false", "--batch-size", "64", "--data", str(sample_dir), "--out-dir", str(out), "--final-path",
            str(final), "--num-workers", "0"]
    assert run_cli(train.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    what = "the loss is nan; this step's update was not applied" if how == "loss" else "holds NaN or infinite values"
    assert err.startswith("error: epoch 2, step ") and what in err and "(training diverged)" in err, err
    assert f"{out / 'best.pth'} and {out / 'last.pth'} hold earlier weights" in err and "--lr-image" in err
    assert not final.exists()                                     # nothing published from a diverged run
    assert torch.load(out / "best.pth", weights_only=True)["epoch"] == 1
    for name in ("best.pth", "last.pth"):
        sd = torch.load(out / name, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()), name


def test_the_divergence_line_says_when_nothing_was_saved_yet(tmp_path):
    from trainloop import diverged
    msg = str(diverged("the loss is nan", 3, 0, tmp_path))
    assert "nothing was saved yet" in msg and "--init-from" not in msg and "best.pth" not in msg


def test_max_steps_mid_epoch_saves_that_position_so_a_resume_trains_the_rest_of_the_epoch(uninterrupted, sample_dir,
                                                                                         tmp_path, caplog):
    cut = train.Trainer(resume_cfg(sample_dir, tmp_path, max_steps=3))      # 3 < warmup: same LRs as uninterrupted
    with caplog.at_level("INFO"):
        cut.fit()
    t = torch.load(tmp_path / "last.pth", weights_only=True)["trainer"]
    assert (t["epoch"], t["batch_in_epoch"], t["step"]) == (0, 3, 3)
    assert cut.history[-1]["partial"] == f"3/{uninterrupted.steps_per_epoch} batches" and "(partial: 3/" in caplog.text
    other = resume(sample_dir, tmp_path)
    other.history = [r for r in other.history if not r["partial"]]
    assert_same_run(uninterrupted, other)                                     # no batch lost, none repeated


@pytest.mark.parametrize("name, why", [("run/best.pth", "this run's own best.pth"),
                                       ("run/last.pth", "this run's own last.pth"),
                                       ("model.csv", "a model file ends in .pth or .pt"),
                                       ("DATA/images/m.pth", "is inside the image folder")])
def test_a_final_path_over_the_runs_own_files_or_the_data_is_refused_before_training(sample_dir, tmp_path, capsys,
                                                                                     name, why):
    final = str(tmp_path / name).replace(str(tmp_path / "DATA"), str(sample_dir))
    argv = ["--preset", "tiny", "--data", str(sample_dir), "--out-dir", str(tmp_path / "run"), "--final-path", final]
    assert run_cli(train.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert why in err and "\n" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("device", ["banana", "", "meta", "mps", "cuda:99"])
def test_a_device_this_machine_cannot_use_is_one_line_naming_the_flag(device):
    from utils import UserError, pick_device
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(UserError, match=r"^--device "):
        pick_device(device)


def test_the_start_line_warns_when_warmup_outlasts_the_run(tiny_cfg):
    from types import SimpleNamespace
    from trainloop import start_line
    df = pd.DataFrame(dict(label=["happy"] * 4))
    data = SimpleNamespace(train_df=df, train_ds=[0] * 4, val_ds=[])
    assert "never leaves its warmup" in start_line(tiny_cfg, data, 2, 1, 5)         # tiny: 5 warmup steps
    assert "warmup" not in start_line(tiny_cfg, data, 2, 1, 6)
