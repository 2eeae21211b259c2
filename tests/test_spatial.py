"""Splitting each image's rows over devices (`data_parallel(..., spatial_axis=)`), on 8 CPU devices: every family
equals its single-device result, the compiled programs hold 1/n of the activations per device and gather no
activation above the lowest resolution. (Two processes: tests/test_parallel.py.)

Tolerance 1e-5 of the output's largest magnitude: the split programs add the same terms in another order
(GroupNorm statistics and attention sums are all-reduced across devices), float32 rounding is ~1e-7 per step."""
import dataclasses

import jax
import numpy as np
import PIL.Image
import pytest
from jax.sharding import Mesh, PartitionSpec

import flax_vae
from flax_vae import family, testing
from flax_vae.autoencoder import Autoencoder

from conftest import max_abs_rel

RTOL = 1e-5
DCAE_IN_SMALL = dataclasses.replace(  # the in/mix layout (pixel (un)shuffle, BatchNorm stages) at narrow widths
    flax_vae.DCAE_PRESETS["dc-ae-f32c32-in-1.0"], encoder_widths=(16, 16, 32, 32, 64, 64),
    decoder_widths=(16, 16, 32, 32, 64, 64), encoder_depths=(0, 1, 1, 1, 1, 1), decoder_depths=(0, 1, 1, 1, 1, 1))


def model(name):
    if name == "dcae-in-small":
        return Autoencoder(DCAE_IN_SMALL, family.module(DCAE_IN_SMALL), testing.random_params(DCAE_IN_SMALL), name)
    return testing.model(name)


MESHES = {"8": ((8,), ("space",)), "2x4": ((2, 4), ("data", "space"))}


def mesh(kind):
    shape, axes = MESHES[kind]
    return Mesh(np.array(jax.devices()).reshape(shape), axes)


def images(vae, split):
    """A real photograph and its mirror image, tall enough for `split` devices (latent rows a multiple of
    2 * split), four latents wide."""
    height = 2 * split * vae.factor * (2 if vae.factor == 8 else 1)
    x = testing.photos()["astronaut"][0, :height, :4 * vae.factor]
    return np.stack([x, x[:, ::-1]])


def check_split_rows(vae, kind, everything=False):
    split = flax_vae.data_parallel(vae, mesh(kind), spatial_axis="space")
    x = images(vae, split.mesh.shape["space"])
    z = split.encode(x)
    assert z.sharding.is_equivalent_to(flax_vae.split_rows_sharding(split.mesh), 4)
    assert max_abs_rel(z, vae.encode(x)) <= RTOL
    y = split.decode(z)
    assert y.sharding.spec == PartitionSpec(None if kind == "8" else ("data",), "space", None, None)
    assert max_abs_rel(y, vae.decode(z)) <= RTOL
    if everything:  # the rest of the API
        np.testing.assert_array_equal(split.decode_uint8(z), flax_vae.to_uint8(y))
        for got, want in zip(split.posterior(x), vae.posterior(x)):
            assert max_abs_rel(got, want) <= RTOL
        key = jax.random.key(1)  # partitionable threefry: the noise does not depend on the layout
        assert max_abs_rel(split.encode(x, key=key), vae.encode(x, key=key)) <= RTOL


@pytest.mark.parametrize("name", ["taesd", "taef2", "kl-small", "dcae-small", "dcae-in-small"])
def test_rows_split_over_8_devices_equal_one_device(name):
    check_split_rows(model(name), "8")


@pytest.mark.parametrize("name", ["taef2", "kl-small", "dcae-small", "dcae-in-small"])
def test_rows_and_batch_split_over_a_2x4_mesh_equal_one_device(name):
    check_split_rows(model(name), "2x4", everything=name == "kl-small")


def test_sd15_at_512_equals_one_device():
    """The full SD 1.5 configuration, 512x512: Winograd convolutions, attention over 4096 latents."""
    vae = testing.model("kl-sd15")
    split = flax_vae.data_parallel(vae, spatial_axis="space")
    x = testing.photos()["astronaut"]
    z = split.encode(x)
    assert max_abs_rel(z, vae.encode(x)) <= RTOL
    assert max_abs_rel(split.decode(z), vae.decode(z)) <= RTOL


