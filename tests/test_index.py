"""GalleryIndex: incremental updates, resume after interruption, failed images, FAISS vs exact, CLI."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import index as ix  # noqa: E402
from index import GalleryIndex, exact_search, list_images  # noqa: E402
from utils import UserError  # noqa: E402

DIM = 16


def write_image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    px = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(px.repeat(2, 0).repeat(2, 1)).save(path)     # 16 px: the smallest image read for a face
    return path


def pixel_embedding(path: Path) -> np.ndarray:
    """4x4 block means of the 16x16 image, centred and L2-normalised: [16]."""
    px = np.asarray(Image.open(path).convert("L"), np.float32)
    v = px.reshape(4, 4, 4, 4).mean((1, 3)).ravel() - 127.5
    return v / np.linalg.norm(v)


class FakeEncoder:
    """Counts calls and encoded paths; unreadable files -> ok False; optionally raises on call number `fail_at`."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.seen, self.fail_at = 0, [], fail_at

    def __call__(self, paths):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt
        emb, ok = np.zeros((len(paths), DIM), np.float32), []
        for i, p in enumerate(paths):
            try:
                emb[i] = pixel_embedding(p)
                ok.append(True)
            except OSError:
                ok.append(False)
        self.seen += list(paths)
        return emb, ok


def make_gallery(root: Path, n: int) -> list[Path]:
    return [write_image(root / f"sub{i % 3}" / f"img{i:03d}.png", i) for i in range(n)]


def top1(index: GalleryIndex, path: Path) -> tuple[float, Path]:
    scores, paths = index.search(pixel_embedding(path), k=1)
    return float(scores[0, 0]), paths[0][0]


def test_incremental_add_change_delete(tmp_path):
    imgs = make_gallery(tmp_path, 10)
    idx = GalleryIndex.open(tmp_path, "ckptA", DIM, chunk_rows=4)
    enc = FakeEncoder()
    stats = idx.update(list_images(tmp_path), enc, batch_size=3, progress=False)
    assert {k: stats[k] for k in ("added", "changed", "removed", "unchanged", "failed")} == \
        dict(added=10, changed=0, removed=0, unchanged=0, failed=0)
    assert len(idx) == 10 and sorted(idx.paths) == sorted(imgs)
    assert list(idx.dir.glob("chunk-*.npy")) and np.load(next(idx.dir.glob("chunk-*.npy"))).dtype == np.float16
    assert top1(idx, imgs[3])[1] == imgs[3]

    old7 = pixel_embedding(imgs[7])
    new = [write_image(tmp_path / "new" / f"n{i}.png", 100 + i) for i in range(2)]
    write_image(imgs[5], 555)
    os.utime(imgs[5], ns=(1, 1))  # mtime surely differs from the first build
    imgs[7].unlink()
    enc = FakeEncoder()
    stats = idx.update(list_images(tmp_path), enc, batch_size=3, progress=False)
    assert (stats["added"], stats["changed"], stats["removed"], stats["unchanged"]) == (2, 1, 1, 8)
    assert sorted(enc.seen) == sorted(new + [imgs[5]])  # unchanged files are not re-encoded
    assert len(idx) == 11 and imgs[7] not in idx.paths
    score, best = top1(idx, imgs[5])
    assert best == imgs[5] and score > 0.999  # the new content of the changed file
    assert idx.search(old7, k=11)[1][0].count(imgs[7]) == 0

    again = GalleryIndex.open(tmp_path, "ckptA", DIM, chunk_rows=4)  # state is on disk, not in memory
    assert sorted(again.paths) == sorted(idx.paths) and top1(again, new[1])[1] == new[1]
    manifest = "".join(f.read_text() for f in again.dir.glob("chunk-*.csv"))
    assert "sub1/img007.png" not in manifest and "new/n0.png" in manifest
    enc = FakeEncoder()
    stats = again.update(list_images(tmp_path), enc, progress=False)
    assert enc.calls == 0 and stats["unchanged"] == 11


def test_interrupted_build_resumes(tmp_path):
    imgs = make_gallery(tmp_path, 20)
    idx = GalleryIndex.open(tmp_path, "ckpt", DIM, chunk_rows=4)
    enc = FakeEncoder(fail_at=6)  # Ctrl-C after 5 batches of 2 = 10 images: 2 full chunks + 2 rows buffered
    with pytest.raises(KeyboardInterrupt):
        idx.update(imgs, enc, batch_size=2, progress=False)
    done = set(enc.seen)
    assert len(done) == 10
    resumed = GalleryIndex.open(tmp_path, "ckpt", DIM, chunk_rows=4)
    assert len(resumed) == 10  # the buffered rows were saved on the way out too
    enc2 = FakeEncoder()
    stats = resumed.update(imgs, enc2, batch_size=2, progress=False)
    assert set(enc2.seen) == set(imgs) - done and stats["unchanged"] == 10 and stats["added"] == 10
    assert len(resumed) == 20 and all(top1(resumed, p)[1] == p for p in imgs)


