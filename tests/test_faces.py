import io
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

import faces
import retrieval
from faces import (FER_TEMPLATE, Box, align_face, annotate, crop_face, detect_faces, draw_boxes, faces_or_whole,
                   pick_detector)
from image_files import safe_open_image
from utils import UserError

FER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fer2013"
# Two FER-2013 test/happy faces the cascades find at every size from 120 to 180 px on a grey canvas, with high
# votes (~125 and ~80; a face needs both cascades to agree or >= 10 votes), and MTCNN with probability > 0.99 --
# so the tests check the pipeline (padding, scaling, NMS, ordering), not a detector's luck on a borderline face.
BIG, SMALL = "PublicTest_10248771.png", "PublicTest_10245799.png"


def _fer(name: str, size: int) -> Image.Image:
    path = FER / "test" / "happy" / name
    if not path.is_file():
        pytest.skip(f"FER-2013 not found at {path}")
    return Image.open(path).convert("L").resize((size, size), Image.BICUBIC)


def _centre_in(box: Box, x0: int, y0: int, side: int) -> bool:
    cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    return abs(cx - (x0 + side / 2)) < side / 5 and abs(cy - (y0 + side / 2)) < side / 5


def _two_faces() -> Image.Image:
    canvas = Image.new("L", (640, 360), 128)
    canvas.paste(_fer(SMALL, 140), (420, 180))
    canvas.paste(_fer(BIG, 180), (40, 40))
    return canvas


@pytest.mark.parametrize("mode, detector", [("L", "haar"), ("RGB", "haar"), ("RGBA", "haar"), ("L", "mtcnn"),
                                            ("RGBA", "mtcnn")])           # RGB + mtcnn: the default, tested below
def test_two_real_faces_found_largest_first(mode, detector):
    boxes = detect_faces(_two_faces().convert(mode), detector=detector)
    assert len(boxes) == 2
    assert _centre_in(boxes[0], 40, 40, 180) and _centre_in(boxes[1], 420, 180, 140)
    assert boxes[0].area > boxes[1].area and all(b.score > 0 for b in boxes)
    assert [b.x0 for b in detect_faces(_two_faces(), max_faces=1, detector=detector)] == [boxes[0].x0]
    assert all((b.landmarks is None) == (detector == "haar") for b in boxes)


def test_mtcnn_is_the_default_and_gives_five_landmarks_inside_the_box():
    boxes = detect_faces(_two_faces())
    assert pick_detector("auto") == "mtcnn" and len(boxes) == 2
    for b in boxes:
        assert faces.MIN_PROB <= b.score <= 1 and len(b.landmarks) == 5
        (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = b.landmarks
        assert b.x0 < lx < nx < rx < b.x1 and b.y0 < ly < ny < mly < b.y1 and b.y0 < ry < ny < mry < b.y1


def test_haar_crops_are_squares_with_margin():
    crops, boxes, found = faces_or_whole(_two_faces(), max_faces=10, grayscale=True, detector="haar")
    assert found and len(crops) == len(boxes) == 2
    for crop, box in zip(crops, boxes):
        assert crop.mode == "RGB" and crop.width == crop.height == round(max(box.w, box.h) * 1.25)
        a = np.asarray(crop)
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_mtcnn_crops_are_aligned_at_the_faces_own_size():
    crops, boxes, found = faces_or_whole(_two_faces(), max_faces=10, grayscale=True)
    assert found and len(crops) == len(boxes) == 2
    for crop, side in zip(crops, (180, 140)):                        # the pasted FER faces' sides
        assert crop.mode == "RGB" and crop.width == crop.height and 0.8 * side <= crop.width <= 1.25 * side
        a = np.asarray(crop)
        assert (a[..., 0] == a[..., 1]).all() and a.std() > 20        # grey, and a face, not the flat canvas
    wide = crop_face(_two_faces(), boxes[0], margin=1.5)              # margin widens the same framing
    assert wide.width == pytest.approx(crops[0].width * 2.5 / 1.25, abs=2)


@pytest.mark.parametrize("detector", ["haar", "mtcnn"])
def test_face_cut_by_the_border_gives_boxes_and_crops(detector):
    canvas = Image.new("L", (300, 200), 128)
    canvas.paste(_fer(BIG, 180), (140, 40))                          # right 20 px fall off the canvas
    boxes = detect_faces(canvas, detector=detector)
    assert boxes, "the partly visible face should still be found"
    for b in boxes:
        assert 0 <= b.x0 < b.x1 <= 300 and 0 <= b.y0 < b.y1 <= 200
        crop = crop_face(canvas, b, margin=0.5)
        assert crop.width == crop.height and (crop.width <= 200 or detector == "mtcnn")  # Haar: inside the image


def test_without_facenet_pytorch_auto_falls_back_to_haar(monkeypatch):
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)         # `import facenet_pytorch` -> ImportError
    assert pick_detector("auto") == "haar"
    boxes = detect_faces(_two_faces())
    assert len(boxes) == 2 and all(b.landmarks is None for b in boxes)
    assert boxes == detect_faces(_two_faces(), detector="haar")
    with pytest.raises(UserError, match="facenet-pytorch"):
        detect_faces(_two_faces(), detector="mtcnn")
    with pytest.raises(UserError, match="use one of auto, mtcnn, haar"):
        detect_faces(_two_faces(), detector="yolo")


