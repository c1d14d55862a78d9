"""Photo galleries (photos.py, uploads.py): every face is an entry, face crops stay whole, incremental and resumable,
bad files counted and skipped, safe zip uploads. A stand-in detector and encoder keep these fast; test_photos_e2e.py
drives the real MTCNN and model through index.py and the demo handlers."""
from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import faces
from faces import Box
from index import GalleryIndex
from photos import PhotoIndex, failure_lines, split_key
from uploads import save_uploads
from utils import UserError

DIM = 8


def fake_detect(image, max_faces=10, min_size_frac=0.05, detector="auto"):
    """Two boxes (left and right half) on any photo that is not flat; none on a flat one."""
    a = np.asarray(image.convert("L"))
    if a.std() < 1:
        return []
    W, H = image.size
    s = min(W // 3, H // 2)
    return [Box(W // 8, H // 4, W // 8 + s, H // 4 + s, 0.99), Box(W // 2, H // 4, W // 2 + s, H // 4 + s, 0.95)]


class Encoder:
    """Mean colour of each item (path or PIL) -> an 8-d unit vector; counts what it encoded."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, items):
        out, ok = [], []
        for it in items:
            self.calls += 1
            if self.fail_after is not None and self.calls > self.fail_after:
                raise KeyboardInterrupt                      # Ctrl-C in the middle of indexing
            try:
                im = it if isinstance(it, Image.Image) else Image.open(it)
                m = np.asarray(im.convert("RGB"), np.float32).mean((0, 1))
                v = np.concatenate([m, m[::-1], [1, 1]]).astype(np.float32)
                out.append(v / np.linalg.norm(v))
                ok.append(True)
            except OSError:
                out.append(np.zeros(DIM, np.float32))
                ok.append(False)
        return np.array(out, np.float32).reshape(-1, DIM), ok


@pytest.fixture(autouse=True)
def _fake_detector(monkeypatch):
    monkeypatch.setattr(faces, "detect_faces", fake_detect)


def make_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(3):                                        # photos: two "faces" each (nested folders)
        p = root / f"trip{i % 2}" / "day" / f"IMG_{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(p)
    Image.new("RGB", (400, 300), (90, 120, 200)).save(root / "sky.jpg")      # a photo without a face
    for i in range(2):                                        # face crops: one entry each
        Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(root / f"fer_{i}.png")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "empty.png").write_bytes(b"")
    return root


def open_index(root: Path, cache: Path, mode: str = "auto") -> PhotoIndex:
    return PhotoIndex(GalleryIndex(root, cache / "ix", "ck", DIM), mode)


def test_every_face_is_one_entry_face_crops_stay_whole_and_bad_files_are_counted(tmp_path):
    root = make_folder(tmp_path / "photos")
    ix = open_index(root, tmp_path / "cache")
    stats = ix.update(ix.sources(), Encoder(), progress=False)
    assert len(ix) == 3 * 2 + 2 and ix.n_photos() == 3 + 1 + 2
    assert stats["added"] == 6 and stats["failed"] == 2 and stats["faces"] == 8
    lines = failure_lines(stats)
    assert len(lines) == 2 and all(line.count("\n") == 0 for line in lines)
    assert any("corrupt.jpg" in line for line in lines) and any("empty.png" in line for line in lines)
    keys = sorted(k for k in ix.entries._keys)
    assert "trip0/day/IMG_0.jpg#0" in keys and "trip0/day/IMG_0.jpg#1" in keys and "fer_0.png" in keys
    e = ix.entry(root / "trip0/day/IMG_0.jpg#1")
    assert e.photo == root / "trip0/day/IMG_0.jpg" and e.face == 1 and e.box == (200, 75, 333, 208)
    assert e.thumb.is_file() and ix.entry(root / "fer_0.png").face is None
    assert split_key("a#1.jpg") == ("a#1.jpg", None) and split_key("a#1.jpg#3") == ("a#1.jpg", 3)
    assert not list(root.rglob("*.jsonl")) and not (root / ".exprclip-index").exists()   # nothing in the photos


def test_relaunch_reencodes_nothing_and_changes_reencode_only_those(tmp_path):
    root = make_folder(tmp_path / "photos")
    ix = open_index(root, tmp_path / "cache")
    ix.update(ix.sources(), Encoder(), progress=False)
    again, enc = open_index(root, tmp_path / "cache"), Encoder()
    stats = again.update(again.sources(), enc, progress=False)
    assert enc.calls == 0 and stats["unchanged"] == 6 and stats["added"] == stats["changed"] == 0
    victim = root / "trip1" / "day" / "IMG_1.jpg"
    Image.new("RGB", (400, 300), (10, 10, 10)).save(victim)          # now face-less
    os.utime(victim, (time.time() + 5, time.time() + 5))
    (root / "trip0" / "day" / "IMG_2.jpg").unlink()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(root / "new.jpg")
    enc = Encoder()
    stats = again.update(again.sources(), enc, progress=False)
    assert (stats["changed"], stats["added"], stats["removed"]) == (1, 1, 1) and enc.calls == 2
    assert len(again) == 2 * 2 + 2 and not any(k.startswith("trip1/day/IMG_1.jpg#") for k in again.entries._keys)


def test_interrupted_indexing_loses_only_the_photo_in_progress(tmp_path):
    root = make_folder(tmp_path / "photos")
    ix = open_index(root, tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        ix.update(ix.sources(), Encoder(fail_after=5), progress=False)   # crops first (2), then photos 2 faces each
    done = ix.n_photos()
    assert done >= 2 and len(ix) == sum(1 if r["faces"] is None else len(r["faces"]) for r in ix.records.values())
    with open(ix.log_path, "a") as f:
        f.write('{"k": "torn line of a kil')                              # a kill while appending
    enc = Encoder()
    resumed = open_index(root, tmp_path / "cache")
    stats = resumed.update(resumed.sources(), enc, progress=False)
    assert stats["unchanged"] == done and resumed.n_photos() == 6 and len(resumed) == 8
    assert all(json.loads(line) for line in resumed.log_path.read_text().splitlines())


def test_faces_flag_forces_crops_or_photos(tmp_path):
    root = make_folder(tmp_path / "photos")
    crops = open_index(root, tmp_path / "c1", "crops")
    crops.update(crops.sources(), Encoder(), progress=False)
    assert len(crops) == 6 + 1 - 1 and all(split_key(k)[1] is None for k in crops.entries._keys)  # corrupt: 0 rows
    photos = open_index(root, tmp_path / "c2", "photos")
    photos.update(photos.sources(), Encoder(), progress=False)
    assert len(photos) == 3 * 2 + 2 * 2                           # the 48 px files are detected in too


def test_zip_uploads_stay_in_their_folder_and_bombs_are_refused(tmp_path):
    good = tmp_path / "face.png"
    Image.new("RGB", (64, 64), (200, 100, 50)).save(good)
    z = tmp_path / "holiday.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(good, "../../evil.png")
        zf.write(good, "album/nested/ok.png")
        zf.writestr("notes.txt", "hello")
        zf.writestr("more/inner.zip", b"PK\x05\x06" + bytes(18))    # an empty zip, inside
        zf.writestr("bomb.png", b"\0" * 30_000_000)              # ~1000x compression
    dest = tmp_path / "cache" / "uploads"
    saved, skipped = save_uploads([str(z), str(good), str(tmp_path / "missing.jpg")], dest)
    assert sorted(p.name for p in saved) == ["evil.png", "face.png", "ok.png"]
    assert all(dest in p.parents for p in saved) and not (tmp_path / "evil.png").exists()
    assert any("bomb.png" in s and "refused" in s for s in skipped) and any("missing.jpg" in s for s in skipped)
    assert not list(dest.rglob("bomb.png")) and all("\n" not in s for s in skipped)
    assert "inner.zip in holiday.zip: a zip inside a zip is not opened; add it on its own" in skipped


def test_requests_in_the_same_second_get_their_own_folders(tmp_path):
    good = tmp_path / "face.png"
    Image.new("RGB", (64, 64), (200, 100, 50)).save(good)
    (tmp_path / "notes.txt").write_text("hello")
    dest = tmp_path / "uploads"
    first, _ = save_uploads([str(good)], dest)
    second, _ = save_uploads([str(good)], dest)
    nothing, skipped = save_uploads([str(tmp_path / "notes.txt")], dest)     # its empty folder is removed, only it
    assert first[0].parent != second[0].parent and nothing == [] and "not an image" in skipped[0]
    assert first[0].is_file() and second[0].is_file() and len(list(dest.iterdir())) == 2


def test_added_photos_unreadable_ones_are_named_once_and_removed_and_a_vanished_result_is_left_out(
        trained, sample_dir, tmp_path):
    import shutil

    from photoviews import add_photos, result_items
    from retrieval import Engine, search_text
    crops = sorted((sample_dir / "images").glob("*.png"))[:3]
    (tmp_path / "g").mkdir()
    shutil.copy2(crops[0], tmp_path / "g" / "first.png")
    engine = Engine.load(trained[0], tmp_path / "g", "cpu", tmp_path / "cache", progress=False)
    up = tmp_path / "up"
    up.mkdir()
    shutil.copy2(crops[1], up / "mine.png")
    shutil.copy2(crops[2], up / "third.png")
    (up / "fake.png").write_bytes(b"not a png")
    (up / "notes.txt").write_text("hello")
    said = add_photos(engine, [str(up / "mine.png"), str(up / "fake.png")])
    assert said.startswith("Added 1 photo(s)") and "skipped (unreadable): fake.png: " in said
    assert str(tmp_path) not in said and not list(engine.upload_dir.rglob("fake.png"))   # not kept for later
    said = add_photos(engine, [str(up / "notes.txt")])                 # saves nothing, within the same second
    assert said.startswith("Added 0 photo(s)") and "fake.png" not in said
    assert len(list(engine.upload_dir.rglob("mine.png"))) == 1         # the first request's photo is kept
    said = add_photos(engine, [str(up / "third.png")])
    assert said.startswith("Added 1 photo(s)") and engine.index.n_photos() == 3 and "unreadable" not in said
    (tmp_path / "g" / "first.png").unlink()                           # gone since it was indexed
    tiles = result_items(engine, search_text(engine, "a smile", 3))
    assert len(tiles) == 2 and all("first.png" not in caption for _, caption in tiles)


def test_results_name_their_photo_by_its_folder_and_label_its_box_with_its_face_number(tmp_path):
    from types import SimpleNamespace

    from faces import annotate
    from photoviews import shown_name
    engine = SimpleNamespace(index=SimpleNamespace(gallery=tmp_path / "g"))
    assert shown_name(engine, tmp_path / "g" / "2019" / "IMG_0001.jpg") == "2019/IMG_0001.jpg"
    assert shown_name(engine, tmp_path / "cache" / "uploads" / "x" / "mine.jpg") == "mine.jpg"   # added on the page
    photo, box = Image.new("RGB", (200, 200), (90, 90, 90)), Box(40, 60, 120, 140, 0.9)
    near = np.s_[20:150, 30:130]                                     # the box and its label, nothing else
    three = np.asarray(annotate(photo, [box], first=3))[near]
    assert not np.array_equal(three, np.asarray(annotate(photo, [box]))[near])      # labelled "3", not "1"
    others = [Box(150, 150, 190, 190, 0.9), Box(150, 160, 195, 198, 0.9)]          # faces 1 and 2, far away
    assert np.array_equal(three, np.asarray(annotate(photo, others + [box]))[near])  # as drawn among all faces


def test_hard_kill_during_indexing_loses_only_the_photo_in_progress(tmp_path):
    """os._exit in the middle of the 3rd photo (no finally, no flush): the first two photos survive."""
    import subprocess
    import sys
    root = make_folder(tmp_path / "photos")
    for p in (root / "fer_0.png", root / "fer_1.png", root / "sky.jpg", root / "corrupt.jpg", root / "empty.png"):
        p.unlink()
    script = f"""
import os, sys
sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).resolve().parents[1])!r}]
import faces, test_photos as t
faces.detect_faces = t.fake_detect
enc = t.Encoder()
def encode(items):
    if enc.calls >= 4:          # two photos of two faces done
        os._exit(3)
    return enc(items)