def test_hard_crash_keeps_finished_chunks(tmp_path):
    imgs = make_gallery(tmp_path, 20)
    script = textwrap.dedent(f"""
        import os, sys; sys.path[:0] = [{str(ROOT)!r}, {str(Path(__file__).parent)!r}]
        from test_index import FakeEncoder, GalleryIndex, list_images
        enc = FakeEncoder()
        def dying(paths):
            if enc.calls == 5: os._exit(3)  # killed: no cleanup at all, after 10 images
            return enc(paths)
        GalleryIndex.open({str(tmp_path)!r}, "ckpt", 16, chunk_rows=4).update(
            list_images({str(tmp_path)!r}), dying, batch_size=2, progress=False)
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 3
    (tmp_path / ".exprclip-index" / "ckpt" / "chunk-000099.npy").write_bytes(b"half written")  # orphan
    idx = GalleryIndex.open(tmp_path, "ckpt", DIM, chunk_rows=4)
    assert len(idx) == 8  # two full chunks were saved; the 2 rows in the buffer were lost
    enc = FakeEncoder()
    idx.update(list_images(tmp_path), enc, batch_size=2, progress=False)
    assert len(enc.seen) == 12 and len(idx) == 20
    assert not (idx.dir / "chunk-000099.npy").exists()
    assert all(top1(idx, p)[1] == p for p in imgs)


def stored_rows(index: GalleryIndex) -> list[int]:
    return [len(np.load(f, mmap_mode="r")) for f in sorted(index.dir.glob("chunk-*.npy"))]


def test_sparse_chunks_are_merged(tmp_path):
    imgs = make_gallery(tmp_path, 16)
    idx = GalleryIndex.open(tmp_path, "ckpt", DIM, chunk_rows=8)
    idx.update(imgs, FakeEncoder(), progress=False)
    assert stored_rows(idx) == [8, 8]
    for p in imgs[3:13]:  # leaves 3 + 3 live rows in two chunks
        p.unlink()
    idx.update(list_images(tmp_path), FakeEncoder(), progress=False)
    assert stored_rows(idx) == [6] and len(idx) == 6  # merged, dead rows gone, nothing re-encoded
    for i in range(5):  # small updates do not pile up small chunks
        idx.update(list_images(tmp_path) + [write_image(tmp_path / f"x{i}.png", 50 + i)], FakeEncoder(), progress=False)
    assert sum(stored_rows(idx)) == len(idx) == 11  # every chunk but at most one is at least half full
    assert sum(n < 4 for n in stored_rows(idx)) <= 1 and len(stored_rows(idx)) <= 3
    assert all(top1(idx, p)[1] == p for p in list_images(tmp_path))


def test_unreadable_images_are_failed(tmp_path):
    imgs = make_gallery(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    gone = tmp_path / "gone.jpg"  # listed, then deleted before the update
    idx = GalleryIndex.open(tmp_path, "ckpt", DIM)
    stats = idx.update(imgs + [tmp_path / "broken.png", gone], FakeEncoder(), progress=False)
    assert stats["failed"] == 2 and set(stats["failed_paths"]) == {tmp_path / "broken.png", gone}
    assert stats["added"] == 3 and sorted(idx.paths) == sorted(imgs)


def test_a_fifo_named_like_a_photo_is_not_listed_but_a_broken_link_is_reported(tmp_path):
    import os
    imgs = make_gallery(tmp_path, 2)
    os.mkfifo(tmp_path / "pipe.jpg")                              # opening it would block forever
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    assert list_images(tmp_path) == sorted(imgs + [tmp_path / "dangling.png"])


def test_a_second_process_updating_the_same_gallery_index_is_refused_and_threads_take_turns(tmp_path):
    """Two processes each wrote chunk-000001 (the last silently replaced the other's rows, or paired one's manifest
    with the other's embeddings); threads of one process wait for each other; a holder may take the lock again."""
    import threading
    from utils import folder_lock
    imgs = make_gallery(tmp_path, 4)
    idx = GalleryIndex.open(tmp_path, "ckpt", DIM)
    idx.dir.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(idx.dir / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match="another process is updating this index"):
            idx.update(imgs, FakeEncoder(), progress=False)
        assert len(idx) == 0
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(idx.dir, "busy"):                                   # re-entered by its holder: no refusal
        stats = idx.update(imgs, FakeEncoder(), progress=False)
    assert stats["added"] == 4
    results = []
    threads = [threading.Thread(target=lambda: results.append(idx.update(imgs[:3], FakeEncoder(), progress=False)))
               for _ in range(2)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert sorted(r["removed"] for r in results) == [0, 1] and len(idx) == 3


def test_faiss_agrees_with_exact(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, DIM))
    vecs = centres[rng.integers(0, 20, 2000)] + 0.5 * rng.normal(size=(2000, DIM))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    files = []
    for i in range(len(vecs)):
        files.append(tmp_path / f"{i:04d}.png")
        files[-1].write_bytes(b"x")
    table = {p: v for p, v in zip(files, vecs)}
    builds, real_build = [], ix.build_faiss
    monkeypatch.setattr(ix, "build_faiss", lambda *a, **k: builds.append(1) or real_build(*a, **k))

    def encode(paths):
        return np.stack([table[p] for p in paths]), [True] * len(paths)
    idx = GalleryIndex.open(tmp_path, "ckpt", DIM, faiss_threshold=100, nprobe=8)
    idx.update(files, encode, batch_size=256, progress=False)
    assert len(builds) == 1 and len(list(idx.dir.glob("faiss-*.index"))) == 1
    queries = vecs[:50] + 0.3 * rng.normal(size=(50, DIM)).astype(np.float32)
    approx_s, approx_p = idx.search(queries, k=10)
    exact_s, exact_p = idx.search(queries, k=10, exact=True)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx_p, exact_p)])
    assert recall >= 0.9 and np.mean([a[0] == e[0] for a, e in zip(approx_p, exact_p)]) >= 0.95
    assert idx.search(vecs[7], k=1)[1][0][0] == files[7]  # a stored vector finds itself
    assert np.all(np.diff(approx_s, axis=1) <= 1e-6)  # best first

    reopened = GalleryIndex.open(tmp_path, "ckpt", DIM, faiss_threshold=100, nprobe=8)
    assert reopened.search(queries, k=10)[1] == approx_p and len(builds) == 1  # loaded from disk, not rebuilt
    files[0].unlink()
    reopened.update(files[1:], encode, progress=False)
    assert len(builds) == 2 and len(list(idx.dir.glob("faiss-*.index"))) == 1  # rebuilt after a change
    assert files[0] not in reopened.search(vecs[0], k=5)[1][0]