def _blobs(a: np.ndarray, lo: int, hi: int) -> list[tuple[float, float]]:
    """Centroids (x, y) of the two largest blobs of pixels in [lo, hi], left to right."""
    import cv2
    n, _, stats, cent = cv2.connectedComponentsWithStats(((a >= lo) & (a <= hi)).astype(np.uint8))
    big = sorted(range(1, n), key=lambda i: -stats[i, cv2.CC_STAT_AREA])[:2]
    return sorted((float(cent[i][0]), float(cent[i][1])) for i in big)


def test_align_face_levels_the_eyes_and_frames_like_fer():
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    pts = (FER_TEMPLATE - 0.5) * 160 @ np.array([[c, s], [-s, c]]) + [230, 200]   # a face turned by 20 degrees
    image = Image.new("L", (420, 400), 128)
    draw = ImageDraw.Draw(image)
    for i, (x, y) in enumerate(pts):
        if i != 2:                                                    # eyes black, mouth corners white
            draw.ellipse((x - 7, y - 7, x + 7, y + 7), fill=0 if i < 2 else 255)
    eyes = _blobs(np.asarray(image), 0, 60)
    assert abs(math.degrees(math.atan2(eyes[1][1] - eyes[0][1], eyes[1][0] - eyes[0][0]))) > 15
    crop = align_face(image, pts)
    a = np.asarray(crop.convert("L"))
    n = crop.width
    assert crop.size == (n, n) and abs(n - 160) <= 2                  # the face's own size
    (lx, ly), (rx, ry) = _blobs(a, 0, 60)
    assert abs(math.degrees(math.atan2(ry - ly, rx - lx))) < 2        # level
    for (x, y), (tx, ty) in zip([(lx, ly), (rx, ry)], FER_TEMPLATE[:2] * n):
        assert abs(x - tx) < 0.03 * n and abs(y - ty) < 0.03 * n      # where FER-2013 puts the eyes
    mouth = _blobs(a, 200, 255)
    assert len(mouth) == 2 and all(y > ly + 0.3 * n for _, y in mouth)   # upright: mouth below the eyes


