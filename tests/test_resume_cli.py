"""train.py --resume as the README gives it (no other flag), the flags allowed on top, and what a run may
replace (--final-path)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train
from utils import UserError

FLAGS = ["--preset", "tiny", "--image-size", "16", "--batch-size", "32", "--augment", "false", "--ema-decay", "0",
         "--num-workers", "0", "--save-every-min", "0", "--caption-bank", "paper"]


@pytest.fixture(scope="module")
def one_epoch(sample_dir, tmp_path_factory):
    """A one-epoch run whose final model goes to a user's project folder that already holds their model."""
    d = tmp_path_factory.mktemp("run")
    (d / "project").mkdir()
    mine = d / "project" / "model_final.pth"
    mine.write_bytes(b"the user's own model")
    assert train.main(FLAGS + ["--data", str(sample_dir), "--epochs", "1", "--out-dir", str(d / "out"),
                               "--final-path", str(mine)]) == 0
    return d


def test_a_finished_run_keeps_the_model_it_did_not_write_under_a_logged_name(one_epoch):
    kept = [p for p in (one_epoch / "project").glob("model_final.*.pth")]
    assert len(kept) == 1 and kept[0].read_bytes() == b"the user's own model"
    assert "trainer" not in torch.load(one_epoch / "project" / "model_final.pth", weights_only=True)


def test_resume_with_no_other_flag_takes_the_runs_own_config_and_more_epochs_go_on(one_epoch, capsys):
    last = one_epoch / "out" / "last.pth"
    assert train.main(["--resume", str(last)]) == 0                        # not the paper preset: no hub download
    out = capsys.readouterr()
    assert "nothing left to train" in out.err and "written" not in out.out    # and the final model untouched
    assert "training on" not in out.out                                        # no start line for no training
    assert train.main(["--resume", str(last), "--epochs", "2", "--final-path", ""]) == 0
    out = capsys.readouterr().out
    assert "resume: --epochs 1 -> 2" in out and "epoch 2:" in out
    ck = torch.load(last, weights_only=True)
    assert ck["trainer"]["epoch"] == 2 and ck["config"]["image_size"] == 16


@pytest.mark.parametrize("flag", [["--image-size", "32"], ["--lr-head", "0.5"], ["--data", "elsewhere"],
                                  ["--preset", "offline"]])
def test_resume_refuses_a_flag_that_changes_the_model_data_or_schedule(one_epoch, flag):
    with pytest.raises(UserError, match="would change the resumed run") as e:
        train.main(["--resume", str(one_epoch / "out" / "last.pth")] + flag)
    assert flag[0] in str(e.value) and "\n" not in str(e.value)


def test_resume_refuses_another_number_of_processes_than_wrote_the_run(one_epoch, tmp_path):
    """The epoch position is counted in each process's batches: 2 processes -> 1 would repeat or skip data."""
    ck = torch.load(one_epoch / "out" / "last.pth", weights_only=True)
    assert ck["trainer"]["world"] == 1
    ck["trainer"]["world"] = 2                                               # as torchrun --nproc_per_node 2 wrote it
    torch.save(ck, tmp_path / "last.pth")
    with pytest.raises(UserError, match=r"written by 2 process\(es\), resumed with 1; resume with 2 in all "
                                        r"\(torchrun --nproc_per_node 2 train\.py --resume") as e:
        train.main(["--resume", str(tmp_path / "last.pth")])
    assert "\n" not in str(e.value)


