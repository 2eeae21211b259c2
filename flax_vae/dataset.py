"""Image datasets for encoding: discovery (folders, webdataset-style tar shards), preprocessing, parallel loading.

Every image is an `Item` named by a key: its path relative to the input folder, and for a member of a tar shard
"<tar path>/<member name>". Items are sorted by key, so every process of a job sees the same list.

Preprocessing crops and resizes each image to a target size: the resolution squared ("centre" mode: the short
side resized to the resolution, centre crop), or the SDXL-style bucket with the closest aspect ratio ("buckets"
mode: centre crop to the bucket's aspect ratio, resize to the bucket). The crop box is recorded in the original
image's pixels, so the SDXL size conditioning follows from it (see `Preprocessing.target_size`).
"""
import dataclasses
import math
import os
import tarfile
from pathlib import Path

import grain
import numpy as np
from PIL import Image

from .images import IMAGE_SUFFIXES, find_files, open_image, printable

RESAMPLE = Image.Resampling.BICUBIC


@dataclasses.dataclass(frozen=True)
class Item:
    key: str
    path: str  # the file to read
    offset: int = 0  # members of a tar file: where their bytes start in `path`, and how many
    size: int = -1

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.size < 0:
                return f.read()
            available = max(0, os.fstat(f.fileno()).st_size - self.offset)
            if available < self.size:  # checked first: a lying tar header must not make us allocate its size
                raise ValueError(f"truncated tar member: {available} of {self.size} bytes")
            f.seek(self.offset)
            return f.read(self.size)


def discover(source) -> tuple[list[Item], list[dict]]:
    """The images under `source` (a folder, searched recursively with `images.find_files`, or one .tar file),
    sorted by key, and what could not be read as {"key", "reason"}: tar files that could not be read completely
    (the images before the damage are kept), tar members with unsafe names, folders that could not be searched,
    broken links."""
    source = Path(source)
    if source.is_dir():
        (files, skipped), base = find_files(source, (*IMAGE_SUFFIXES, ".tar")), source
    elif source.is_file() and source.suffix == ".tar":
        files, skipped, base = [source], [], source.parent
    else:
        raise ValueError(f"input {printable(source)}: not a folder or a .tar file")
    items, problems = [], [{"key": path.relative_to(base).as_posix(), "reason": reason} for path, reason in skipped]
    for path in files:
        key = path.relative_to(base).as_posix()
        if path.suffix.lower() == ".tar":
            _tar_members(path, key, items, problems)
        else:
            items.append(Item(key, str(path)))
    return sorted(items, key=lambda item: item.key), problems


def _tar_members(path, key, items, problems):
    """Append the image members of a plain (uncompressed) tar file to `items`, addressed by byte offset, and what
    cannot be read to `problems`. Nothing is extracted; members named outside the archive (absolute, or with ..)
    are skipped all the same, so that no key can lead a consumer outside its folder."""
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:  # reads the headers only, seeking past the members' data
                if not (m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES):
                    continue
                if m.name.startswith("/") or ".." in m.name.split("/"):
                    problems.append({"key": f"{key}/{m.name}", "reason": "unsafe member name (an absolute path or "
                                                                        "..): skipped, never read"})
                else:
                    items.append(Item(f"{key}/{m.name}", str(path), m.offset_data, m.size))
            f.seek(tar.offset)  # tarfile takes a damaged header after the first for the end of the archive
            if f.read(tarfile.BLOCKSIZE).strip(b"\0"):
                raise tarfile.ReadError(f"a damaged header at byte {tar.offset}")
    except (tarfile.TarError, OSError) as e:
        problems.append({"key": key, "reason": f"damaged or not a plain (uncompressed) tar file: {e}; the images "
                                               f"found before the damage are kept"})


