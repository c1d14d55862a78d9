"""bench/gpu_pack.py: the FER+ subset that travels to a lent GPU fits its budget, keeps the evaluation split whole, stays
a FER+ release layout that the bench reads, and refuses a budget too small in one line."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_pack  # noqa: E402
from test_ferplus_bench import tiny_ferplus  # noqa: E402
from utils import UserError  # noqa: E402


def test_packed_subset_fits_keeps_valid_whole_and_reads_as_ferplus(tmp_path):
    import prepare
    src, dst = tmp_path / "ferplus", tmp_path / "carry" / "ferplus"
    tiny_ferplus(src)                                           # 16 train, 16 valid faces
    names = sorted(p.name for p in (src / "FER2013Train").glob("*.png"))
    (src / "FER2013Train" / "label.csv").write_text("".join(f'{n},"(0, 0, 48, 48)",10,0,0,0,0,0,0,0,0,0\n'
                                                            for n in names))  # the release's per-folder list
    valid_bytes = gpu_pack.folder_bytes(src / "FER2013Valid")
    face = (src / "FER2013Train" / "fer0000000.png").stat().st_size
    room = valid_bytes + 8 * (face + 120)
    n_train, n_valid = gpu_pack.pack_ferplus(src, dst, room, min_train=1)
    assert n_valid == 16 and 6 <= n_train <= 9                 # all of valid, about half of train
    assert gpu_pack.folder_bytes(dst) <= room + 4096            # + the CSV header lines
    listed = pd.read_csv(dst / "fer2013new.csv")
    assert sorted(listed["Image name"]) == sorted(p.name for p in dst.rglob("*.png"))
    kept = pd.read_csv(dst / "FER2013Train" / "label.csv", header=None)[0]
    assert sorted(kept) == sorted(p.name for p in (dst / "FER2013Train").glob("*.png")) and len(kept) == n_train
    table = prepare.convert(dst, "ferplus", tmp_path / "data", verify=False)
    got = pd.read_csv(tmp_path / "data" / "captions.csv")
    assert (got["split"] == "val").sum() == 16 and (got["split"] == "train").sum() == n_train, table


def test_train_subset_is_stratified_and_seeded():
    votes = pd.DataFrame({"Usage": ["Training"] * 40 + ["PublicTest"] * 4, "Image name": [f"f{i}" for i in range(44)]})
    for c in gpu_pack.FERPLUS_VOTES:
        votes[c] = "0"
    votes.loc[:29, "neutral"], votes.loc[30:, "happiness"] = "9", "9"      # 30 neutral, 10 (+4 valid) happy
    pick = gpu_pack.pick_train(votes, 20, seed=0)
    assert len(pick) == 20 and set(pick["Usage"]) == {"Training"}
    assert (pick["neutral"] == "9").sum() == 15 and (pick["happiness"] == "9").sum() == 5
    assert list(pick["Image name"]) == list(gpu_pack.pick_train(votes, 20, seed=0)["Image name"])
    assert len(gpu_pack.pick_train(votes, 100, seed=0)) == 40


def test_a_budget_too_small_is_one_line_and_a_missing_release_too(tmp_path, capsys):
    tiny_ferplus(tmp_path / "ferplus")
    with pytest.raises(UserError, match="raise --budget-mb"):
        gpu_pack.pack_ferplus(tmp_path / "ferplus", tmp_path / "out", room=10_000)
    assert gpu_pack.main(["--ferplus", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--no-wheels"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --ferplus") and "fer2013new.csv" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step_on_the_cpu(tmp_path):
    import os
    import subprocess
    tiny_ferplus(tmp_path / "ferplus")
    carry, out = tmp_path / "carry", tmp_path / "out"
    assert gpu_pack.main(["--ferplus", str(tmp_path / "ferplus"), "--out", str(carry), "--no-wheels"]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(SMOKE="1", CARRY=str(carry), OUT=str(out), WORK=str(tmp_path / "work"), PY=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=600)
    log = (out / "gpu_check.log").read_text()
    assert r.returncode == 0 and "every step ran" in log and "FAILED" not in log, log[-3000:]
    assert log.count("distinct captions only:") == 4                 # the four throughput rows
    md = (out / "BENCH_gpu.md").read_text()
    assert md.startswith("## FER+") and "--preset paper --image-weights none" in md
    assert {p.name for p in out.iterdir()} == {"gpu_check.log", "BENCH_gpu.md", "result.json", "metrics.csv"}


def test_an_image_name_that_leaves_the_folder_is_refused_before_copying(tmp_path):
    tiny_ferplus(tmp_path / "ferplus")
    csv = tmp_path / "ferplus" / "fer2013new.csv"
    rows = pd.read_csv(csv)
    rows.loc[len(rows) - 1, "Image name"] = "../../escape.png"                 # a PublicTest row
    rows.to_csv(csv, index=False)
    with pytest.raises(UserError, match="not a plain file name"):
        gpu_pack.pack_ferplus(tmp_path / "ferplus", tmp_path / "out" / "ferplus", room=10**8, min_train=1)
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "out" / "ferplus").exists()
