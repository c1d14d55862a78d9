"""bench/bench_tta.py: the crop views it averages, and its scores against evaluate.py's on the same faces."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_tta  # noqa: E402
from utils import UserError  # noqa: E402


def test_each_view_set_has_its_passes_and_shift_views_move_the_face_by_n_pixels():
    x = torch.zeros(1, 3, 9, 9)
    x[..., 4, 4] = 1.0                                              # one bright pixel at the centre
    counts = {k: len(bench_tta.views(x, k)) for k in ("none", "flip", "shift2", "zoom1.2")}
    assert counts == {"none": 1, "flip": 2, "shift2": 10, "zoom1.2": 6}
    shifted = bench_tta.views(x, "shift2")
    assert all(v.shape == x.shape for v in shifted)
    peaks = {tuple(int(i) for i in (v[0, 0] == 1).nonzero()[0]) for v in shifted[2::2]}    # the unmirrored shifts
    assert peaks == {(4, 6), (4, 2), (6, 4), (2, 4)}
    with pytest.raises(UserError, match="--views"):
        bench_tta.views(x, "rotate5")


def test_one_pass_and_flip_read_what_evaluate_reads(trained, sample_dir, capsys):
    import evaluate
    ck = str(trained[0])
    assert bench_tta.main(["--checkpoint", ck, "--data", str(sample_dir), "--split", "val",
                           "--views", "none,flip,shift2"]) == 0
    rows = {r["views"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert [rows[k]["passes"] for k in ("none", "flip", "shift2")] == [1, 2, 10]
    for kind, tta in (("none", False), ("flip", True)):
        ref = evaluate.evaluate(ck, str(sample_dir), split="val", prompts="paper", tta=tta)
        assert rows[kind]["faces"] == ref["n_images"] == 96
        assert rows[kind]["paper_top1"] == pytest.approx(100 * ref["top1"], abs=0.01)
        assert len(rows[kind]["sets"]) == 5                       # paper + the four selection halves on val