ix = t.open_index(t.Path({str(root)!r}), t.Path({str(tmp_path / 'cache')!r}))
ix.update(ix.sources(), encode, progress=False)
"""
    assert subprocess.run([sys.executable, "-c", script]).returncode == 3
    ix = open_index(root, tmp_path / "cache")
    assert ix.n_photos() == 2 and len(ix) == 4
    enc = Encoder()
    stats = ix.update(ix.sources(), enc, progress=False)
    assert stats["unchanged"] == 2 and stats["added"] == 1 and enc.calls == 2 and len(ix) == 6


def test_decompression_bomb_is_one_skipped_line(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    Image.new("1", (8000, 6000)).save(root / "bomb.png")          # 48 MP in a few kB
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(root / "ok.jpg")
    ix = open_index(root, tmp_path / "cache")
    stats = ix.update(ix.sources(), Encoder(), progress=False)
    (line,) = failure_lines(stats)
    assert "bomb.png" in line and "pixel limit" in line and len(ix) == 2


def test_a_second_process_updating_the_same_index_is_refused_in_one_line(tmp_path):
    """Two builds of one gallery used to delete each other's temporary chunks and both fail, with entries lost."""
    import subprocess
    import sys
    root = make_folder(tmp_path / "photos")
    ix = open_index(root, tmp_path / "cache")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(ix.entries.dir / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        ix.entries.dir.mkdir(parents=True, exist_ok=True)
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match="another process is updating this index") as e:
            ix.update(ix.sources(), Encoder(), progress=False)
        assert "\n" not in str(e.value) and len(ix) == 0
    finally:
        holder.kill()
        holder.wait()
    assert ix.update(ix.sources(), Encoder(), progress=False)["added"] == 6          # free again


