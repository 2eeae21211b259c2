"""flax_vae/images.py, the one image reader (used by the CLI, encode-dataset and distillation), on small images
made here with Pillow: every everyday mode comes back as the 8-bit RGB image it shows (16-bit scaled, not
clipped; alpha on white; EXIF orientation; first frame), and anything unreadable or too large is a one-line
ValueError."""
import io
import warnings

import numpy as np
import PIL.Image
import pytest
from PIL import Image

from flax_vae import dataset, images
from flax_vae.train import data

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (24, 32), dtype=np.uint8)  # (H, W): every test image is 32 wide, 24 high
RGB = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)


def _bytes(im, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _read(im, fmt, **kw) -> np.ndarray:
    """Save `im` in `fmt`, read it back with open_image: (H, W, 3) int (for differences)."""
    out = images.open_image(_bytes(im, fmt, **kw))
    assert out.mode == "RGB"
    return np.asarray(out).astype(int)


def _sixteen_bit(gray8) -> np.ndarray:
    """A 16-bit copy of an 8-bit image: v * 257 plus up to 256 more (fractions of one 8-bit level)."""
    return gray8.astype(np.uint16) * 257 + RNG.integers(0, 257, gray8.shape).astype(np.uint16) * (gray8 < 255)


def _assert_gray(got, gray8, tolerance=0):
    assert got.shape == (*gray8.shape, 3)
    assert np.abs(got - gray8[..., None].astype(int)).max() <= tolerance


def test_8_bit_png():
    np.testing.assert_array_equal(_read(Image.fromarray(RGB), "PNG"), RGB)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_is_scaled_not_saturated(fmt):
    im = Image.fromarray(_sixteen_bit(GRAY))
    assert im.mode == "I;16"
    got = _read(im, fmt)
    _assert_gray(got, GRAY, tolerance=1)  # Pillow's convert("RGB") would give 255 for anything above 255 / 65535
    assert got.max() == 255 and got.min() == 0 and 100 < got.mean() < 155


def test_16_bit_big_endian_and_32_bit_int():
    x = _sixteen_bit(GRAY)
    big_endian = Image.frombytes("I;16B", (32, 24), x.astype(">u2").tobytes())
    assert Image.open(io.BytesIO(_bytes(big_endian, "TIFF"))).mode == "I;16B"
    _assert_gray(_read(big_endian, "TIFF"), GRAY, tolerance=1)
    _assert_gray(_read(Image.fromarray(x.astype(np.int32)), "TIFF"), GRAY, tolerance=1)  # mode I: 0..65535 too


def test_float_is_taken_in_0_1():
    x = GRAY.astype(np.float32) / 255
    _assert_gray(_read(Image.fromarray(x), "TIFF"), GRAY)


def test_grayscale_and_1_bit():
    _assert_gray(_read(Image.fromarray(GRAY), "PNG"), GRAY)
    _assert_gray(_read(Image.fromarray(GRAY > 127), "PNG"), np.where(GRAY > 127, 255, 0).astype(np.uint8))


def test_palette():
    im = Image.fromarray(RGB).quantize(16)
    np.testing.assert_array_equal(_read(im, "PNG"), np.asarray(im.convert("RGB")))


def test_palette_with_transparency_is_on_white():
    index = np.zeros((24, 32), np.uint8)
    index[:, 16:] = 1  # right half: the transparent entry, whose colour (blue) must not show
    im = Image.fromarray(index, "P")
    im.putpalette([255, 0, 0, 0, 0, 255])
    got = _read(im, "PNG", transparency=1)
    assert (got[:, :16] == [255, 0, 0]).all() and (got[:, 16:] == images.BACKGROUND).all()


def test_cmyk_jpeg():
    im = Image.new("CMYK", (32, 24), (0, 255, 255, 0))  # red
    assert Image.open(io.BytesIO(_bytes(im, "JPEG", quality=95))).mode == "CMYK"
    assert np.abs(_read(im, "JPEG", quality=95) - [255, 0, 0]).max() <= 4


def test_exif_orientation():
    stored = np.zeros((24, 32, 3), np.uint8)
    stored[:8, :8] = 255  # white block at the stored top left
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6  # shown rotated 90 degrees clockwise: the top left goes to the top right
    got = _read(Image.fromarray(stored), "JPEG", exif=exif, quality=95)
    assert got.shape == (32, 24, 3)  # width and height swap
    assert got[:8, -8:].min() > 200 and got[:, :-8].max() < 60 and got[8:].max() < 60


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_onto_white(mode):
    alpha = np.full((24, 32), 255, np.uint8)
    alpha[:, :8], alpha[:, 8:16] = 0, 64  # transparent, a quarter opaque, opaque
    colour = np.zeros((24, 32, 3), np.uint8)  # black under the transparent part too: it must not show
    im = Image.fromarray(np.dstack([colour, alpha])).convert(mode)
    got = _read(im, "PNG")
    assert (got[:, :8] == 255).all()
    assert np.abs(got[:, 8:16] - 255 * (1 - 64 / 255)).max() <= 1  # 64/255 black over white
    assert (got[:, 16:] == 0).all()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_gives_the_first_frame(fmt):
    frames = [Image.new("RGB", (32, 24), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    got = _read(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                **({"lossless": True} if fmt == "WEBP" else {}))
    assert np.abs(got - [255, 0, 0]).max() <= 2


@pytest.mark.parametrize("side", [12, 20])  # 144 pixels: Pillow would warn; 400 (over twice the limit): raise
def test_too_many_pixels_is_refused_before_decoding(monkeypatch, tmp_path, side):
    path = tmp_path / "big.png"
    Image.new("RGB", (side, side)).save(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="big.png: .*is more than PIL.Image.MAX_IMAGE_PIXELS = 100 pixels"):
            images.open_image(path)
        monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", None)
        assert images.open_image(path).size == (side, side)


@pytest.mark.parametrize("content", ["empty", "not_an_image", "truncated_png", "truncated_jpeg"])
def test_unreadable_files(tmp_path, content):
    png, jpeg = _bytes(Image.fromarray(RGB), "PNG"), _bytes(Image.fromarray(RGB), "JPEG")
    path = tmp_path / "photo.png"
    path.write_bytes({"empty": b"", "not_an_image": b"<html>404</html>", "truncated_png": png[:len(png) // 2],
                      "truncated_jpeg": jpeg[:len(jpeg) // 2]}[content])
    with pytest.raises(ValueError, match=r"photo.png: not a readable image: ") as e:
        images.read_image(path)
    assert "\n" not in str(e.value)


def test_read_image_to_uint8_to_pil_round_trip(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(RGB).save(path)
    x = images.read_image(path)
    assert x.dtype == np.float32 and x.shape == (24, 32, 3) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(images.to_uint8(x), RGB)
    np.testing.assert_array_equal(images.to_uint8(np.stack([x, x])), np.stack([RGB, RGB]))
    np.testing.assert_array_equal(np.asarray(images.to_pil(x)), RGB)
    assert images.to_uint8([-2.0, 2.0]).tolist() == [0, 255]
    with pytest.raises(ValueError, match="one .H, W, 3. image"):
        images.to_pil(np.stack([x, x]))


def test_encode_dataset_preprocessing_reads_16_bit_and_alpha():
    pre = dataset.Preprocessing(24)  # 24x24 images: no resize, which would spread one level over two
    gray, rgb, alpha = GRAY[:, :24], RGB[:, :24], RNG.integers(0, 256, (24, 24, 1), dtype=np.uint8)
    on_white = np.round(rgb * (alpha / 255) + 255 * (1 - alpha / 255)).astype(np.uint8)
    for image, copy in [(_sixteen_bit(gray), gray), (np.dstack([rgb, alpha]), on_white)]:
        got, want = pre.load(_bytes(Image.fromarray(image), "PNG")), pre.load(_bytes(Image.fromarray(copy), "PNG"))
        assert got[1:] == want[1:] == ((24, 24), (0, 0, 24, 24))
        assert np.abs(got[0].astype(int) - want[0]).max() <= 1


def test_training_data_skips_unreadable_and_tiny_files(tmp_path):
    for name in ["a.png", "c.jpg"]:
        Image.fromarray(RGB).save(tmp_path / name)
    (tmp_path / "b.png").write_bytes(b"not a png")
    Image.fromarray(RGB[:3, :2]).save(tmp_path / "d.png")  # upscaled to the crop, it would be blur
    listing = []
    files = data.image_files(tmp_path, listing)
    assert listing == [] and len(files) == 4
    crops = data.Crops(files, 16)
    assert len(crops.pyramids) == 2
    reason = "not a readable image: not an image (or a format Pillow cannot read)"
    tiny = "2x3 is too small: the short side must be at least 4 pixels (a quarter of the crop or evaluation size)"
    assert crops.skipped == [(tmp_path / "b.png", reason), (tmp_path / "d.png", tiny)]
    assert crops.sample(np.random.default_rng(0), 3, 16).shape == (3, 16, 16, 3)
    skipped = []
    assert data.eval_images(files, 16, skipped).shape == (2, 16, 16, 3) and skipped == crops.skipped
    with pytest.raises(ValueError, match="none of the 1 images is readable: .*b.png: not a readable image"):
        data.Crops([tmp_path / "b.png"], 16)
