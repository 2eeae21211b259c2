"""Images in and out: files <-> float arrays in [-1, 1], PSNR, side-by-side PNG grids; and the file-system guards
of the commands that read image folders and write outputs (the CLI, encode-dataset, distillation).

`open_image` is the one reader of image files in flax-vae: whatever the file's mode, it returns 8-bit RGB as the
image is meant to be seen (EXIF orientation applied, 16-bit and float data scaled rather than clipped, alpha
composited onto `BACKGROUND`), or raises a one-line ValueError. `find_files` is the one folder search: it survives
symbolic link loops, unreadable folders, broken links and special files, and reports them instead.
`check_writable` and `writing` turn an unwritable output folder and a full disk into one-line errors.
"""
import contextlib
import errno
import io
import os
import re
import stat
import struct
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .convert.checkpoint import write_atomic

ASSETS = Path(__file__).parent / "assets"
BUNDLED_PHOTOS = tuple(ASSETS / f"{n}.png" for n in ("astronaut", "coffee", "chelsea"))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # read by folder searches
BACKGROUND = (255, 255, 255)  # alpha is composited onto white, everywhere in flax-vae
EXIF_ORIENTATION = 0x0112
TURNED = (5, 6, 7, 8)  # EXIF orientations shown rotated by 90 degrees: width and height swap
# Pillow errors from damaged or unsupported files (UnidentifiedImageError and truncation are OSErrors)
READ_ERRORS = (OSError, SyntaxError, struct.error, EOFError, IndexError, TypeError, ValueError)
# warnings.catch_warnings changes process-wide state: one thread at a time. Opening reads the header only (in Python,
# under the GIL), so threads that decode in parallel (encode-dataset) lose nothing to this lock.
_opening = threading.Lock()
FULL_DISK = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file size limit exceeded"}


def open_image(source, draft=None) -> Image.Image:
    """An image file (a path, or its bytes) -> a PIL image in mode "RGB", 8 bits per channel, as it is shown:
    the EXIF orientation applied; the first frame of an animation (GIF, WebP, APNG); 16-bit and 32-bit integer
    data (I;16*, I) scaled from 0..65535 to 0..255 (/257) and float data (F) from [0, 1], not clipped; alpha
    (RGBA, LA, PA, palette or gray transparency) composited onto `BACKGROUND`; grayscale, 1-bit, palette, CMYK,
    YCbCr and LAB converted by Pillow.

    `draft`: an optional (width, height) the caller needs at least (as shown), or a function of the shown
    (width, height), read from the header before anything is decoded, returning one (or None); JPEGs are then
    decoded at the largest power-of-two reduction that keeps it (much faster). Images with more pixels than
    PIL.Image.MAX_IMAGE_PIXELS are refused before decoding, and a path that is not a regular file (a folder, a
    pipe) before it is opened. Raises ValueError, naming the file for a path."""
    name = "" if isinstance(source, (bytes, bytearray, memoryview)) else f"{printable(source)}: "
    with _reading(name):
        if name and not stat.S_ISREG(os.stat(source).st_mode):  # reading a pipe blocks, a device may never end
            raise ValueError("not a regular file (a folder, pipe, socket or device)")
    with _reading(name), _opening, warnings.catch_warnings():  # the size check below replaces Pillow's warning
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(source) if not name else source)
    with im:
        if Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS:
            raise _too_large(name, f"{im.width}x{im.height} ({im.width * im.height} pixels)")
        with _reading(name):
            turned = im.getexif().get(EXIF_ORIENTATION, 1) in TURNED
        shown = im.size[::-1] if turned else im.size
        if callable(draft):
            draft = draft(*shown)  # outside _reading: the caller's own errors pass unchanged
        with _reading(name):
            if draft:
                im.draft("RGB", tuple(draft)[::-1] if turned else tuple(draft))
            return _rgb(ImageOps.exif_transpose(im))


def _rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> "RGB" (8 bits): high bit depths scaled, alpha composited onto BACKGROUND."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):  # convert("RGB") would clip them at 255
        x = np.asarray(im, np.float32) * (255 if im.mode == "F" else 1 / 257)
        im = Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8))
    if im.has_transparency_data:
        im = Image.alpha_composite(Image.new("RGBA", im.size, BACKGROUND), im.convert("RGBA"))
    return im.convert("RGB")


@contextlib.contextmanager
def _reading(name):
    """Pillow's many errors for a damaged, truncated or unsupported file -> one one-line ValueError."""
    try:
        yield
    except Image.DecompressionBombError as e:  # over twice the limit (or a GIF frame, TIFF tile): Pillow's refusal
        raise _too_large(name, (re.search(r"\d+ pixels", str(e)) or ["an image"])[0]) from None
    except UnidentifiedImageError:
        raise ValueError(f"{name}not a readable image: not an image (or a format Pillow cannot read)") from None
    except READ_ERRORS as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{name}not a readable image: {reason}") from None


