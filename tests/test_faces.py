import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faces import Box, crop_face, detect_faces, draw_boxes, faces_or_whole, safe_open_image
from utils import UserError

FER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fer2013"
# Two FER-2013 test/happy faces the cascades find at every size from 120 to 180 px on a grey canvas, with high
# votes (~125 and ~80; a face needs both cascades to agree or >= 10 votes) -- so the test checks the pipeline
# (padding, scaling, NMS, ordering), not the cascades' luck on a borderline face.
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


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_two_real_faces_found_largest_first(mode):
    boxes = detect_faces(_two_faces().convert(mode))
    assert len(boxes) == 2
    assert _centre_in(boxes[0], 40, 40, 180) and _centre_in(boxes[1], 420, 180, 140)
    assert boxes[0].area > boxes[1].area and all(b.score > 0 for b in boxes)
    assert [b.x0 for b in detect_faces(_two_faces(), max_faces=1)] == [boxes[0].x0]


def test_faces_or_whole_returns_face_crops():
    crops, boxes, found = faces_or_whole(_two_faces(), max_faces=10, grayscale=True)
    assert found and len(crops) == len(boxes) == 2
    for crop, box in zip(crops, boxes):
        assert crop.mode == "RGB" and crop.width == crop.height == round(max(box.w, box.h) * 1.25)
        a = np.asarray(crop)
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_face_cut_by_the_border_gives_boxes_and_crops_inside():
    canvas = Image.new("L", (300, 200), 128)
    canvas.paste(_fer(BIG, 180), (140, 40))                          # right 20 px fall off the canvas
    boxes = detect_faces(canvas)
    assert boxes, "the partly visible face should still be found"
    for b in boxes:
        assert 0 <= b.x0 < b.x1 <= 300 and 0 <= b.y0 < b.y1 <= 200
        assert crop_face(canvas, b, margin=0.5).size[0] <= 200


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
    clear = safe_open_image(_png(Image.new("RGBA", (8, 8), (0, 0, 0, 0))))
    assert clear.mode == "RGB" and clear.getpixel((0, 0)) == (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6                                                 # orientation: rotate 90 degrees
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (40, 20), "white").save(path, exif=exif)
    assert safe_open_image(path).size == (20, 40)
    assert safe_open_image(str(path)).size == (20, 40)
