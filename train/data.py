"""Training images: a folder -> augmented random crops, a pure function of a numpy Generator.

Each image is kept as a small pyramid (scales 1, 3/4, 1/2, 3/8), so one crop size sees both detail and layout.
Augmentations: random scale, position, horizontal flip, rotation by 90 degrees, brightness/contrast/saturation.
Images are read by `flax_vae.images.open_image` (as shown: EXIF orientation, alpha on white, 16-bit scaled); the
unreadable and the tiny ones are skipped and recorded, as encode-dataset does.
"""
from pathlib import Path

import numpy as np
from PIL import Image

from flax_vae.images import IMAGE_SUFFIXES, find_files, open_image, printable

SCALES = (1.0, 0.75, 0.5, 0.375)


def image_files(folder, skipped: list) -> list[Path]:
    """The image files under `folder` (`images.find_files`); what cannot be searched (folders, broken links) is
    appended to `skipped` as (path, reason)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"data folder {printable(folder)}: not a folder")
    files, problems = find_files(folder, IMAGE_SUFFIXES)
    skipped += problems
    if not files:
        raise ValueError(f"data folder {printable(folder)}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def readable(files, skipped: list, min_side: int):
    """The readable files in `files` as RGB PIL images; the others, and those whose short side is under `min_side`
    (found from the header, before decoding), are appended to `skipped` as (path, reason)."""
    def check_size(width, height):
        if min(width, height) < min_side:  # upscaled more than 4x, an image is blur; 100000x1 would be gigabytes
            raise ValueError(f"{width}x{height} is too small: the short side must be at least {min_side} pixels "
                             f"(a quarter of the crop or evaluation size)")

    for path in files:
        try:
            yield open_image(path, check_size)
        except ValueError as e:
            skipped.append((Path(path), str(e).removeprefix(f"{printable(path)}: ")))


def _none_readable(skipped) -> ValueError:
    return ValueError(f"none of the {len(skipped)} images is readable: "
                      + "; ".join(f"{path}: {reason}" for path, reason in skipped[:3])
                      + ("; ..." if len(skipped) > 3 else ""))


class Crops:
    """Random augmented square crops of the images in `files`, as (N, size, size, 3) float32 in [-1, 1].
    Unreadable files, and images whose short side is under a quarter of `max_crop`, are skipped: `skipped` lists
    them as (path, reason); none readable raises ValueError."""

    def __init__(self, files, max_crop: int):
        self.pyramids, self.skipped = [], []
        for im in readable(files, self.skipped, max(1, max_crop // 4)):
            if min(im.size) < max_crop:  # small images are upscaled so that every crop size fits
                im = im.resize([round(s * max_crop / min(im.size)) for s in im.size], Image.BICUBIC)
            self.pyramids.append([np.asarray(im.resize([round(s * scale) for s in im.size], Image.LANCZOS))
                                  for scale in SCALES if min(im.size) * scale >= max_crop / 2])
        if not self.pyramids:
            raise _none_readable(self.skipped)

    def sample(self, rng: np.random.Generator, n: int, size: int) -> np.ndarray:
        out = np.empty((n, size, size, 3), np.float32)
        for i in range(n):
            levels = [lv for lv in self.pyramids[rng.integers(len(self.pyramids))] if min(lv.shape[:2]) >= size]
            level = levels[rng.integers(len(levels))]  # scale 1 always fits: images are at least max_crop
            y, x = rng.integers(level.shape[0] - size + 1), rng.integers(level.shape[1] - size + 1)
            crop = np.rot90(level[y:y + size, x:x + size], k=rng.integers(4))
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            out[i] = jitter(crop.astype(np.float32) / 127.5 - 1, rng)
        return out


def jitter(x, rng, strength=0.1):
    """Brightness, contrast and saturation, each within +-strength (relative), clamped to [-1, 1]."""
    gray = x.mean(axis=-1, keepdims=True)
    x = gray + (x - gray) * (1 + strength * 3 * rng.uniform(-1, 1))  # saturation (gray images stay gray)
    x = x.mean() + (x - x.mean()) * (1 + strength * rng.uniform(-1, 1))  # contrast
    return np.clip(x + strength * rng.uniform(-1, 1), -1, 1)  # brightness


def eval_images(files, size: int, skipped: list | None = None) -> np.ndarray:
    """Held-out images: the short side resized to `size`, the centre `size` x `size` square. (N, size, size, 3)
    float32 in [-1, 1], N the readable files whose short side is at least a quarter of `size` (the others are
    appended to `skipped` as (path, reason), when given); none readable raises ValueError."""
    out = []
    skipped = [] if skipped is None else skipped
    for im in readable(files, skipped, max(1, size // 4)):
        scale = size / min(im.size)
        im = im.resize([max(size, round(s * scale)) for s in im.size], Image.LANCZOS)
        left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
        out.append(np.asarray(im.crop((left, top, left + size, top + size)), np.float32) / 127.5 - 1)
    if not out:
        raise _none_readable(skipped)
    return np.stack(out)