def test_an_index_folder_inside_the_gallery_is_not_read_as_photos(tmp_path):
    root = make_folder(tmp_path / "photos")
    ix = PhotoIndex(GalleryIndex(root, root / "idx" / "ck", "ck", DIM), "auto")
    ix.update(ix.sources(), Encoder(), progress=False)
    again = PhotoIndex(GalleryIndex(root, root / "idx" / "ck", "ck", DIM), "auto")
    assert list((root / "idx" / "ck" / "crops").glob("*.jpg"))                       # thumbnails there
    assert again.update(again.sources(), Encoder(), progress=False)["added"] == 0 and len(again) == 8


def test_results_of_photos_deleted_or_replaced_since_indexing_are_not_shown(tmp_path):
    """A replaced photo's old box was drawn on the new picture; a deleted one's thumbnail was still served."""
    from types import SimpleNamespace

    from photoviews import face_on_photo, result_items
    root = make_folder(tmp_path / "photos")
    ix = open_index(root, tmp_path / "cache")
    ix.update(ix.sources(), Encoder(), progress=False)
    engine = SimpleNamespace(index=ix, upload_dir=None)
    hits = [(root / "trip0/day/IMG_0.jpg#0", 0.9), (root / "trip1/day/IMG_1.jpg#1", 0.8), (root / "fer_0.png", 0.7)]
    assert len(result_items(engine, hits)) == 3
    (root / "trip1/day/IMG_1.jpg").unlink()
    Image.new("RGB", (500, 500), (1, 2, 3)).save(root / "trip0/day/IMG_0.jpg")          # replaced
    assert [c.split()[-1] for _, c in result_items(engine, hits)] == ["fer_0.png"]
    with pytest.raises(UserError, match="IMG_0.jpg: moved, deleted or changed since the gallery was indexed"):
        face_on_photo(engine, hits[0][0])


