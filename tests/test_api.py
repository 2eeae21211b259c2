"""The public API: input checks, compilation caching, pure functions, latent conventions, the CLI."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_vae
from flax_vae import autoencoder, cli

X = np.random.default_rng(1).uniform(-1, 1, (1, 64, 96, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def vae():
    return flax_vae.load("taesd")


def test_shapes_and_ranges(vae):
    z = vae.encode(X)
    assert z.shape == (1, 8, 12, 4) and z.dtype == jnp.float32
    y = vae.decode(z)
    assert y.shape == X.shape and float(jnp.abs(y).max()) < 1.5


@pytest.mark.parametrize("bad,match", [
    (np.zeros((64, 64, 3), np.float32), r"expected a batch \(N, H, W, 3\)"),
    (np.zeros((1, 64, 64, 4), np.float32), "expected 3 channels last"),
    (np.zeros((1, 3, 64, 64), np.float32), r"NCHW\? transpose to NHWC"),
    (np.zeros((1, 60, 64, 3), np.float32), "multiples of 8, got 60x64"),
    (np.zeros((1, 64, 64, 3), np.uint8), r"expected floats in \[-1, 1\], got uint8; for 0-255 pixels use x / 127.5 - 1"),
    (np.full((1, 64, 64, 3), 255, np.float32), r"values span \[255, 255\].*x / 127.5 - 1.*x \* 2 - 1"),
    (np.full((1, 64, 64, 3), -2, np.float32), r"values span \[-2, -2\]"),
    (np.full((1, 64, 64, 3), np.nan, np.float32), "NaN or infinite"),
])
def test_bad_images_get_clear_errors(vae, bad, match):
    with pytest.raises(ValueError, match=match):
        vae.encode(bad)


def test_bad_latents_get_clear_errors(vae):
    with pytest.raises(ValueError, match="expected 4 channels last"):
        vae.decode(np.zeros((1, 8, 8, 16), np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        vae.decode(np.full((1, 8, 8, 4), np.inf, np.float32))


def test_missing_part_is_named():
    enc_only = flax_vae.load("taesana")
    with pytest.raises(ValueError, match="loaded without its decoder"):
        enc_only.decode(np.zeros((1, 2, 2, 32), np.float32))


def test_compiled_once_per_shape_and_dtype(vae):
    vae.encode(X)
    before = autoencoder._encode._cache_size()
    for _ in range(3):
        vae.encode(X)
    vae.encode(jnp.asarray(X))
    assert autoencoder._encode._cache_size() == before
    vae.encode(X[:, :32])  # a new shape compiles once more
    assert autoencoder._encode._cache_size() == before + 1


def test_pure_functions_compose_with_jit_vmap_and_grad(vae):
    z = vae.encode(X)
    roundtrip = jax.jit(lambda p, x: flax_vae.decode_fn(vae.module, p, flax_vae.encode_fn(vae.module, p, x)))
    np.testing.assert_allclose(roundtrip(vae.params, X), vae.decode(z), atol=1e-5)
    batched = jax.vmap(lambda zz: flax_vae.decode_fn(vae.module, vae.params, zz[None])[0])(z)
    np.testing.assert_allclose(batched, vae.decode(z), atol=1e-5)
    grad = jax.grad(lambda zz: jnp.mean(flax_vae.decode_fn(vae.module, vae.params, zz) ** 2))(z)
    assert grad.shape == z.shape and bool(jnp.isfinite(grad).all()) and float(jnp.abs(grad).max()) > 0


def test_latent_conventions(vae):
    z = vae.encode(X)
    assert np.array_equal(vae.scale_latents(z), z) and np.array_equal(vae.unscale_latents(z), z)  # TAESD: 1, 0
    packed = flax_vae.pack_uint8(z)
    assert packed.dtype == jnp.uint8
    unpacked = flax_vae.unpack_uint8(packed)
    inside = np.abs(np.asarray(z)) < 3  # the packing clips at +-3
    assert np.max(np.abs(np.asarray(unpacked - z))[inside]) <= 6 / 255 / 2 + 1e-6


def test_crop_to_multiple():
    assert flax_vae.crop_to_multiple(np.zeros((2, 300, 451, 3)), 8).shape == (2, 296, 448, 3)


def test_cli_reconstruct_info_convert(tmp_path, capsys):
    from PIL import Image
    Image.fromarray(((X[0] + 1) * 127.5).astype(np.uint8)).save(tmp_path / "in.png")
    cli.main(["reconstruct", str(tmp_path / "in.png"), "--model", "taesd", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "PSNR" in out and (tmp_path / "out" / "in.png.reconstruction.png").is_file()
    assert Image.open(tmp_path / "out" / "in.png.reconstruction.png").size == (2 * 96, 64 + 4)
    cli.main(["info", "taesana"])
    out = capsys.readouterr().out
    assert "factor      32" in out and "encoder" in out and "float16" in out
    cli.main(["convert", "taesd3", str(tmp_path / "d"), "--to", "diffusers"])
    assert (tmp_path / "d" / "config.json").is_file()
    with pytest.raises(SystemExit, match="cannot express"):
        cli.main(["convert", "taef2", str(tmp_path / "e"), "--to", "diffusers"])
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["info", str(tmp_path / "missing.safetensors")])


def test_range_check_passes_images_in_range_and_can_be_skipped(vae):
    edge = np.where(X > 0, 1.5, -1.5).astype(np.float32)  # the limit itself is accepted
    vae.encode(edge)
    vae.encode(jnp.asarray(edge))
    wild = X * 200  # the pure function has no checks: the fast path inside your own jit
    assert flax_vae.encode_fn(vae.module, vae.params, wild).shape == (1, 8, 12, 4)
    with pytest.raises(ValueError, match="values span"):
        vae.encode(jnp.asarray(wild))


def test_decode_uint8_clamps_and_casts_on_the_device(vae):
    z = vae.encode(X)
    images = vae.decode_uint8(z)
    assert isinstance(images, jax.Array) and images.dtype == jnp.uint8 and images.shape == X.shape
    np.testing.assert_array_equal(images, flax_vae.to_uint8(vae.decode(z)))
    np.testing.assert_array_equal(vae.decode_uint8(z, tile=flax_vae.Tiling(size=32, overlap=16)),
                                  flax_vae.to_uint8(vae.decode(z, tile=flax_vae.Tiling(size=32, overlap=16))))
    parallel = flax_vae.data_parallel(vae)
    np.testing.assert_array_equal(parallel.decode_uint8(np.repeat(np.asarray(z), 3, 0)), np.repeat(images, 3, 0))
    with pytest.raises(ValueError, match="NaN or infinite"):
        vae.decode_uint8(np.full(z.shape, np.nan, np.float32))


def test_nonfinite_decode_is_reported_even_as_uint8(vae):
    broken = flax_vae.Autoencoder(vae.config, vae.module, jax.tree.map(lambda a: a * np.nan, vae.params), "broken")
    z = np.zeros((1, 8, 8, 4), np.float32)
    for decode in (broken.decode, broken.decode_uint8, flax_vae.data_parallel(broken).decode_uint8):
        with pytest.raises(FloatingPointError, match="NaN or infinite"):
            decode(z)


def test_public_names():
    for name in ("CheckpointError", "read_image", "to_uint8", "to_pil", "decode_uint8_fn", "family", "load", "save"):
        assert hasattr(flax_vae, name) and name in flax_vae.__all__
    assert flax_vae.CheckpointError is flax_vae.convert.CheckpointError and issubclass(flax_vae.CheckpointError,
                                                                                       ValueError)


def test_every_family_keeps_the_contract():
    """Each model file provides what flax_vae.family.ModelFile declares, each module the Module methods, and each
    format module what flax_vae.convert.FormatModule declares; posterior where config.has_posterior."""
    from flax_vae import convert, family
    for name, model_file in family.FAMILIES.items():
        assert model_file.FAMILY == name and set(convert.FORMATS) == set(family.FAMILIES)
        for attr in ("PRESETS", "Config", "Module"):
            assert hasattr(model_file, attr), (name, attr)
        config = next(iter(model_file.PRESETS.values()))
        assert isinstance(config, model_file.Config) and config.family == name
        methods = [m for m in ("encode", "decode", "scale_latents", "unscale_latents", "posterior")
                   if m != "posterior" or config.has_posterior]
        assert all(callable(getattr(model_file.Module, m, None)) for m in methods), name
        for attr in ("DIFFUSERS_CLASSES", "PRESETS", "diffusers_config", "load_diffusers", "diffusers_export",
                     "load_file"):
            assert hasattr(convert.FORMATS[name], attr), (name, attr)


def test_posterior_only_where_the_family_has_one(vae):
    assert not vae.config.has_posterior and flax_vae.KL_PRESETS["sd15"].has_posterior
    with pytest.raises(ValueError, match="deterministic"):
        vae.posterior(X)
    with pytest.raises(ValueError, match="deterministic"):
        vae.encode(X, key=jax.random.key(0))
