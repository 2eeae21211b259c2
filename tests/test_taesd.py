"""TAESD: parity with PyTorch (diffusers AutoencoderTiny) and with the original implementation's figures."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import DATA, crop, max_abs_rel

import flax_vae
from flax_vae.convert.checkpoint import read_tensors
from flax_vae.loading import BUNDLED, WEIGHTS_DIR

# ../shared/reference/REFERENCE.md: madebyollin's taesd.py in float32 on scikit-image's photographs, top-left crop
# to a multiple of 16 (32 for taesana). (latent mean, latent std (torch, unbiased), round-trip PSNR in [0, 1]).
REFERENCE = {
    ("taesd", "astronaut"): (-0.00283, 0.90349, 25.350), ("taesd", "coffee"): (-0.01118, 0.83687, 25.015),
    ("taesd", "chelsea"): (0.05449, 0.64492, 27.021),
    ("taesdxl", "astronaut"): (-0.13514, 0.94366, 25.722), ("taesdxl", "coffee"): (-0.36257, 0.90834, 25.081),
    ("taesdxl", "chelsea"): (-0.18043, 0.61116, 28.028),
    ("taesd3", "astronaut"): (-0.10070, 1.10457, 30.391), ("taesd3", "coffee"): (-0.14454, 1.11862, 27.969),
    ("taesd3", "chelsea"): (-0.11564, 0.92245, 31.523),
    ("taef1", "astronaut"): (-0.07931, 0.98600, 28.692), ("taef1", "coffee"): (-0.13228, 0.96829, 26.832),
    ("taef1", "chelsea"): (-0.11663, 0.70271, 31.355),
    ("taef2", "astronaut"): (-0.04554, 0.84811, 31.189), ("taef2", "coffee"): (-0.06081, 0.82243, 29.624),
    ("taef2", "chelsea"): (-0.04904, 0.82437, 32.700),
}
# taesana (encoder only): latent shape (NHWC), mean, std, abs max
TAESANA_REFERENCE = {
    "astronaut": ((1, 16, 16, 32), 0.04354, 1.03560, 7.3700),
    "coffee": ((1, 12, 18, 32), 0.01896, 0.95092, 4.9857),
    "chelsea": ((1, 9, 14, 32), -0.01964, 0.78650, 3.1524),
}


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = flax_vae.load(name)
        return cache[name]
    return get


@pytest.mark.parametrize("name,image", sorted(REFERENCE))
def test_reproduces_reference_figures(models, photos, name, image):
    mean, std, psnr = REFERENCE[name, image]
    vae = models(name)
    x = crop(photos[image], 16)[None]
    z = np.asarray(vae.encode(x))
    assert z.shape == (1, x.shape[1] // 8, x.shape[2] // 8, vae.config.latent_channels)
    assert abs(z.mean() - mean) < 1e-3 and abs(z.std(ddof=1) - std) < 1e-3
    y = vae.decode(z)
    assert abs(flax_vae.images.psnr(y, x) - psnr) < 0.01


@pytest.mark.parametrize("image", sorted(TAESANA_REFERENCE))
def test_taesana_encoder_reproduces_reference(models, photos, image):
    shape, mean, std, absmax = TAESANA_REFERENCE[image]
    z = np.asarray(models("taesana").encode(crop(photos[image], 32)[None]))
    assert z.shape == shape
    assert abs(z.mean() - mean) < 1e-3 and abs(z.std(ddof=1) - std) < 1e-3 and abs(np.abs(z).max() - absmax) < 1e-3


def test_taesana_decoder_layout_matches_reference_pair():
    """The 32x decoder layout (random weights) reproduces the original implementation's raw output."""
    vae = flax_vae.load(decoder=DATA / "taesana_layout_decoder_random_fp16.safetensors")
    assert vae.config.factor == 32 and vae.config.decoder_widths == (256, 128, 64, 64, 64, 64)
    io = np.load(DATA / "taesana_layout_decoder_random_io.npz")
    out = (np.asarray(vae.decode(io["latents_nhwc"])) + 1) / 2  # diffusers' [-1, 1] -> taesd.py's raw output
    assert out.shape == io["output_nhwc"].shape
    assert max_abs_rel(out, io["output_nhwc"]) < 1e-4


# ---- parity with diffusers' PyTorch AutoencoderTiny on the same real weights

def diffusers_tiny(name):
    """AutoencoderTiny with the bundled weights, renamed by hand (SOURCES.md) - independent of convert/."""
    from diffusers import AutoencoderTiny
    latent_channels = {"taesd": 4, "taesdxl": 4, "taesd3": 16, "taef1": 16}[name]
    model = AutoencoderTiny(latent_channels=latent_channels).eval()
    enc, dec = (read_tensors(WEIGHTS_DIR / f) for f in BUNDLED[name])
    state = {f"encoder.layers.{k}": v for k, v in enc.items()}
    for k, v in dec.items():
        i, rest = k.split(".", 1)
        state[f"decoder.layers.{int(i) - 1}.{rest}"] = v
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()}, strict=True)
    return model


@pytest.mark.parametrize("name", ["taesd", "taesdxl", "taesd3", "taef1"])
def test_parity_with_diffusers_autoencoder_tiny(models, photos, name):
    """float64: the same function to 1e-9. float32: max abs error / max abs value <= 1e-4 - each float32
    implementation is ~1e-4 (absolute, on latents of magnitude ~2.5) from the float64 result, in different
    directions, so the two float32 outputs can differ by a little more than 1e-4 absolute."""
    ref = diffusers_tiny(name)
    x = photos["chelsea"][None, 64:224, 112:336]  # (1, 160, 224, 3) in [-1, 1]: the cat's face
    for dtype, rel, tdtype in ((jnp.float32, 1e-4, torch.float32), (jnp.float64, 1e-9, torch.float64)):
        with jax.enable_x64(dtype == jnp.float64), torch.no_grad():
            vae, ref = flax_vae.load(name, dtype=dtype), ref.to(tdtype)
            z_ref = ref.encode(torch.from_numpy(x.transpose(0, 3, 1, 2)).to(tdtype)).latents
            y_ref = ref.decode(z_ref).sample.numpy().transpose(0, 2, 3, 1)
            z_ref = z_ref.numpy().transpose(0, 2, 3, 1)
            assert max_abs_rel(vae.encode(x.astype(dtype)), z_ref) <= rel
            assert max_abs_rel(vae.decode(z_ref), y_ref) <= rel
