"""Images in and out: files <-> float arrays in [-1, 1], PSNR, side-by-side PNG grids."""
from pathlib import Path

import numpy as np
from PIL import Image

ASSETS = Path(__file__).parent / "assets"
BUNDLED_PHOTOS = tuple(ASSETS / f"{n}.png" for n in ("astronaut", "coffee", "chelsea"))


def read_image(path) -> np.ndarray:
    """An image file -> (H, W, 3) float32 in [-1, 1]."""
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image: {e}") from None
    return rgb / 127.5 - 1


def to_uint8(x) -> np.ndarray:
    """[-1, 1] floats -> uint8 (clamped)."""
    return np.round((np.clip(np.asarray(x, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


def psnr(a, b) -> float:
    """PSNR in dB of two [-1, 1] images, measured in [0, 1] after clamping (the reference figures' convention)."""
    a = (np.clip(np.asarray(a, np.float64), -1, 1) + 1) / 2
    b = (np.clip(np.asarray(b, np.float64), -1, 1) + 1) / 2
    return float(10 * np.log10(1 / np.mean((a - b) ** 2)))


def save_grid(path, rows):
    """Write rows of equally tall [-1, 1] images side by side (rows stacked) as one PNG."""
    strips = [np.concatenate([to_uint8(im) for im in row], axis=1) for row in rows]
    width = max(s.shape[1] for s in strips)
    strips = [np.pad(s, ((0, 4), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in strips]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(strips, axis=0)).save(path)
