"""The entry points as a user meets them: in a fresh interpreter, with every HF_*/TRANSFORMERS_* variable removed
(a plain shell) and again with the offline variables set; the bundled model loads either way."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "exprclip-ferplus.pth"


def _env(offline: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    if offline:
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return dict(env, PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False")


@pytest.mark.parametrize("offline", [False, True], ids=["plain-shell", "offline-vars"])
def test_demo_serves_the_bundled_model_with_and_without_offline_variables(sample_dir, tmp_path, offline):
    gallery = tmp_path / "gal"
    gallery.mkdir()
    for p in sorted((sample_dir / "images").glob("*.png"))[:4]:
        shutil.copy2(p, gallery / p.name)
    code = textwrap.dedent(f"""
        import gradio as gr
        gr.Blocks.launch = lambda self, **kw: print("launched")
        import demo
        demo.ROOT_MODEL = demo.Path({str(tmp_path / "model_final.pth")!r})
        raise SystemExit(demo.main(["--gallery", {str(gallery)!r}, "--cache-dir", {str(tmp_path / "c")!r},
                                    "--device", "cpu"]))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(offline), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert "launched" in r.stdout and "differs" not in r.stdout + r.stderr


@pytest.mark.parametrize("offline", [False, True], ids=["plain-shell", "offline-vars"])
def test_evaluate_runs_the_bundled_model_with_and_without_offline_variables(sample_dir, tmp_path, offline):
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--checkpoint", str(BUNDLED), "--data",
                        str(sample_dir), "--device", "cpu", "--batch-size", "32"], cwd=tmp_path, env=_env(offline),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert "differs" not in r.stdout + r.stderr


def test_predict_reads_a_folder_with_the_bundled_model_in_a_plain_shell(sample_dir, tmp_path):
    """What a new user runs first on their own pictures: no --checkpoint, so the model the demo serves (the
    bundled one in a fresh clone: a Korean list needs its multilingual text tower)."""
    for p in sorted((sample_dir / "images").glob("happiness_*.png"))[:2]:
        shutil.copy2(p, tmp_path / p.name)
    r = subprocess.run([sys.executable, str(ROOT / "predict.py"), str(tmp_path), "--vocab", "korean",
                        "--out", str(tmp_path / "faces.csv")], cwd=tmp_path, env=_env(False), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    from served_model import choose_checkpoint
    served = choose_checkpoint(None)[0]                   # model_final.pth in the project root, else the bundled
    assert f"model: {served}" in r.stdout and r.stdout.count(" face crop: ") == 2 and "기쁨" in r.stdout
    assert (tmp_path / "faces.csv").read_bytes().startswith(b"\xef\xbb\xbf")          # spreadsheets read Korean