def _noisy(path: Path, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.effect_noise(size, 60).convert("RGB").save(path)
    return path


def test_a_folder_that_cannot_be_listed_is_named_once_and_its_photos_stay_indexed(tmp_path, monkeypatch, capsys):
    root = tmp_path / "g"
    _noisy(root / "open" / "a.jpg", (400, 300))
    _noisy(root / "locked" / "b.jpg", (400, 300))
    ix = open_index(root, tmp_path / "cache")
    ix.update(ix.sources(), Encoder(), progress=False)
    real = os.scandir

    def scandir(p="."):                                    # chmod 000 has no effect as root: refuse it here
        if os.fspath(p).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return real(p)
    monkeypatch.setattr(os, "scandir", scandir)
    stats = ix.update(ix.sources(), Encoder(), progress=False)
    assert capsys.readouterr().err.count(f"skipped folder {root / 'locked'}: permission denied") == 1
    assert stats["removed"] == 0 and ix.n_photos() == 2 and len(ix) == 4
    assert ix.entry(root / "locked/b.jpg#0").box is not None          # still searchable


def test_tiny_images_are_refused_as_too_small_not_indexed_as_faces(tmp_path):
    root = tmp_path / "g"
    root.mkdir()
    Image.new("RGB", (1, 1)).save(root / "dot.png")
    Image.new("RGB", (10, 10)).save(root / "ten.png")
    Image.new("RGB", (48, 48)).save(root / "ok.png")
    for mode in ("auto", "crops", "photos"):
        ix = open_index(root, tmp_path / mode, mode)
        stats = ix.update(ix.sources(), Encoder(), progress=False)
        assert stats["failed"] == 2 and ix.n_photos() == 1, mode
        assert stats["reasons"][str(root / "dot.png")].startswith("1x1 px is too small to read a face")
        assert all(line.startswith("skipped (too small): ") for line in failure_lines(stats))


def test_face_boxes_are_stored_in_the_files_own_pixels_and_drawn_at_the_decoded_scale(tmp_path):
    from types import SimpleNamespace

    from photoviews import face_on_photo
    root = tmp_path / "g"
    _noisy(root / "big.jpg", (3400, 2400))                    # decodes at 1700x1200 for detection
    ix = open_index(root, tmp_path / "cache")
    ix.update(ix.sources(), Encoder(), progress=False)
    e = ix.entry(root / "big.jpg#0")
    assert e.size == (3400, 2400) and e.box == (424, 600, 1556, 1732)     # fake_detect's (212, 300, 778, 866) x 2
    crop = face_on_photo(SimpleNamespace(index=ix), root / "big.jpg#0", draw=False)
    assert crop.size == (566, 566)


def test_an_unreadable_file_says_permission_denied_and_long_reasons_end_on_a_whole_word(tmp_path, monkeypatch):
    import image_files
    root = tmp_path / "g"
    _noisy(root / "locked.jpg", (400, 300))
    real = image_files.Image.open

    def locked(fp, *a, **kw):
        if str(fp).endswith("locked.jpg"):
            raise PermissionError(13, "Permission denied", str(fp))
        return real(fp, *a, **kw)
    monkeypatch.setattr(image_files.Image, "open", locked)
    ix = open_index(root, tmp_path / "cache")
    stats = ix.update(ix.sources(), Encoder(), progress=False)
    assert stats["reasons"][str(root / "locked.jpg")] == "permission denied (check its permissions)"
    stats = dict(failed=0, failed_paths=[], reasons={})
    PhotoIndex._fail(stats, root / "x.jpg", "word " * 60)
    assert stats["reasons"][str(root / "x.jpg")].endswith("word ...")


def test_uploads_with_one_name_are_told_apart_from_each_other_and_from_the_gallery(tmp_path):
    from types import SimpleNamespace

    from photoviews import shown_name
    up = tmp_path / "cache" / "uploads"
    engine = SimpleNamespace(index=SimpleNamespace(gallery=tmp_path / "g"), upload_dir=up)
    names = {shown_name(engine, p) for p in (up / "r1" / "IMG_0001.jpg", up / "r2" / "IMG_0001.jpg",
                                             tmp_path / "g" / "IMG_0001.jpg")}
    assert names == {"r1/IMG_0001.jpg", "r2/IMG_0001.jpg", "IMG_0001.jpg"}


def test_a_key_ending_in_a_non_ascii_digit_is_a_photo_key():
    assert split_key("a.jpg#²") == ("a.jpg#²", None) and split_key("a.jpg#12") == ("a.jpg", 12)


def test_a_file_name_with_a_newline_stays_on_one_line():
    stats = dict(failed_paths=[Path("a\nb.jpg")], reasons={"a\nb.jpg": "unreadable"})
    assert failure_lines(stats) == ["skipped (unreadable): a\\nb.jpg: unreadable"]


def test_the_readme_api_snippet_turns_a_result_key_into_its_photo_face_and_box(trained, tmp_path):
    from retrieval import Engine, search_text
    photo = _noisy(tmp_path / "g" / "party.jpg", (400, 300))
    engine = Engine.load(trained[0], tmp_path / "g", "cpu", tmp_path / "cache", progress=False)
    hits = search_text(engine, "a wide smile", k=5)                 # README's lines, as written there
    e = engine.index.entry(hits[0][0])
    key, cosine = hits[0]
    assert not Path(key).is_file() and str(key).startswith(str(photo) + "#") and -1 <= cosine <= 1
    assert e.photo == photo and e.face in (0, 1) and len(e.box) == 4
