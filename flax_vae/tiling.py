"""Tiled encode/decode for every family: bounded memory for large images and large batches.

The image (or latent) is cut into overlapping tiles of one fixed shape, so one compilation serves the
whole image and every image size; tiles of all the images run `batch` at a time; the outputs are accumulated
on the host with weights that cross-fade linearly between neighbours over `blend` pixels centred in the overlap.

Weights are zero in the outer (overlap - blend) / 2 pixels of a tile's inner edges, so a purely local
model (e.g. TAESD's classic layout) gives the untiled result exactly once that margin covers its
receptive field. Models with global operations (DC-AE's linear attention, GroupNorm statistics, KL's
mid-block attention) see only their tile: the result differs everywhere, less so with larger tiles.
"""
import dataclasses
import math

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How to cut images (encode) or latents (decode) into tiles; all lengths in image pixels, multiples of the
    model's factor. Pass as `tile=` to `Autoencoder.encode` / `decode` / `decode_uint8`."""
    size: int | None = 512  # tile side, image pixels; None: whole images (only the batch is sliced)
    overlap: int = 128  # image pixels shared by neighbouring tiles (at least; tiles spread evenly)
    blend: int | None = None  # cross-fade width in image pixels, centred in the overlap; default overlap // 2
    batch: int = 4  # tiles per model call, whatever the number of images

    def checked(self, factor: int) -> "Tiling":
        """This tiling with its blend filled in, or a ValueError where it does not fit a model of this factor."""
        if self.batch < 1:
            raise ValueError(f"tiling: batch must be at least 1, got {self.batch}")
        if self.size is None:
            return self
        blend = self.overlap // 2 if self.blend is None else self.blend
        if any(v % factor for v in (self.size, self.overlap, blend)) or not 0 < blend <= self.overlap < self.size:
            raise ValueError(f"tiling: need size > overlap >= blend > 0, all multiples of the model's factor "
                             f"{factor}; got size={self.size}, overlap={self.overlap}, blend={blend}")
        return dataclasses.replace(self, blend=blend)


def tiled_encode(encode, images, tiling: Tiling, factor: int):
    """encode (a batch fn) tile by tile: (N, H, W, 3) -> (N, H/f, W/f, C); H, W multiples of the factor."""
    return _tiled(encode, images, tiling.checked(factor), factor, step_in=factor, step_out=1)


def tiled_decode(decode, latents, tiling: Tiling, factor: int):
    """decode (a batch fn) tile by tile: (N, h, w, C) -> (N, h*f, w*f, 3)."""
    return _tiled(decode, latents, tiling.checked(factor), factor, step_in=1, step_out=factor)


def _tiled(fn, x, tiling, factor, step_in, step_out):
    """Run fn over tiles, `tiling.batch` (image, tile) pairs per call. Positions are counted in grid cells:
    one latent = `factor` image pixels; a cell is step_in input and step_out output elements wide."""
    grid = (x.shape[1] // step_in, x.shape[2] // step_in)
    tile = grid if tiling.size is None else tuple(min(tiling.size // factor, g) for g in grid)
    starts = [_starts(g, t, tiling.overlap // factor) for g, t in zip(grid, tile)]
    blend = (tiling.blend or 0) / factor * step_out
    ramps = [{s: _ramp(s, ss, t, blend, step_out) for s in ss} for ss, t in zip(starts, tile)]
    weight = lambda y, x0: np.outer(ramps[0][y], ramps[1][x0])[..., None]
    window = lambda y, x0, step: (slice(y * step, (y + tile[0]) * step), slice(x0 * step, (x0 + tile[1]) * step))
    places = [(y, x0) for y in starts[0] for x0 in starts[1]]
    total = np.zeros((grid[0] * step_out, grid[1] * step_out, 1), np.float32)
    for at in places:
        total[window(*at, step_out)] += weight(*at)
    tiles = [(i, at) for i in range(x.shape[0]) for at in places]
    per_call = min(tiling.batch, len(tiles))
    calls = [tiles[i:i + per_call] for i in range(0, len(tiles), per_call)]
    xp = np if isinstance(x, np.ndarray) else jnp  # host inputs stay on the host: only tiles go to the device

    def call(chunk):
        padded = chunk + [chunk[-1]] * (per_call - len(chunk))  # one tile-batch shape for every call
        return fn(xp.stack([x[(i, *window(*at, step_in))] for i, at in padded]))

    out, pending = None, call(calls[0])
    for k, chunk in enumerate(calls):
        result = pending
        if k + 1 < len(calls):  # dispatched before this result is read: the device works while the host adds up
            pending = call(calls[k + 1])
        dtype, result = result.dtype, np.asarray(result, np.float32)
        if out is None:
            out = np.zeros((x.shape[0], *total.shape[:2], result.shape[-1]), np.float32)
        for (i, at), r in zip(chunk, result):
            out[(i, *window(*at, step_out))] += r * weight(*at)
    out /= total  # in place: the host holds one float32 copy of the output, plus `total`
    return jnp.asarray(out, dtype)


def _starts(length, tile, overlap):
    """Evenly spread tile starts covering [0, length) with at least `overlap` shared between neighbours."""
    if tile >= length:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return sorted({round(i * (length - tile) / (count - 1)) for i in range(count)})


def _ramp(start, starts, tile, blend, step):
    """Per-output-element weights of the tile at `start` along one axis (in output elements: cells * step)."""
    size = tile * step
    pos = np.arange(size) + 0.5  # centres of the output elements, relative to the tile start
    w = np.ones(size, np.float32)
    i = starts.index(start)
    if i > 0:  # shares [0, shared) with the previous tile: fade in over the middle `blend` of it
        shared = (starts[i - 1] + tile - start) * step
        w = np.minimum(w, np.clip((pos - (shared - blend) / 2) / blend, 0, 1))
    if i < len(starts) - 1:  # shares [size - shared, size) with the next tile: fade out
        shared = (start + tile - starts[i + 1]) * step
        w = np.minimum(w, np.clip((size - pos - (shared - blend) / 2) / blend, 0, 1))
    return w