def _too_large(name, size) -> ValueError:
    return ValueError(f"{name}{size} is more than PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels "
                      f"(Pillow's guard against decompression bombs); to read it, raise PIL.Image.MAX_IMAGE_PIXELS "
                      f"(None: no limit)")


def read_image(path) -> np.ndarray:
    """An image file (see `open_image`) -> (H, W, 3) float32 in [-1, 1]."""
    return np.asarray(open_image(path), np.float32) / 127.5 - 1


def to_uint8(x):
    """[-1, 1] floats -> uint8 (clamped), any shape: (H, W, 3), (N, H, W, 3). jax arrays (traced ones too) are
    converted where they are, as a jax array; anything else on the host, as numpy."""
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.round((xp.clip(xp.asarray(x, xp.float32), -1, 1) + 1) * 127.5).astype(xp.uint8)


def to_pil(x) -> Image.Image:
    """One (H, W, 3) image in [-1, 1] -> an RGB PIL image (clamped)."""
    x = to_uint8(x)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"to_pil: expected one (H, W, 3) image, got shape {x.shape}")
    return Image.fromarray(np.asarray(x))


def psnr(a, b) -> float:
    """PSNR in dB of two [-1, 1] images, measured in [0, 1] after clamping (the reference figures' convention)."""
    a = (np.clip(np.asarray(a, np.float64), -1, 1) + 1) / 2
    b = (np.clip(np.asarray(b, np.float64), -1, 1) + 1) / 2
    return float(10 * np.log10(1 / np.mean((a - b) ** 2)))


def save_grid(path, rows):
    """Write rows of equally tall [-1, 1] images side by side (rows stacked) as one PNG (atomically)."""
    strips = [np.concatenate([to_uint8(im) for im in row], axis=1) for row in rows]
    width = max(s.shape[1] for s in strips)
    strips = [np.pad(s, ((0, 4), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in strips]
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(strips, axis=0)).save(buf, "PNG")
    with writing(path):
        write_atomic(path, buf.getvalue())


def printable(path) -> str:
    """A path as text that can be printed anywhere: bytes of a file name that are not UTF-8 (which Python keeps as
    lone surrogates, and a UTF-8 stdout refuses) are shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def find_files(folder, suffixes) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The regular files under `folder` (searched recursively, following symbolic links) whose suffix (any case)
    is in `suffixes`, sorted; and, as sorted (path, reason) pairs, what is skipped: folders that cannot be listed,
    links to a folder already searched (a loop), and files with those suffixes that are broken or looping links
    or not regular files (reading a pipe or a device would block or never end). Raises ValueError if `folder`
    itself cannot be listed."""
    root = Path(folder)
    files, problems, seen, todo = [], [], set(), [root]
    while todo:
        path = todo.pop()
        try:
            st = path.stat()
            inode = (st.st_dev, st.st_ino)
            if inode in seen:
                problems.append((path, "a link to a folder already searched (a loop, or a second link): skipped"))
                continue
            seen.add(inode)
            entries = sorted(os.scandir(path), key=lambda e: e.name, reverse=True)
        except OSError as e:
            if path == root:
                raise ValueError(f"{printable(root)}: cannot list this folder: {e.strerror}") from None
            problems.append((path, f"cannot list this folder: {e.strerror}"))
            continue
        for entry in entries:  # in reverse: folders are popped in name order, so the search order is fixed
            image = Path(entry.name).suffix.lower() in suffixes
            try:
                mode = entry.stat().st_mode
            except OSError as e:
                if image:
                    problems.append((Path(entry.path), f"cannot read it: {e.strerror}"))
                continue
            if stat.S_ISDIR(mode):
                todo.append(Path(entry.path))
            elif image and stat.S_ISREG(mode):
                files.append(Path(entry.path))
            elif image:
                problems.append((Path(entry.path), "not a regular file (a pipe, socket or device)"))
    return sorted(files), sorted(problems)


def check_writable(folder, what="output"):
    """Raise a one-line ValueError unless files can be created in `folder`, or, where it does not exist yet, in the
    nearest existing folder above it (where it would be made). Tried with a temporary file, not read from the
    permission bits, which root ignores and read-only mounts do not show. Creates nothing that stays."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{what} {printable(folder)}: cannot create the folder: {printable(existing)} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f"{what} {printable(folder)}: not writable ({e.strerror} in {printable(existing)}); "
                         f"choose another folder, or make it writable") from None


@contextlib.contextmanager
def writing(path):
    """A full disk, quota or file size limit (RLIMIT_FSIZE) while writing `path` -> one OSError line naming it.
    Writers are atomic, so the file is as it was: the rerun finds every finished piece of work."""
    try:
        yield
    except OSError as e:
        if e.errno not in FULL_DISK:
            raise
        raise OSError(f"{FULL_DISK[e.errno]} while writing {printable(path)} ({e.strerror}); nothing was half "
                      f"written: free some space (or raise the limit) and run the same command again") from None
