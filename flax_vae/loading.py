"""flax_vae.load / flax_vae.save: any supported checkpoint -> Autoencoder, and our own format back."""
from pathlib import Path

import jax
import jax.numpy as jnp

import convert

from .autoencoder import Autoencoder
from .taesd import TAESD

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
MODULES = {"taesd": TAESD}


def load(source=None, *, encoder=None, decoder=None, dtype=jnp.float32) -> Autoencoder:
    """Load an autoencoder.

    source: a bundled name ("taef2", ...), a flax-vae or diffusers folder, a folder holding
    *_encoder / *_decoder files, or one checkpoint file. Or name the TAESD parts with encoder=/decoder=
    (either may be left out). Parameters and compute use `dtype`.
    """
    if isinstance(source, str) and source in BUNDLED:
        enc, dec = BUNDLED[source]
        config, params, _ = convert.load(encoder=enc and WEIGHTS_DIR / enc, decoder=dec and WEIGHTS_DIR / dec)
        name = source
    else:
        config, params, name = convert.load(source, encoder=encoder, decoder=decoder)
    module = MODULES[config.family](config, dtype=dtype)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    return Autoencoder(config=config, module=module, params=params, name=name)


def save(vae: Autoencoder, folder, to="flax"):
    """Write `vae` to `folder`: `flax` (default; safetensors + config.json, reloads bit-identically),
    `diffusers` (AutoencoderTiny folder) or `madebyollin` (*_encoder/*_decoder.safetensors)."""
    convert.export(vae.config, vae.params, Path(folder), to=to, name=vae.name)