def test_rotated_real_face_comes_out_with_level_eyes():
    canvas = Image.new("L", (400, 400), 128)
    canvas.paste(_fer(BIG, 170), (115, 115))
    canvas = canvas.rotate(20, resample=Image.BICUBIC, fillcolor=128)  # counter-clockwise on screen
    [box] = detect_faces(canvas)
    (lx, ly), (rx, ry) = box.landmarks[:2]
    assert abs(math.degrees(math.atan2(ry - ly, rx - lx)) + 20) < 7  # the detector sees the tilt
    crop = crop_face(canvas, box).convert("L")
    again = Image.new("L", (crop.width * 2, crop.height * 2), 128)
    again.paste(crop, (crop.width // 2, crop.height // 2))
    [box2] = detect_faces(again)
    (lx, ly), (rx, ry) = box2.landmarks[:2]
    assert abs(math.degrees(math.atan2(ry - ly, rx - lx))) < 5       # after alignment: level


def _photos() -> list[Image.Image]:
    """Four different photos (sizes, positions, face sizes, tilt) with two real faces each."""
    out = []
    for k in range(4):
        canvas = Image.new("L", (420 + 40 * k, 300 + 20 * k), 110 + 8 * k)
        canvas.paste(_fer(BIG, 130 + 10 * k), (20 + 8 * k, 30))
        canvas.paste(_fer(SMALL, 110 + 6 * k), (260 + 30 * k, 120 + 10 * k))
        out.append(canvas.rotate(3 * k - 6, fillcolor=110 + 8 * k).convert("RGB"))
    return out


@pytest.mark.parametrize("detector", ["haar", "mtcnn"])
def test_concurrent_detection_equals_sequential(detector):
    photos = _photos()
    want = [detect_faces(p, detector=detector) for p in photos]
    assert sum(map(len, want)) >= 6                                   # the photos do have faces
    with ThreadPoolExecutor(4) as pool:                               # as Gradio's worker threads do
        got = list(pool.map(lambda p: detect_faces(p, detector=detector), photos * 2))
    assert got == want * 2                                            # boxes, scores and landmarks identical


def _big_photo() -> Image.Image:
    big = Image.new("RGB", (6000, 4000), (128, 128, 128))             # 24 MP
    big.paste(_fer(BIG, 1200).convert("RGB"), (2000, 1000))
    return big


def test_large_photo_is_detected_on_a_small_copy(monkeypatch):
    big, seen, real = _big_photo(), [], faces._run_mtcnn
    monkeypatch.setattr(faces, "_run_mtcnn", lambda a, m: seen.append(a.shape) or real(a, m))
    [box] = detect_faces(big)
    assert max(seen[0][:2]) <= faces.DETECT_SIDE                      # the detector saw a reduced copy ...
    assert _centre_in(box, 2000, 1000, 1200) and box.w > 800          # ... boxes and landmarks come back in
    assert all(2000 < x < 3200 and 1000 < y < 2200 for x, y in box.landmarks)   # input pixels
    crop = crop_face(big, box)
    assert crop.width == crop.height == faces.CROP_SIDE               # reduced to what a model can use


def test_rank_faces_returns_a_small_annotated_image(monkeypatch):
    monkeypatch.setattr(retrieval, "score_images", lambda engine, ims, sents: np.full((len(ims), len(sents)), 0.5))
    engine = SimpleNamespace(cfg=SimpleNamespace(grayscale=True))
    res = retrieval.rank_faces(engine, _big_photo(), ["a smile", "a frown"], max_faces=5)
    assert res.found and len(res.boxes) == 1 and res.probs.shape == (1, 2)
    assert res.shown.size == (faces.DISPLAY_SIDE, round(faces.DISPLAY_SIDE * 2 / 3))   # 6000x4000 -> 1024x683
    f = faces.DISPLAY_SIDE / 6000
    x0, y0 = round(res.boxes[0].x0 * f), round((res.boxes[0].y0 + res.boxes[0].y1) / 2 * f)
    assert res.shown.getpixel((x0 + 1, y0))[1] > 200                  # the green outline at the scaled box
    off = retrieval.rank_faces(engine, _big_photo(), ["a smile"], detect=False)
    assert not off.found and max(off.shown.size) == faces.DISPLAY_SIDE


def test_annotate_scales_boxes_and_landmarks():
    image = Image.new("RGB", (4000, 2000), (0, 0, 0))
    shown = annotate(image, [Box(1000, 500, 2000, 1500, 0.99, ((1400.0, 900.0),) * 5)], side=400)
    assert shown.size == (400, 200) and image.getpixel((1000, 1000)) == (0, 0, 0)
    assert shown.getpixel((100, 100))[1] > 200 and shown.getpixel((140, 90))[1] > 200   # box edge, landmark dot
    assert shown.getpixel((170, 120)) == (0, 0, 0)


@pytest.mark.parametrize("kind", ["noise", "gradient"])
def test_no_face_falls_back_to_centre_square(kind):
    rng = np.random.default_rng(0)
    a = (rng.integers(0, 256, (360, 640, 3), dtype=np.uint8) if kind == "noise"
         else np.tile(np.linspace(0, 255, 640).astype(np.uint8)[None, :, None], (360, 1, 3)))
    image = Image.fromarray(a)
    assert detect_faces(image) == []
    crops, boxes, found = faces_or_whole(image, max_faces=5, grayscale=False)
    assert not found and len(crops) == len(boxes) == 1
    assert crops[0].size == (360, 360) and (boxes[0].x0, boxes[0].y0, boxes[0].x1) == (140, 0, 500)
    assert np.array_equal(np.asarray(crops[0]), a[:, 140:500])


@pytest.mark.parametrize("box", [Box(-50, -50, 30, 30), Box(200, 150, 280, 260), Box(0, 0, 250, 200),
                                 Box(10, 90, 240, 110), Box(5, 5, 5, 5), Box(400, 400, 450, 450)])
def test_crop_stays_inside_and_square(box):
    xs, ys = np.meshgrid(np.arange(250), np.arange(200))
    image = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8))  # R = x, G = y
    crop = np.asarray(crop_face(image, box, margin=0.25))
    side = crop.shape[0]
    assert crop.shape[:2] == (side, side) and 1 <= side <= 200
    x0, y0 = int(crop[0, 0, 0]), int(crop[0, 0, 1])
    assert x0 >= 0 and y0 >= 0 and x0 + side <= 250 and y0 + side <= 200
    assert crop[-1, -1, 0] == x0 + side - 1 and crop[-1, -1, 1] == y0 + side - 1  # a real region, no padding


