"""train.py end to end on the bundled-style sample: learning, outputs, schedule, resume, bad input."""

import numpy as np
import pandas as pd
import pytest
import torch

import metrics
import train
from config import make_config
from dataset import class_texts, load_image_tensor, read_table, split_table
from model import ExprCLIP, load_checkpoint
from utils import run_cli


def held_out_p10(model, cfg, sample_dir) -> float:
    """Text->image precision@10 per class on the held-out split, computed from scratch (not train.py's code)."""
    cfg = make_config({**cfg.__dict__, "data": str(sample_dir)})
    df = read_table(cfg)
    _, val = split_table(df, cfg)
    texts = class_texts(df, __import__("captions").load_caption_bank("paper"))
    with torch.no_grad():
        img = model.encode_image(torch.stack([load_image_tensor(p, cfg) for p in val["path"]])).numpy()
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


def test_ctrl_c_saves_and_resume_continues_exactly(sample_dir, tmp_path, monkeypatch):
    flags = dict(data=str(sample_dir), image_size=32, epochs=2, final_path="", batch_size=32, ema_decay=0.9)
    ref = train.Trainer(make_config({**flags, "out_dir": str(tmp_path / "a")}, preset="tiny"))
    ref.fit()

    real_step = train.Trainer.train_step

    def interrupted(self, batch):
        if self.step == ref.steps_per_epoch + 2:                  # mid second epoch
            raise KeyboardInterrupt
        return real_step(self, batch)
    monkeypatch.setattr(train.Trainer, "train_step", interrupted)
    b = train.Trainer(make_config({**flags, "out_dir": str(tmp_path / "b")}, preset="tiny"))
    with pytest.raises(KeyboardInterrupt):
        b.fit()
    monkeypatch.setattr(train.Trainer, "train_step", real_step)
    resumed = train.Trainer(make_config({**flags, "out_dir": str(tmp_path / "b"),
                                         "resume": str(tmp_path / "b" / "last.pth")}, preset="tiny"))
    assert resumed.step == ref.steps_per_epoch + 2
    resumed.fit()
    assert resumed.step == ref.step
    for (k, a), c in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), c.float(), atol=1e-5), k
    for (k, a), c in zip(ref.ema.module.state_dict().items(), resumed.ema.module.state_dict().values()):
        assert torch.allclose(a.float(), c.float(), atol=1e-5), k       # the weight EMA resumes too


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