def test_exact_search_over_blocks():
    rng = np.random.default_rng(1)
    data, q = rng.normal(size=(103, 8)).astype(np.float32), rng.normal(size=(4, 8)).astype(np.float32)
    scores, ids = exact_search([data[:50], data[50:51], data[51:]], q, k=7)
    want = np.argsort(-(q @ data.T), axis=1)[:, :7]
    assert np.array_equal(ids, want) and np.allclose(scores, np.take_along_axis(q @ data.T, want, 1))


def test_checkpoint_digest_gets_own_folder(tmp_path):
    imgs = make_gallery(tmp_path, 4)
    write_image(tmp_path / "UPPER.JPG", 9)
    (tmp_path / "notes.txt").write_text("x")
    a = GalleryIndex.open(tmp_path, "digestA", DIM)
    a.update(list_images(tmp_path), FakeEncoder(), progress=False)
    write_image(a.dir / "inside.png", 1)  # images inside the index folder are never listed
    listed = list_images(tmp_path)
    assert sorted(listed) == sorted(imgs + [tmp_path / "UPPER.JPG"])
    b = GalleryIndex.open(tmp_path, "digestB", DIM)
    assert len(b) == 0 and b.dir != a.dir and b.dir.parent == a.dir.parent == tmp_path / ".exprclip-index"
    with pytest.raises(UserError, match="index.json"):
        GalleryIndex.open(tmp_path, "digestA", DIM + 1)
    with pytest.raises(UserError, match="no such image folder"):
        list_images(tmp_path / "missing")


def test_a_link_to_an_index_folder_is_not_read_as_photos(tmp_path):
    gal = tmp_path / "gal"
    make_gallery(gal, 2)
    write_image(gal / ".exprclip-index" / "x" / "crops" / "t.png", 9)
    write_image(tmp_path / "elsewhere" / "crops" / "t.png", 9)
    (gal / "idx").symlink_to(gal / ".exprclip-index")
    (gal / "other").symlink_to(tmp_path / "elsewhere")                        # an --index-dir outside it
    assert len(ix.list_images(gal, skip=tmp_path / "elsewhere")) == 2


