"""flax_vae.load / flax_vae.save: any supported checkpoint -> Autoencoder, and back to a folder."""
from pathlib import Path

import jax
import jax.numpy as jnp

from . import convert, family
from .autoencoder import Autoencoder

WEIGHTS_DIR = Path(__file__).parent / "weights"
# Bundled real weights (MIT, madebyollin/taesd; see weights/SOURCES.md): name -> (encoder, decoder).
BUNDLED = {
    "taesd": ("taesd_encoder.safetensors", "taesd_decoder.safetensors"),
    "taesdxl": ("taesdxl_encoder.safetensors", "taesdxl_decoder.safetensors"),
    "taesd3": ("taesd3_encoder.safetensors", "taesd3_decoder.safetensors"),
    "taef1": ("taef1_encoder.safetensors", "taef1_decoder.safetensors"),
    "taef2": ("taef2_encoder.safetensors", "taef2_decoder.safetensors"),
    "taesana": ("taesana_encoder.safetensors", None),  # its decoder's weights are not public here
}


def resolve(source=None, *, encoder=None, decoder=None) -> dict:
    """Arguments for `convert.load`, with bundled names replaced by the bundled files."""
    if isinstance(source, str) and source in BUNDLED:
        enc, dec = BUNDLED[source]
        return dict(encoder=enc and WEIGHTS_DIR / enc, decoder=dec and WEIGHTS_DIR / dec)
    return dict(source=source, encoder=encoder, decoder=decoder)


def read(source=None, *, encoder=None, decoder=None):
    """A checkpoint as stored: (config, params as numpy in the stored dtype, variant name)."""
    config, params, name = convert.load(**resolve(source, encoder=encoder, decoder=decoder))
    return config, params, source if isinstance(source, str) and source in BUNDLED else name


def load(source=None, *, encoder=None, decoder=None, dtype=jnp.float32, param_dtype=None) -> Autoencoder:
    """Load an autoencoder from any supported checkpoint.

    Args:
        source: a bundled name (`"taesd"`, `"taesdxl"`, `"taesd3"`, `"taef1"`, `"taef2"`, `"taesana"`), a
            flax-vae or diffusers folder, a folder holding `*_encoder` / `*_decoder` files, or one checkpoint file
            (.safetensors; .pth/.pt/.bin/.ckpt through torch's restricted unpickler).
        encoder, decoder: TAESD part files, instead of `source` (either may be left out).
        dtype: the compute dtype, e.g. `jnp.bfloat16`.
        param_dtype: the parameters' dtype (default: `dtype`); `dtype=jnp.bfloat16, param_dtype=jnp.float32`
            computes in bfloat16 from float32 weights.

    Returns:
        An `Autoencoder`.

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, refused, or does not fit any supported model.
    """
    config, params, name = read(source, encoder=encoder, decoder=decoder)
    params = jax.tree.map(lambda a: jnp.asarray(a, param_dtype or dtype), params)
    return Autoencoder(config=config, module=family.module(config, dtype), params=params, name=name)


def save(vae: Autoencoder, folder, to: str = "flax", overwrite: bool = False):
    """Write `vae` to `folder`.

    Args:
        to: `"flax"` (flax-vae's format: safetensors + config.json, reloads bit-identically), `"diffusers"` (the
            family's diffusers folder) or `"madebyollin"` (TAESD `*_encoder` / `*_decoder.safetensors`).
        overwrite: replace a non-empty `folder` (atomically: the new folder is written beside it, then renamed).

    Raises:
        CheckpointError: `folder` is not empty and `overwrite` is False, or the format cannot hold this model.
    """
    convert.export(vae.config, vae.params, Path(folder), to=to, name=vae.name, overwrite=overwrite)
