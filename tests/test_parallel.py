"""Data parallelism (flax_vae/parallel.py) on 8 CPU devices and across two processes, and the pure functions
under jit / vmap / grad. Sharded and single-device results agree to float32 rounding (XLA's convolution
algorithms depend on the per-device batch, so not bit for bit): 1e-5 absolute on latents and images in [-1, 1]."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import flax_vae
from flax_vae import kl
from flax_vae.family import init_params
from flax_vae.autoencoder import Autoencoder

from conftest import max_abs_rel, run_processes

ATOL = 1e-5


@pytest.fixture(scope="module")
def taesd():
    return flax_vae.load("taesd")


@pytest.fixture(scope="module")
def tiny_kl():
    config = kl.KLConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
    return Autoencoder(config, kl.AutoencoderKL(config), init_params(config, jax.random.key(1)), "tiny")


@pytest.fixture(scope="module")
def crops(photos):
    """Thirteen 64x64 crops of real photographs: a batch that does not divide 8 devices."""
    a = photos["astronaut"]
    return np.stack([a[y:y + 64, x:x + 64] for y in range(0, 448, 160) for x in range(0, 448, 110)][:13])


def test_eight_devices_are_there():
    assert jax.device_count() == 8


@pytest.mark.parametrize("use_pmap", [False, True], ids=["mesh", "pmap"])
@pytest.mark.parametrize("n", [1, 5, 13])
def test_sharded_equals_single_device(taesd, crops, use_pmap, n):
    sharded = flax_vae.data_parallel(taesd, use_pmap=use_pmap)
    z = sharded.encode(crops[:n])
    assert z.shape == (n, 8, 8, 4)
    np.testing.assert_allclose(z, taesd.encode(crops[:n]), atol=ATOL)
    np.testing.assert_allclose(sharded.decode(z), taesd.decode(z), atol=ATOL)


def test_output_stays_sharded_over_the_mesh(taesd, crops):
    z = flax_vae.data_parallel(taesd).encode(crops[:8])
    assert {s.device for s in z.addressable_shards} == set(jax.devices())


def test_posterior_and_samples_sharded(tiny_kl, crops):
    sharded = flax_vae.data_parallel(tiny_kl)
    for got, want in zip(sharded.posterior(crops), tiny_kl.posterior(crops)):
        np.testing.assert_allclose(got, want, atol=ATOL)
    key = jax.random.key(3)  # partitionable threefry: a row's noise does not depend on the device or the padding
    np.testing.assert_allclose(sharded.encode(crops, key=key), tiny_kl.encode(crops, key=key), atol=ATOL)
    pmapped = flax_vae.data_parallel(tiny_kl, use_pmap=True)
    sample = pmapped.encode(crops, key=key)  # pmap: one noise stream per device, so a different sample
    assert np.abs(np.asarray(sample) - np.asarray(tiny_kl.encode(crops))).max() > 1e-3


def test_submesh_and_tiles(taesd, crops):
    sharded = flax_vae.data_parallel(taesd, Mesh(np.array(jax.devices()[:4]), ("batch",)))
    tiling = flax_vae.Tiling(size=48, overlap=16, blend=8)
    z = sharded.encode(crops[:3], tile=tiling)
    np.testing.assert_allclose(z, taesd.encode(crops[:3], tile=tiling), atol=ATOL)
    np.testing.assert_allclose(sharded.decode(z, tile=tiling), taesd.decode(z, tile=tiling), atol=ATOL)


def test_bad_inputs_are_refused_as_in_the_single_device_api(taesd, crops):
    sharded = flax_vae.data_parallel(taesd)
    with pytest.raises(ValueError, match="channels"):
        sharded.encode(crops.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="NaN"):
        sharded.decode(np.full((2, 8, 8, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="deterministic"):
        sharded.encode(crops, key=jax.random.key(0))


def test_two_processes_each_encode_their_rows(taesd, crops, tmp_path):
    np.save(tmp_path / "images.npy", crops[:5])
    run_processes(["tests/multihost_worker.py", tmp_path / "images.npy", tmp_path], processes=2, devices=2)
    parts = [np.load(tmp_path / f"process{i}.npz") for i in range(2)]
    assert [len(p["rows"]) for p in parts] == [3, 2]  # uneven shares are padded, then trimmed
    latents = np.concatenate([p["latents"] for p in parts])
    np.testing.assert_allclose(latents, taesd.encode(crops[:5]), atol=ATOL)
    np.testing.assert_allclose(np.concatenate([p["latents_pmap"] for p in parts]), latents, atol=ATOL)
    np.testing.assert_allclose(np.concatenate([p["decoded"] for p in parts]), taesd.decode(latents), atol=ATOL)
    # each image's rows split over the four devices of both processes: equal to one device (tests/test_spatial.py)
    taef2 = flax_vae.load("taef2")
    for p in parts:
        assert max_abs_rel(p["split_latents"], taef2.encode(crops[:5])) <= 1e-5
        assert max_abs_rel(p["split_decoded"], taef2.decode(p["split_latents"])) <= 1e-5


def test_pure_functions_under_jit_vmap_and_grad(taesd, crops):
    module, params = taesd.module, taesd.params
    z = flax_vae.encode_fn(module, params, crops[:4])
    per_image = jax.jit(jax.vmap(lambda p, x: flax_vae.encode_fn(module, p, x[None])[0], in_axes=(None, 0)))
    np.testing.assert_allclose(per_image(params, crops[:4]), z, atol=ATOL)

    def loss(latents):  # an image-space loss through the decoder, as guidance and latent optimisation use it
        return jnp.mean((flax_vae.decode_fn(module, params, latents) - crops[:4]) ** 2)

    grad = jax.jit(jax.grad(loss))(z)
    direction = jax.random.normal(jax.random.key(0), z.shape)
    eps = 1e-2
    numeric = (loss(z + eps * direction) - loss(z - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(grad, direction), numeric, rtol=2e-2)
