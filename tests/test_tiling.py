"""Tiled encode/decode (flax_vae/tiling.py): exact for a local model (bundled real TAESD weights and photographs),
measured agreement for models with global operations, bounded memory, batches."""
from concurrent.futures import ThreadPoolExecutor

import jax.numpy as jnp
import numpy as np
import pytest

import flax_vae
from flax_vae import Tiling
from flax_vae.autoencoder import _encode
from flax_vae.testing import measure, model, photos, plan_bytes, tiling_agreement
from flax_vae.tiling import _ramp, _starts, tiled_decode


# TAESD's classic layout is purely local with a receptive field radius of about 150 pixels (measured:
# tiled == untiled from a margin of 152 px on): margin = (overlap - blend) / 2.
EXACT = Tiling(size=512, overlap=352, blend=16)
SHORT = Tiling(size=256, overlap=128, blend=16)  # margin 56 px


@pytest.fixture(scope="module")
def taesd():
    return flax_vae.load("taesd")


@pytest.fixture(scope="module")
def mosaic(photos):
    """A 640x768 image made of the astronaut photograph and its mirror images: 2x3 tiles of 512."""
    a = photos["astronaut"]
    return np.concatenate([np.concatenate([a, a[:, ::-1]], 1)] * 2, 0)[None, :640, :768]


@pytest.fixture(scope="module")
def untiled(taesd, mosaic):
    z = taesd.encode(mosaic)
    return z, taesd.decode(z)


def test_local_model_tiled_equals_untiled(taesd, mosaic, untiled):
    z, y = untiled
    np.testing.assert_allclose(taesd.encode(mosaic, tile=EXACT), z, atol=1e-5)
    np.testing.assert_allclose(taesd.decode(z, tile=EXACT), y, atol=1e-5)


def test_margin_below_the_receptive_field_shows(taesd, mosaic, untiled):
    assert np.abs(taesd.encode(mosaic, tile=SHORT) - untiled[0]).max() > 1e-2


def test_one_compilation_serves_every_image_size(taesd, mosaic):
    tiling = Tiling(size=512, overlap=352, blend=16, batch=2)
    taesd.encode(mosaic[:, :, :640], tile=tiling)  # 2x2 tiles
    compiled = _encode._cache_size()
    taesd.encode(mosaic, tile=tiling)  # 2x3 tiles: a last batch of one, padded
    assert _encode._cache_size() == compiled


def test_tile_larger_than_image_is_one_plain_call(taesd, mosaic, untiled):
    z, y = untiled
    np.testing.assert_array_equal(taesd.decode(z, tile=1024), y)


def test_weights_cross_fade_to_one():
    starts = _starts(100, 40, 12)
    assert starts[0] == 0 and starts[-1] == 60 and all(b - a <= 28 for a, b in zip(starts, starts[1:]))
    total = np.zeros(100 * 8)
    for s in starts:
        total[s * 8:(s + 40) * 8] += _ramp(s, starts, 40, 64, 8)
    np.testing.assert_allclose(total, 1, atol=1e-6)


@pytest.mark.parametrize("bad", [Tiling(size=500), Tiling(overlap=512), Tiling(blend=0), Tiling(blend=256),
                                 Tiling(batch=0)])
def test_bad_tilings_are_refused(taesd, untiled, bad):
    with pytest.raises(ValueError, match="tiling"):
        taesd.decode(untiled[0], tile=bad)


# ---- batches: `Tiling.batch` counts (image, tile) pairs, so a large batch of images runs in bounded memory

def upsample8(tiles):
    """A purely pointwise stand-in for a decoder (tiled == untiled for any tiling): nearest 8x upsampling."""
    return jnp.repeat(jnp.repeat(tiles[..., :3], 8, axis=1), 8, axis=2)


@pytest.mark.parametrize("tiling, shape, calls", [
    (Tiling(256, 64, batch=4), (4, 32, 32, 4), 5),  # 3 images x 2x3 tiles = 18 tiles, 4 per call
    (Tiling(size=None, batch=2), (2, 40, 64, 4), 2),  # whole images: only the batch is sliced
])
def test_tiles_per_call_stay_fixed_whatever_the_batch(tiling, shape, calls):
    z = np.random.default_rng(0).standard_normal((3, 40, 64, 4)).astype(np.float32)
    shapes = []
    out = tiled_decode(lambda t: shapes.append(t.shape) or upsample8(t), z, tiling, factor=8)
    assert shapes == [shape] * calls  # the last call padded to the same shape: one compilation
    np.testing.assert_allclose(out, upsample8(z), rtol=1e-6)


# ---- models with global operations: tiled differs from untiled everywhere; measured agreement
# Measured with `python bench/py psnr` (README, "Tiling"): PSNR (dB) of tiled against untiled encode
# and decode, chelsea 448x288, Tiling(size=256, overlap=128). Random weights for KL and DC-AE.
AGREEMENT = {"taef2": (40.1, 32.5), "kl-small": (31.0, 38.1), "dcae-small": (50.1, 56.5)}
AGREEMENT_TILING = Tiling(size=256, overlap=128)


@pytest.mark.parametrize("name", AGREEMENT)
def test_global_operations_agree_as_measured(name):
    vae = model(name)
    [(enc, dec)] = tiling_agreement(vae, photos()["chelsea"], [AGREEMENT_TILING])
    print(f"{name}: encode {enc:.2f} dB, decode {dec:.2f} dB")
    assert abs(enc - AGREEMENT[name][0]) <= 1 and abs(dec - AGREEMENT[name][1]) <= 1, (enc, dec)


# ---- memory: one tile-batch call whatever the image size; the rest grows with the output's area only
MEMORY_TILING = Tiling(size=256, overlap=64, batch=2)


def test_tile_call_memory_does_not_depend_on_the_image_size():
    vae = model("kl-small")
    shapes = set()
    for size in (512, 1024, 2048):
        tiled_decode(lambda t: shapes.add(t.shape) or upsample8(t), np.zeros((1, size // 8, size // 8, 4), np.float32),
                     MEMORY_TILING, factor=8)
    assert shapes == {(2, 32, 32, 4)}
    tile_plan = plan_bytes(vae, (2, 32, 32, 4))
    untiled_plan = plan_bytes(vae, (1, 256, 256, 4))  # a 2048x2048 decode in one call
    print(f"tile call {tile_plan / 2**20:.0f} MiB, untiled 2048x2048 {untiled_plan / 2**20:.0f} MiB")
    assert untiled_plan > 20 * tile_plan


def test_peak_memory_grows_with_the_output_area_only():
    """Peak RSS growth of tiled decodes (fresh processes): beyond a constant, at most eight float32 copies of the
    RGB output per pixel (96 B; the host holds about four, and RSS is noisy on a busy machine: 54 B was seen);
    decoding untiled, these models' buffer plans take ~200 B per pixel."""
    sizes = {"kl-small": (512, 2048), "dcae-small": (512, 2048)}
    with ThreadPoolExecutor() as pool:  # one process per family, side by side
        runs = {name: pool.submit(measure, name, s, MEMORY_TILING, timeout=600)
                for name, s in sizes.items()}
    growth = {name: run.result() for name, run in runs.items()}
    for name, (small, large) in sizes.items():
        per_pixel = (growth[name][large]["growth"] - growth[name][small]["growth"]) / (large**2 - small**2)
        print(f"{name}: {growth[name]}, {per_pixel:.1f} B per extra pixel")
        assert per_pixel <= 96, (name, growth[name])