def test_draw_boxes_copies_and_marks():
    image = Image.new("RGB", (200, 100), (10, 10, 10))
    out = draw_boxes(image, [Box(20, 20, 80, 80, 5.0), Box(120, 30, 180, 90, 3.0)])
    assert out.size == image.size and out is not image
    assert image.getpixel((20, 50)) == (10, 10, 10) and out.getpixel((20, 50)) != (10, 10, 10)


def _png(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_safe_open_refuses_bombs(monkeypatch):
    data = _png(Image.new("RGB", (200, 200), "red"))
    with pytest.raises(UserError, match="pixel limit"):
        safe_open_image(data, max_pixels=10_000)
    with pytest.raises(UserError, match="pixel limit"):
        safe_open_image(Image.new("RGB", (200, 200)), max_pixels=10_000)
    for limit in (15_000, 30_000):                                   # PIL's own error (> 2x) and warning (> 1x)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(UserError, match="decompression bomb"):
            safe_open_image(data, max_pixels=10**9)


@pytest.mark.parametrize("data", [b"definitely not an image", b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_safe_open_refuses_non_images(data):
    with pytest.raises(UserError) as e:
        safe_open_image(data)
    assert "\n" not in str(e.value) and "image data" in str(e.value)


def test_safe_open_refuses_truncated_and_missing(tmp_path):
    rng = np.random.default_rng(0)
    data = _png(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.jpg"):
        safe_open_image(path)
    with pytest.raises(UserError, match="no such file"):
        safe_open_image(tmp_path / "missing.png")


def test_safe_open_converts_modes_and_orientation(tmp_path):
    sixteen = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert safe_open_image(_png(sixteen)).getpixel((0, 0)) == (255, 255, 255)
    cmyk = safe_open_image(_png(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    r, g, b = cmyk.getpixel((4, 4))
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60
    pal = Image.new("RGB", (8, 8), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert safe_open_image(_png(pal)).getpixel((0, 0)) == (0, 0, 255)
    unit = Image.fromarray(np.full((8, 8), 0.8, dtype=np.float32), "F")           # a float TIFF in 0..1
    assert safe_open_image(unit).getpixel((0, 0)) == (204, 204, 204)
    wide = Image.fromarray(np.linspace(0, 1000, 64, dtype=np.float32).reshape(8, 8), "F")   # 0..1000: stretched
    assert safe_open_image(wide).getpixel((7, 7)) == (255, 255, 255) and safe_open_image(wide).getpixel((0, 0))[0] == 0
    clear = safe_open_image(_png(Image.new("RGBA", (8, 8), (0, 0, 0, 0))))
    assert clear.mode == "RGB" and clear.getpixel((0, 0)) == (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6                                                 # orientation: rotate 90 degrees
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (40, 20), "white").save(path, exif=exif)
    assert safe_open_image(path).size == (20, 40)
    assert safe_open_image(str(path)).size == (20, 40)


def test_safe_open_decodes_big_jpegs_at_reduced_scale(tmp_path):
    Image.new("RGB", (4000, 3000), "white").save(tmp_path / "big.jpg", quality=80)
    Image.new("RGB", (1200, 900), "white").save(tmp_path / "big.png")
    assert safe_open_image(tmp_path / "big.jpg", max_side=900).size == (1000, 750)   # 1/4 scale, still >= 900
    assert safe_open_image(tmp_path / "big.jpg", max_side=2000).size == (2000, 1500)
    assert safe_open_image(tmp_path / "big.jpg").size == (4000, 3000)
    assert safe_open_image(tmp_path / "big.png", max_side=100).size == (1200, 900)    # only JPEG has a draft mode
    with pytest.raises(UserError, match="pixel limit"):
        safe_open_image(tmp_path / "big.jpg", max_pixels=10_000_000, max_side=900)    # checked at full size


def test_nothing_found_searches_again_inside_a_grey_border(monkeypatch):
    """A face filling the frame gives MTCNN no context: the second search pads the image with grey and its boxes
    and landmarks come back in the image's own pixels."""
    calls = []

    def fake(rgb, min_face):
        calls.append(rgb)
        if len(calls) == 1:
            return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
        lm = np.array([[[100.0, 110], [140, 110], [120, 130], [105, 150], [135, 150]]])
        return np.array([[70.0, 60, 170, 190]]), np.array([0.99]), lm

    monkeypatch.setattr(faces, "_run_mtcnn", fake)
    image = Image.fromarray(np.full((200, 200, 3), 40, np.uint8))
    boxes = detect_faces(image, detector="mtcnn")
    p = round(faces.MTCNN_RETRY_PAD * 200)                               # 50 px of grey on each side
    assert len(calls) == 2 and calls[1].shape == (200 + 2 * p, 200 + 2 * p, 3)
    assert (calls[1][:p] == 128).all() and (calls[1][p:-p, p:-p] == 40).all()
    assert [(b.x0, b.y0, b.x1, b.y1) for b in boxes] == [(20, 10, 120, 140)]
    assert boxes[0].landmarks[0] == (50.0, 60.0)
    calls.clear()
    monkeypatch.setattr(faces, "MTCNN_RETRY_PAD", 0.0)
    assert detect_faces(image, detector="mtcnn") == [] and len(calls) == 1


def test_a_face_found_at_once_is_not_searched_again(monkeypatch):
    calls = []
    real = faces._run_mtcnn
    monkeypatch.setattr(faces, "_run_mtcnn", lambda rgb, m: calls.append(rgb.shape) or real(rgb, m))
    boxes = detect_faces(_two_faces().convert("RGB"), detector="mtcnn")
    assert len(boxes) == 2 and len(calls) == 1


@pytest.mark.parametrize("name", ["PublicTest_10303060.png", "PublicTest_13280750.png"])
def test_a_real_face_filling_the_frame_is_found_by_the_padded_retry(monkeypatch, name):
    """Two FER-2013 test faces upscaled to 224 px (a tight crop over CROP_MAX_SIDE): MTCNN's single search misses
    them; the grey-bordered retry finds each, its box covering most of the frame."""
    image = _fer(name, 224).convert("RGB")
    monkeypatch.setattr(faces, "MTCNN_RETRY_PAD", 0.0)
    assert detect_faces(image) == []
    monkeypatch.setattr(faces, "MTCNN_RETRY_PAD", 0.25)
    (box,) = detect_faces(image, max_faces=1)
    assert box.score >= faces.MIN_PROB and box.w >= 150 and box.h >= 150 and len(box.landmarks) == 5
    assert _centre_in(box, 0, 0, 224)


def test_a_heic_photo_without_pillow_heif_is_one_line_naming_the_package(tmp_path, monkeypatch):
    """Phone photos are listed with the other images; without the optional pillow-heif each is refused saying what
    to install, and a broken JPEG keeps its own message."""
    import image_files
    from index import list_images
    monkeypatch.setattr(image_files, "HEIF_READABLE", False)
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    (tmp_path / "b.jpg").write_bytes(b"junk")
    assert [p.name for p in list_images(tmp_path)] == ["IMG_0001.HEIC", "b.jpg"]
    with pytest.raises(UserError, match=r"IMG_0001.HEIC: a HEIC/HEIF photo; .*pip install pillow-heif"):
        image_files.safe_open_image(tmp_path / "IMG_0001.HEIC")
    with pytest.raises(UserError, match="b.jpg: not an image file PIL can read"):
        image_files.safe_open_image(tmp_path / "b.jpg")


def test_heic_photos_are_read_like_any_other_when_pillow_heif_is_installed(tmp_path):
    pytest.importorskip("pillow_heif")
    from image_files import safe_open_image
    from utils import HEIF_READABLE
    assert HEIF_READABLE
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "a.heic")
    im = safe_open_image(tmp_path / "a.heic")
    assert im.size == (64, 48) and im.mode == "RGB" and abs(im.getpixel((5, 5))[0] - 200) < 8
