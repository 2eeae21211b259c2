"""flax-vae: the autoencoders of latent diffusion (TAESD, AutoencoderKL, DC-AE) as Flax Linen modules, NHWC.

The public API: `load` / `save`, the `Autoencoder` it returns, the pure functions for your own `jit`, tiling,
data parallelism, image helpers, and `CheckpointError`.
"""
from . import family
from .autoencoder import (Autoencoder, crop_to_multiple, decode_fn, decode_uint8_fn, encode_fn, pack_uint8,
                          posterior_fn, scale_latents_fn, unpack_uint8, unscale_latents_fn)
from .dcae import PRESETS as DCAE_PRESETS
from .dcae import DCAE, DCAEConfig
from .diffusers_compat import FlaxAutoencoderKL
from .errors import CheckpointError
from .images import read_image, to_pil, to_uint8
from .kl import PRESETS as KL_PRESETS
from .kl import AutoencoderKL, KLConfig
from .loading import BUNDLED, load, save
from .parallel import DataParallel, data_parallel, split_rows_sharding
from .taesd import PRESETS as TAESD_PRESETS
from .taesd import TAESD, TAESDConfig
from .tiling import Tiling

__version__ = "0.2.0"
__all__ = ["load", "save", "Autoencoder", "CheckpointError", "BUNDLED",
           "encode_fn", "decode_fn", "decode_uint8_fn", "posterior_fn", "scale_latents_fn", "unscale_latents_fn",
           "Tiling", "data_parallel", "DataParallel", "split_rows_sharding", "read_image", "to_uint8", "to_pil",
           "pack_uint8", "unpack_uint8", "crop_to_multiple", "family",
           "TAESD", "TAESDConfig", "TAESD_PRESETS", "AutoencoderKL", "KLConfig", "KL_PRESETS",
           "DCAE", "DCAEConfig", "DCAE_PRESETS", "FlaxAutoencoderKL"]
