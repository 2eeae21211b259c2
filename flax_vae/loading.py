"""flax_vae.load / flax_vae.save: any supported checkpoint -> Autoencoder, and our own format back."""
from pathlib import Path

import jax
import jax.numpy as jnp

from flax_vae import convert

from .autoencoder import Autoencoder
from .dcae import DCAE
from .kl import AutoencoderKL
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
MODULES = {"taesd": TAESD, "kl": AutoencoderKL, "dcae": DCAE}


def resolve(source=None, *, encoder=None, decoder=None) -> dict:
    """Arguments for `convert.load`, with bundled names replaced by the bundled files."""
    if isinstance(source, str) and source in BUNDLED:
        enc, dec = BUNDLED[source]
        return dict(encoder=enc and WEIGHTS_DIR / enc, decoder=dec and WEIGHTS_DIR / dec)
    return dict(source=source, encoder=encoder, decoder=decoder)


def load(source=None, *, encoder=None, decoder=None, dtype=jnp.float32,
         param_dtype=None) -> Autoencoder:
    """Load an autoencoder.

    source: a bundled name ("taef2", ...), a flax-vae or diffusers folder, a folder holding
    *_encoder / *_decoder files, or one checkpoint file. Or name the TAESD parts with encoder=/decoder=
    (either may be left out). Compute uses `dtype`, parameters `param_dtype` (default: `dtype`;
    e.g. dtype=jnp.bfloat16, param_dtype=jnp.float32 for bfloat16 compute with float32 weights).
    """
    config, params, name = convert.load(**resolve(source, encoder=encoder, decoder=decoder))
    if source in BUNDLED:
        name = source
    module = MODULES[config.family](config, dtype=dtype)
    params = jax.tree.map(lambda a: jnp.asarray(a, param_dtype or dtype), params)
    return Autoencoder(config=config, module=module, params=params, name=name)


def save(vae: Autoencoder, folder, to="flax"):
    """Write `vae` to `folder`: `flax` (default; safetensors + config.json, reloads bit-identically),
    `diffusers` (AutoencoderTiny folder) or `madebyollin` (*_encoder/*_decoder.safetensors)."""
    convert.export(vae.config, vae.params, Path(folder), to=to, name=vae.name)