def test_pure_functions_in_your_own_jit_split_the_same_way():
    vae = testing.model("taef2")
    split = flax_vae.data_parallel(vae, spatial_axis="space")
    rows = flax_vae.split_rows_sharding(split.mesh)
    z = jax.random.normal(jax.random.key(0), (1, 32, 16, 32))

    @jax.jit
    def last_step(params, z):  # e.g. a sampling loop's last step: the pure function on a sharded value
        z = jax.lax.with_sharding_constraint(z * 0.5, rows)
        return flax_vae.decode_fn(split.module, params, z)

    y = last_step(split.params, jax.device_put(z, rows))
    assert y.sharding.is_equivalent_to(rows, 4)
    assert testing.all_gathers(last_step.lower(split.params, jax.device_put(z, rows)).compile()) == []
    assert max_abs_rel(y, vae.decode(z * 0.5)) <= RTOL


@pytest.mark.parametrize("name,side", [("kl-sd15", 1024), ("dcae-f32c32", 2048)])
def test_decode_memory_per_device_and_no_full_resolution_gathers(name, side):
    """Compiled, not run. The single-device program is the same computation (KL's decoder unbanded: with bands
    it holds less on one device, in more time; docs/parallelism.md)."""
    vae, n = testing.model(name), 8
    split = flax_vae.data_parallel(vae, spatial_axis="space")
    shape = (1, side // vae.factor, side // vae.factor, vae.config.latent_channels)
    whole = testing.compiled(split.module, vae.params, "decode", shape)
    parts = testing.compiled(split.module, vae.params, "decode", shape, split.mesh)
    ratio = parts.memory_analysis().temp_size_in_bytes / whole.memory_analysis().temp_size_in_bytes
    assert ratio <= 1.5 / n, f"{name} {side}px: {ratio * n:.2f}/n of one device's temporaries"
    # Only lowest-resolution tensors may be gathered: KL's attention keys and values, and on CPU the Winograd
    # convolutions' four transformed row taps there (flax_vae.layers.Conv3x3; GPUs and TPUs do not use it).
    lowest = (side // vae.factor + 8) * (side // vae.factor) * max(p.shape[-1] for p in jax.tree.leaves(vae.params))
    assert all(np.prod(s) <= 4 * lowest for s in testing.all_gathers(parts)), testing.all_gathers(parts)


def test_refusals():
    vae = testing.model("taesd")
    split = flax_vae.data_parallel(vae, mesh("2x4"), spatial_axis="space")
    x = images(vae, 4)
    with pytest.raises(ValueError, match=r"image heights that are multiples of 64 \(latent heights multiples of "
                                         r"8\), got 72"):
        split.encode(x[:, :72])
    with pytest.raises(ValueError, match="a batch of 1 does not split over the 2 devices"):
        split.encode(x[:1])
    with pytest.raises(ValueError, match="tile= and splitting rows"):
        split.decode(split.encode(x), tile=64)
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        flax_vae.data_parallel(vae, mesh("2x4"), spatial_axis="rows")


def test_cli_splits_a_large_image_over_the_devices(tmp_path, capsys):
    """reconstruct: above --max-pixels, rows split over every device; the same image as one device makes."""
    from flax_vae import cli
    photo = str(tmp_path / "photo.png")  # 128 rows: no padding needed over 8 devices
    PIL.Image.open(flax_vae.images.BUNDLED_PHOTOS[0]).crop((0, 0, 192, 128)).save(photo)
    cli.main(["reconstruct", photo, "--model", "taesd", "--max-pixels", "1000", "--out", str(tmp_path / "split")])
    assert "its rows are split over 8 devices" in capsys.readouterr().out
    cli.main(["reconstruct", photo, "--model", "taesd", "--devices", "1", "--out", str(tmp_path / "one")])
    name = "photo.png.reconstruction.png"
    split, one = (np.asarray(PIL.Image.open(tmp_path / d / name), np.int16) for d in ("split", "one"))
    assert np.abs(split - one).max() <= 1  # float32 rounding may move a value across a uint8 step
