"""Tiled encode/decode (flax_vae/tiling.py), on the bundled real TAESD weights and photographs."""
import numpy as np
import pytest

import flax_vae
from flax_vae import Tiling
from flax_vae.autoencoder import _encode
from flax_vae.tiling import _ramp, _starts

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
