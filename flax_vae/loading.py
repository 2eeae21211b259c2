"""flax_vae.load / flax_vae.save: any supported checkpoint -> Autoencoder, and back to a folder."""
from pathlib import Path

import jax
import jax.numpy as jnp

from . import convert, family, hub
from .autoencoder import Autoencoder
from .errors import CheckpointError

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


def resolve(source=None, *, encoder=None, decoder=None, subfolder=None, filename=None, revision=None, variant=None,
            cache_dir=None, local_files_only=False, token=None) -> dict:
    """Arguments for `convert.load`: bundled names replaced by the bundled files, Hub ids by the local folder or
    file `hub.fetch` downloads (an existing local path wins over a Hub id spelled the same)."""
    located = dict(subfolder=subfolder, filename=filename, revision=revision, variant=variant)
    cache = dict(cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    if isinstance(source, str) and source in BUNDLED:
        if any(located.values()):
            raise CheckpointError(f"{source}: a bundled model: subfolder=, filename=, revision= and variant= are "
                                  "for Hub ids")
        enc, dec = BUNDLED[source]
        return dict(encoder=enc and WEIGHTS_DIR / enc, decoder=dec and WEIGHTS_DIR / dec)
    if source is not None and (any(located.values()) or hub.is_hub_id(source)):
        source = hub.fetch(source, **located, **cache)
    if source is None and (subfolder or filename or variant):
        raise ValueError("subfolder=, filename= and variant= go with a source, not with encoder= / decoder=")
    parts = {}
    for part, file in (("encoder", encoder), ("decoder", decoder)):
        if hub.is_hub_id(file):  # org/name/FILE: one file of a repository
            file = hub.fetch(file, revision=revision, **cache)
            if file.is_dir():
                raise CheckpointError(f"{part}={file}: a folder: name the {part} file of the repository "
                                      "(org/name/FILE)")
        elif file is not None and revision:
            raise CheckpointError(f"{file}: a local path: revision= is for Hub ids")
        parts[part] = file
    return dict(source=source, **parts)


def read(source=None, *, encoder=None, decoder=None, subfolder=None, filename=None, revision=None, variant=None,
         cache_dir=None, local_files_only=False, token=None):
    """A checkpoint as stored: (config, params as numpy in the stored dtype, variant name). The arguments are
    `load`'s."""
    config, params, name = convert.load(**resolve(
        source, encoder=encoder, decoder=decoder, subfolder=subfolder, filename=filename, revision=revision,
        variant=variant, cache_dir=cache_dir, local_files_only=local_files_only, token=token))
    return config, params, source if isinstance(source, str) and source in BUNDLED else name


def load(source=None, *, subfolder=None, filename=None, revision=None, variant=None, cache_dir=None,
         local_files_only=False, token=None, encoder=None, decoder=None, dtype=jnp.float32,
         param_dtype=None) -> Autoencoder:
    """Load an autoencoder from any supported checkpoint, local or on the Hugging Face Hub.

    Args:
        source: a bundled name (`"taesd"`, `"taesdxl"`, `"taesd3"`, `"taef1"`, `"taef2"`, `"taesana"`), a
            flax-vae or diffusers folder, a folder holding `*_encoder` / `*_decoder` files, or one checkpoint file
            (.safetensors; .pth/.pt/.bin/.ckpt through torch's restricted unpickler); or a Hub id: `"org/name"`
            (a diffusers, flax-vae, TAESD pair or single-file repository), `"org/name:subfolder"` (e.g.
            `"black-forest-labs/FLUX.1-schnell:vae"`), `"org/name/file.safetensors"`, each optionally with
            `@revision` after the name. An existing local path wins over a Hub id spelled the same. Hub files are
            downloaded once into huggingface_hub's cache (HF_HOME / HF_HUB_CACHE): config.json and one weights
            file, never the whole repository.
        subfolder: the model's folder inside the repository (or inside a local `source` folder), e.g. `"vae"`.
        filename: one checkpoint file of the repository (or of a local `source` folder) to load.
        revision: a Hub branch, tag or commit hash (default: the main branch).
        variant: the diffusers weights variant, e.g. `"fp16"` (diffusion_pytorch_model.fp16.safetensors; the
            parameters keep their stored dtype until `param_dtype` applies).
        cache_dir: huggingface_hub's cache folder (default: HF_HUB_CACHE).
        local_files_only: use the cache only, as HF_HUB_OFFLINE=1 does; what is not cached is an error.
        token: a Hugging Face token for private and gated repositories (default: HF_TOKEN or the token saved by
            `hf auth login`; False sends none).
        encoder, decoder: TAESD part files, instead of `source` (either may be left out); local paths or Hub files
            (`"org/name/taesd_encoder.safetensors"`, with `revision`).
        dtype: the compute dtype, e.g. `jnp.bfloat16`.
        param_dtype: the parameters' dtype (default: `dtype`); `dtype=jnp.bfloat16, param_dtype=jnp.float32`
            computes in bfloat16 from float32 weights.

    Returns:
        An `Autoencoder`: `encode` maps (N, H, W, 3) images in [-1, 1] (H, W multiples of `factor`) to raw latents
        (N, H / factor, W / factor, latent_channels), `decode` maps those back to images in about [-1, 1].

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, refused, or does not fit any supported model; a Hub
            id's repository or revision is not found, gated without access, not cached while offline
            (HF_HUB_OFFLINE=1, `local_files_only`), or holds no loadable weights. The message is one line naming
            the fix.
    """
    config, params, name = read(source, encoder=encoder, decoder=decoder, subfolder=subfolder, filename=filename,
                                revision=revision, variant=variant, cache_dir=cache_dir,
                                local_files_only=local_files_only, token=token)
    params = jax.tree.map(lambda a: jnp.asarray(a, param_dtype or dtype), params)
    return Autoencoder(config=config, module=family.module(config, dtype), params=params, name=name)


def save(vae: Autoencoder, folder, to: str = "flax", overwrite: bool = False):
    """Write `vae` to `folder`.

    Args:
        to: `"flax"` (flax-vae's format: safetensors + config.json, reloads bit-identically), `"diffusers"` (the
            family's diffusers folder), `"diffusers-flax"` (diffusers 0.39's Flax folder, msgpack: SD-style KL
            VAEs) or `"madebyollin"` (TAESD `*_encoder` / `*_decoder.safetensors`).
        overwrite: replace a non-empty `folder` (atomically: the new folder is written beside it, then renamed).

    Raises:
        CheckpointError: `folder` is not empty and `overwrite` is False, or the format cannot hold this model.
    """
    convert.export(vae.config, vae.params, Path(folder), to=to, name=vae.name, overwrite=overwrite)