def bucket_sizes(resolution: int, step: int, max_aspect: float = 4.0) -> tuple[tuple[int, int], ...]:
    """SDXL-style buckets as (height, width), widest first: for each side a multiple of `step`, the largest other
    side (also a multiple of `step`) with height * width <= resolution**2, and its transpose; aspect ratios up
    to `max_aspect`."""
    area, sizes = resolution * resolution, set()
    for h in range(step, resolution + 1, step):
        w = area // h // step * step
        if w / h <= max_aspect:
            sizes |= {(h, w), (w, h)}
    return tuple(sorted(sizes, key=lambda s: s[0] / s[1]))


def centre_crop(height, width, target_height, target_width) -> tuple[float, float, float, float]:
    """The largest centred box (top, left, bottom, right) of an image with the target's aspect ratio."""
    scale = max(target_height / height, target_width / width)
    crop_height, crop_width = min(height, target_height / scale), min(width, target_width / scale)  # not 1 ulp over
    top, left = (height - crop_height) / 2, (width - crop_width) / 2
    return top, left, top + crop_height, left + crop_width


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    resolution: int
    buckets: bool = False
    bucket_step: int = 64
    min_size: int = 0  # images whose short side is smaller are skipped

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        return bucket_sizes(self.resolution, self.bucket_step) if self.buckets else ((self.resolution,) * 2,)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is encoded at: the bucket of the closest aspect ratio
        (log scale; ties go to the first). SDXL's size conditioning for an image with crop box (top, left,
        bottom, right): original_size = (height, width), target_size = this,
        crop_coords_top_left = (top, left) * target_height / (bottom - top)."""
        aspect = math.log(width / height)
        return min(self.sizes, key=lambda s: abs(math.log(s[1] / s[0]) - aspect))

    def load(self, data: bytes):
        """Encoded image bytes -> (pixels (h, w, 3) uint8 at the target size, original (height, width),
        crop box (top, left, bottom, right) in original pixels). Read by `images.open_image` (as shown: EXIF
        orientation, alpha on white, 16-bit scaled). Raises ValueError on anything that is not a usable image."""
        shown = []

        def draft(width, height):  # the shown size, from the header: skip or plan the crop before decoding
            if min(height, width) < self.min_size:
                raise ValueError(f"{height}x{width} is smaller than the minimum size {self.min_size}")
            shown.append((height, width))
            th, tw = self.target_size(height, width)
            top, left, bottom, right = centre_crop(height, width, th, tw)
            # JPEG: decode at the largest power-of-two reduction that keeps at least the final scale
            return math.ceil(width * tw / (right - left)), math.ceil(height * th / (bottom - top))

        im = open_image(data, draft)
        (height, width), = shown
        th, tw = self.target_size(height, width)
        top, left, bottom, right = box = centre_crop(height, width, th, tw)
        sx, sy = im.width / width, im.height / height
        pixels = im.resize((tw, th), RESAMPLE, box=(left * sx, top * sy, min(right * sx, im.width),
                                                     min(bottom * sy, im.height)))
        return np.asarray(pixels), (height, width), box


@dataclasses.dataclass(frozen=True)
class Loaded:
    index: int  # the item's position in the sorted list
    key: str
    pixels: np.ndarray | None = None  # None: skipped, for `reason`
    original_size: tuple[int, int] = (0, 0)
    crop_box: tuple[float, float, float, float] = (0, 0, 0, 0)
    reason: str = ""


def load_item(indexed_item, preprocessing: Preprocessing) -> Loaded:
    index, item = indexed_item
    try:
        return Loaded(index, item.key, *preprocessing.load(item.read()))
    except Exception as e:  # noqa: BLE001  a damaged file raises anything (OSError, SyntaxError, struct.error,
        # DecompressionBombError, ...); it is reported and skipped, never allowed to stop the job
        return Loaded(index, item.key, reason=f"{type(e).__name__}: {e}")


def load_in_parallel(indexed_items, preprocessing: Preprocessing, threads: int, prefetch: int):
    """Load (index, item) pairs with `threads` threads and up to `prefetch` images read ahead; yields `Loaded` in
    input order. Threads suffice: Pillow releases the GIL while it decodes and resizes."""
    ds = grain.MapDataset.source(indexed_items).map(lambda x: load_item(x, preprocessing))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)))