def _train(args, **kw):
    import subprocess
    import sys
    return subprocess.Popen([sys.executable, str(train.__file__)] + args, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


FROZEN_MINILM = ["--text-weights", "pretrained", "--freeze-text", "true", "--text-layers", "0", "--text-width", "0"]


@pytest.mark.parametrize("text", [[], FROZEN_MINILM], ids=["trained-text", "frozen-minilm-captions"])
def test_sigkill_after_a_mid_epoch_save_then_resume_gives_equal_weights(sample_dir, tmp_path, text):
    """A real train.py killed with SIGKILL once a mid-epoch last.pth exists; `--resume` alone finishes it with
    every state-dict tensor torch.equal to an uninterrupted run. Frozen MiniLM over the sample's own 600 captions
    (the offline preset's text side, on 120 faces): each caption is first met at another step after the resume."""
    import signal
    import time

    import pandas as pd
    data, flags = sample_dir, FLAGS
    if text:                                      # 120 of the sample's faces with their own captions, batches of 8
        data = tmp_path / "data"
        data.mkdir()
        table = pd.read_csv(sample_dir / "captions.csv")
        rows = pd.concat([table[table["split"] == s].groupby("label").head(n) for s, n in (("train", 12), ("val", 3))])
        rows.assign(image=[str(sample_dir / "images" / Path(p).name) for p in rows["image"]]).to_csv(
            data / "captions.csv", index=False)
        bank = FLAGS.index("--caption-bank")
        flags = FLAGS[:bank] + FLAGS[bank + 2:] + text + ["--batch-size", "8"]
    args = flags + ["--data", str(data), "--epochs", "1", "--save-every-steps", "5", "--final-path", "",
                    "--ema-decay", "0.9"]
    ref = _train(args + ["--out-dir", str(tmp_path / "ref")])
    run = _train(args + ["--out-dir", str(tmp_path / "run")])
    last = tmp_path / "run" / "last.pth"
    deadline = time.time() + 120
    while not last.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL
    assert torch.load(last, weights_only=True)["trainer"]["batch_in_epoch"] > 0        # killed mid-epoch
    resumed = _train(["--resume", str(last)])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    a = torch.load(tmp_path / "ref" / "last.pth", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["trainer"]["step"] == b["trainer"]["step"]
    for sd in ("state_dict",):
        assert a[sd].keys() == b[sd].keys()
        assert all(torch.equal(a[sd][k], b[sd][k]) for k in a[sd]), [k for k in a[sd] if not torch.equal(a[sd][k], b[sd][k])]
    ea, eb = a["trainer"]["ema"], b["trainer"]["ema"]
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_init_from_starts_a_new_run_from_a_finished_models_weights_at_another_image_size(one_epoch, sample_dir,
                                                                                         tmp_path):
    src = one_epoch / "project" / "model_final.pth"
    zero = ["--lr-image", "0", "--lr-text", "0", "--lr-head", "0"]          # learning rate 0: weights stay the file's
    assert train.main(FLAGS + zero + ["--data", str(sample_dir), "--epochs", "1", "--max-steps", "2",
                                      "--image-size", "24", "--init-from", str(src), "--out-dir", str(tmp_path),
                                      "--final-path", ""]) == 0
    old, new = torch.load(src, weights_only=True), torch.load(tmp_path / "last.pth", weights_only=True)
    assert new["config"]["image_size"] == 24 and new["config"]["init_from"] == str(src)
    moved = [k for k, v in old["state_dict"].items() if v.is_floating_point()
             and not torch.equal(v, new["state_dict"][k]) and "running_" not in k]
    assert moved == [], moved[:3]


@pytest.mark.parametrize("flag,why", [(["--embed-dim", "48"], "--embed-dim"),
                                      (["--image-model", "resnet18"], "--image-model")])
def test_init_from_refuses_a_model_of_another_shape_in_one_line(one_epoch, sample_dir, tmp_path, flag, why):
    with pytest.raises(UserError, match="--init-from needs the model it was trained with") as e:
        train.main(FLAGS + flag + ["--data", str(sample_dir), "--epochs", "1", "--out-dir", str(tmp_path / "run"),
                                   "--init-from", str(one_epoch / "project" / "model_final.pth")])
    assert why in str(e.value) and "\n" not in str(e.value) and not (tmp_path / "run").exists()   # before any setup


def test_init_from_a_missing_file_is_one_line_before_any_setup(tmp_path):
    with pytest.raises(UserError, match="--init-from .*no such checkpoint file"):
        train.main(FLAGS + ["--data", str(tmp_path), "--init-from", str(tmp_path / "nope.pth")])


def test_init_from_alone_takes_the_files_config_so_the_bundled_model_fine_tunes_without_model_flags(
        one_epoch, sample_dir, tmp_path):
    src = one_epoch / "project" / "model_final.pth"
    assert train.main(["--init-from", str(src), "--data", str(sample_dir), "--epochs", "1", "--max-steps", "1",
                       "--out-dir", str(tmp_path), "--final-path", ""]) == 0      # not the paper preset's hub models
    cfg = torch.load(tmp_path / "last.pth", weights_only=True)["config"]
    assert (cfg["image_size"], cfg["caption_bank"], cfg["image_model"]) == (16, "paper", "resnet10t")
    assert cfg["out_dir"] == str(tmp_path) and cfg["epochs"] == 1


def test_resume_and_init_from_read_their_checkpoint_once(one_epoch, sample_dir, tmp_path, monkeypatch):
    reads, load = [], torch.load

    def counted(path, *a, **kw):
        reads.append(str(path))
        return load(path, *a, **kw)

    monkeypatch.setattr(torch, "load", counted)
    last, src = one_epoch / "out" / "last.pth", one_epoch / "project" / "model_final.pth"
    assert train.main(["--resume", str(last), "--out-dir", str(tmp_path / "r")]) == 0     # config and weights
    assert reads.count(str(last)) == 1, reads
    assert train.main(["--init-from", str(src), "--data", str(sample_dir), "--epochs", "1", "--max-steps", "1",
                       "--out-dir", str(tmp_path / "i"), "--final-path", ""]) == 0
    assert reads.count(str(src)) == 1, reads


def test_resume_follows_a_moved_data_folder_but_not_a_different_one(sample_dir, tmp_path, capsys):
    import shutil
    shutil.copytree(sample_dir, tmp_path / "data")
    shutil.copytree(sample_dir, tmp_path / "other")
    last = tmp_path / "out" / "last.pth"
    assert train.main(FLAGS + ["--data", str(tmp_path / "data"), "--epochs", "1", "--max-steps", "2", "--out-dir",
                               str(tmp_path / "out"), "--final-path", ""]) == 0
    with pytest.raises(UserError, match="would change the resumed run.*once the run's own folder is gone"):
        train.main(["--resume", str(last), "--data", str(tmp_path / "other")])     # it still exists: refused
    (tmp_path / "data").rename(tmp_path / "moved")                                   # moved, or another machine
    assert train.main(["--resume", str(last), "--data", str(tmp_path / "moved"), "--epochs", "2",
                       "--max-steps", "4"]) == 0
    assert "resume: --data" in capsys.readouterr().out
    ck = torch.load(last, weights_only=True)
    assert ck["trainer"]["step"] == 4 and ck["config"]["data"] == str((tmp_path / "moved").resolve())


def test_a_relative_data_folder_resumes_from_elsewhere_with_a_config_file_and_its_absolute_path(tmp_path, monkeypatch):
    from synth import make_sample
    make_sample(tmp_path / "data", per_class=8, size=32, seed=1)          # small: two runs well under 10 s
    monkeypatch.chdir(tmp_path)
    assert train.main(FLAGS + ["--data", "data", "--epochs", "1", "--max-steps", "1", "--out-dir", "out",
                               "--final-path", ""]) == 0
    last = tmp_path / "out" / "last.pth"
    assert torch.load(last, weights_only=True)["config"]["data"] == str((tmp_path / "data").resolve())
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "c.yaml").write_text("caption_bank: paper\n")       # the run's own value
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert train.main(["--resume", str(last), "--config", "c.yaml", "--data", str(tmp_path / "data"),
                       "--epochs", "2", "--max-steps", "2"]) == 0     # only the file's keys compared; the same folder
    assert torch.load(last, weights_only=True)["trainer"]["step"] == 2


def test_resume_needs_no_source_weights_file_once_last_pth_holds_every_weight(sample_dir, tmp_path, capsys):
    import timm
    weights = tmp_path / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), weights)
    args = FLAGS + ["--data", str(sample_dir), "--image-weights", str(weights), "--out-dir", str(tmp_path / "out"),
                    "--final-path", ""]
    assert train.main(args + ["--max-steps", "1"]) == 0
    assert "loaded 84 tensors from" in capsys.readouterr().out
    weights.unlink()                                           # moved or deleted after the run started
    assert train.main(["--resume", str(tmp_path / "out" / "last.pth"), "--max-steps", "2"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert torch.load(tmp_path / "out" / "last.pth", weights_only=True)["trainer"]["step"] == 2