def test_cli_build_and_search(tmp_path, monkeypatch, capsys):
    """The CLI and make_encoder, with a stand-in for checkpoint.create_model_and_transforms (model + preprocess)."""
    import types

    import torch

    from config import make_config
    from transform import BadImage
    make_gallery(tmp_path / "gallery", 6)
    (tmp_path / "gallery" / "bad.png").write_bytes(b"garbage")

    def preprocess(path):
        try:
            return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32)).permute(2, 0, 1)
        except OSError as e:
            raise BadImage(str(e))

    class FakeModel:
        cfg, embed_dim = make_config(dict(amp="off")), DIM

        def parameters(self):
            yield torch.zeros(1)

        def encode_image(self, x):  # [B, 3, 16, 16] -> [B, 16]
            return torch.stack([torch.from_numpy(pixel_embedding_of(im)) for im in x])

        def encode_text(self, texts):  # the "sentence" names an image: its embedding
            return torch.stack([torch.from_numpy(pixel_embedding(tmp_path / "gallery" / s))
                                if s.endswith(".png") else torch.ones(DIM) / 4 for s in texts])

    def pixel_embedding_of(im):
        v = im[0].numpy().reshape(4, 4, 4, 4).mean((1, 3)).ravel() - 127.5
        return (v / np.linalg.norm(v)).astype(np.float32)

    monkeypatch.setitem(sys.modules, "checkpoint", types.SimpleNamespace(
        create_model_and_transforms=lambda p, d: (FakeModel(), None, preprocess)))
    ckpt = tmp_path / "model_final.pth"
    ckpt.write_bytes(b"weights")
    common = ["--images", str(tmp_path / "gallery"), "--checkpoint", str(ckpt), "--device", "cpu", "--tta", "none"]
    assert ix.main(["build", *common, "--batch-size", "1"]) == 0  # bad.png alone in a batch: no rows at all
    out = capsys.readouterr().out
    assert "6 entries indexed" in out and "failed 1" in out and "bad.png" in out
    assert ix.main(["search", *common, "--query", "sub1/img004.png", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].endswith("img004.png") and float(lines[0].split()[1]) > 0.999
    first_two = [line.split()[2] for line in lines[1:3]]     # (the query names the first)
    for name in first_two:                                   # deleted since the build: left out, k still filled
        Path(name).unlink()
    assert ix.main(["search", *common, "--query", "sub1/img004.png", "-k", "3"]) == 0
    out, err = capsys.readouterr()
    got = [line.split()[2] for line in out.splitlines()]
    assert len(got) == 3 and not set(got) & set(first_two) and "2 result(s) left out" in err
    assert ix.run_cli(ix.main, ["search", *common[:2], "--checkpoint", str(tmp_path / "nope.pth"), "--query", "x"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    empty = tmp_path / "empty"
    write_image(empty / "a.png", 1)
    assert ix.run_cli(ix.main, ["search", "--images", str(empty), "--checkpoint", str(ckpt), "--query", "x"]) == 2
    assert "run `python index.py build" in capsys.readouterr().err
    assert ix.run_cli(ix.main, ["search", *common, "--query", "  "]) == 2
    assert "--query is empty" in capsys.readouterr().err
    assert ix.main(["build", *common[:-2]]) == 0                      # the demo's default: flip-averaged, kept apart
    assert [p.name.endswith("+flip") for p in sorted((tmp_path / "gallery" / ".exprclip-index").iterdir())] == \
        [False, True]


def test_linked_folders_are_followed_each_real_folder_once_and_a_loop_ends(tmp_path):
    gallery, card = tmp_path / "Pictures", tmp_path / "sd" / "DCIM"
    inside = write_image(gallery / "a.png", 0)
    on_card = write_image(card / "b.png", 1)
    (gallery / "Camera").symlink_to(card)                         # ~/Pictures/Camera -> /media/sd/DCIM
    (gallery / "Camera2").symlink_to(card)                        # the same folder twice: listed once
    (card / "loop").symlink_to(gallery)                           # back up: must not walk forever
    got = list_images(gallery)
    assert got == sorted([inside, gallery / "Camera" / "b.png"]) and on_card.is_file()


def test_a_folder_that_cannot_be_listed_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    write_image(tmp_path / "ok" / "a.png", 0)
    (tmp_path / "locked\nx").mkdir()
    real = os.scandir

    def scandir(p="."):
        if "locked" in os.fspath(p):
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return real(p)
    monkeypatch.setattr(os, "scandir", scandir)
    unlisted = []
    assert list_images(tmp_path, unlisted=unlisted) == [tmp_path / "ok" / "a.png"]
    assert unlisted == [tmp_path / "locked\nx"]
    assert capsys.readouterr().err == f"skipped folder {tmp_path}/locked\\nx: permission denied\n"
