"""Real path: generated photos (two FER-2013 test faces each, some without a face, corrupt files) through MTCNN and
the bundled model, via `python index.py build` (a subprocess) and the demo's handlers. Skipped without FER-2013."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
FER = ROOT.parent / "shared" / "data" / "fer2013"
MODEL = ROOT / "models" / "exprclip-ferplus.pth"
HAPPY = "A person with a big, happy smile."
pytestmark = pytest.mark.skipif(not (FER / "test" / "happy").is_dir() or not MODEL.is_file(),
                                reason="needs ../shared/data/fer2013 and the bundled model")


def fer_faces(cls: str, n: int, seed: int) -> list[Image.Image]:
    paths = sorted((FER / "test" / cls).glob("*.png"))
    return [Image.open(paths[i]).convert("L") for i in np.random.default_rng(seed).choice(len(paths), n, False)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """6 photos, each one happy and one angry face (1-2 MP, nested, one grey, one EXIF-rotated), 2 without a
    face, a corrupt and a 0-byte file."""
    from bench_photos import make_photo, save_with_orientation
    root, rng = tmp_path_factory.mktemp("photos"), np.random.default_rng(0)
    happy, angry = fer_faces("happy", 6, 1), fer_faces("angry", 6, 2)
    for i in range(6):
        im = make_photo([happy[i], angry[i]] if i % 2 else [angry[i], happy[i]], 1 + i % 2, rng, grey=i == 4)
        p = root / f"album{i % 2}" / f"IMG_{i}.jpg"
        p.parent.mkdir(exist_ok=True)
        save_with_orientation(im, p) if i == 3 else im.save(p, quality=92)
    for j in range(2):
        make_photo([], 1, rng).save(root / f"wall_{j}.jpg")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "zero.png").write_bytes(b"")
    return root


def test_index_build_cli_finds_two_faces_per_photo_and_skips_bad_files(photos, tmp_path):
    cmd = [sys.executable, str(ROOT / "index.py"), "build", "--images", str(photos), "--checkpoint", str(MODEL),
           "--device", "cpu", "--index-dir", str(tmp_path / "ix")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "from 8 photos" in out.stdout and "failed 2" in out.stdout, out.stdout
    assert sum("skipped (unreadable)" in line for line in out.stdout.splitlines()) == 2
    n = int(out.stdout.split(": ", 1)[1].split()[0])
    assert 10 <= n <= 12                                       # 12 faces pasted; MTCNN finds nearly all
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert "added 0, changed 0, removed 0, unchanged 8" in again.stdout
    found = subprocess.run(cmd[:2] + ["search"] + cmd[3:-2] + ["--index-dir", str(tmp_path / "ix"), "--query",
                                                              HAPPY, "-k", "3"], capture_output=True, text=True,
                           cwd=ROOT, timeout=600)
    lines = found.stdout.splitlines()
    assert len(lines) == 3 and all("IMG_" in line and " face " in line for line in lines), found.stdout


@pytest.fixture(scope="module")
def engine(photos, tmp_path_factory):
    from retrieval import Engine
    return Engine.load(MODEL, photos, "cpu", tmp_path_factory.mktemp("cache"), progress=False)


def _page(engine):
    """The app's search and click functions, called as Gradio calls them (a click's gr.SelectData)."""
    import gradio as gr
    from gradio.helpers import special_args

    import demo
    app = demo.build_app(engine)
    search = next(f.fn for f in app.fns.values() if f.api_name == "search")
    pick = next(f.fn for f in app.fns.values() if getattr(f.fn, "__name__", "") == "pick")

    def click(keys, i, k):
        args, *_ = special_args(pick, [keys, k], event_data=gr.SelectData(None, {"index": i, "value": None}))
        return pick(*args)
    return search, click


def test_clicking_a_photo_result_shows_its_photo_with_the_box_and_similar_faces(engine):
    search, click = _page(engine)
    tiles, keys, msg = search(HAPPY, 4)
    assert len(tiles) == len(keys) == 4 and all("#" in k for k in keys)          # entry keys, not the crops
    shown, similar, note = click(keys, 1, 3)
    e = engine.index.entry(keys[1])
    assert f"face {e.face + 1} of {e.photo.parent.name}/{e.photo.name}" in note and "itself first" in note, note
    with Image.open(shown) as im:
        assert max(im.size) <= 1024 and im.size[0] > 400                           # the photo, not the crop
    assert len(similar) == 3 and similar[0][1].split()[1:] == tiles[1][1].split()[1:]     # itself first
    _, _, bad = click([Image.new("RGB", (9, 9))] * 2, 1, 3)                          # not a key: a message only
    assert bad.startswith("search first, then click") and "PIL" not in bad, bad


def test_photo_tiles_are_complete_files_written_once_and_atomically(engine, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    import demo
    import webguard
    writes, real = [], webguard.atomic_write

    def watched(path, write):
        def checked(tmp):
            assert Path(tmp).parent == Path(path).parent and Path(tmp) != Path(path)     # a temp name, then rename
            assert not Path(path).exists() or Image.open(path).verify() is None   # an existing one: complete
            write(tmp)
        writes.append(Path(path).name)
        real(path, checked)
    monkeypatch.setattr(webguard, "_server_folder", lambda kind: tmp_path)
    monkeypatch.setattr(webguard, "atomic_write", watched)
    h = demo.make_handlers(engine)
    with ThreadPoolExecutor(2) as pool:
        (a, _, _), (b, _, _) = pool.map(lambda _: h["search"](HAPPY, 4), range(2))
    assert [t for t, _ in a] == [t for t, _ in b] and len(a) == 4
    for tile, _ in a:
        assert Path(tile).parent == tmp_path
        with Image.open(tile) as im:
            im.load()                                                                  # complete: decodes whole
    assert sorted(set(writes)) == sorted(Path(t).name for t, _ in a) and not list(tmp_path.glob("*.tmp"))
    n = len(writes)                                                # at most 8: both may write one at once
    h["search"](HAPPY, 4)
    assert len(writes) == n <= 8                                   # the same crops: not written again


def test_demo_results_name_their_photo_show_its_box_and_find_similar_faces(engine, photos, tmp_path):
    import demo
    from retrieval import search_text
    h = demo.make_handlers(engine)
    items, _, msg = h["search"](HAPPY, 4)
    assert len(items) == 4 and all(Path(im).is_file() and "IMG_" in cap and "face" in cap for im, cap in items)
    paths = [str(p) for p, _ in search_text(engine, HAPPY, 4)]
    happy = [engine.index.entry(p) for p in paths]
    # the happy face of IMG_i is face 1 or 2 by size; check it by the crop's position: happy is left on odd photos
    left = [(e.box[0] + e.box[2]) / 2 < e.size[0] / 2 for e in happy]
    odd = [int(e.photo.stem.split("_")[1]) % 2 == 1 for e in happy]
    assert sum(a == b for a, b in zip(left, odd)) >= 3               # mostly the happy face
    shown, similar, note = h["pick"](paths, 0, 5)
    assert Image.open(shown).size[0] <= 1024 and len(similar) == 5 and "itself first" in note
    assert happy[0].photo.name in note
    z = tmp_path / "more.zip"                                   # last: the module's gallery gets a 9th photo
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(photos / "album0" / "IMG_0.jpg", "trip/IMG_0_copy.jpg")
        zf.writestr("../escape.jpg", b"not a photo")
    (status,) = h["add_photos"]([str(z)])
    assert "Added 1 photo(s)" in status and "now has 9 photos" in status and "escape.jpg" in status
    assert not (tmp_path / "escape.jpg").exists() and "9 photos" in demo.header(engine, False)
    assert "drawn sample" in demo.header(engine, True) and "--gallery" in demo.header(engine, True)
