"""flax-vae: the autoencoders of latent diffusion as Flax Linen modules (NHWC)."""
from .autoencoder import (Autoencoder, crop_to_multiple, decode_fn, encode_fn, pack_uint8, posterior_fn,
                          scale_latents_fn, unpack_uint8, unscale_latents_fn)
from .dcae import PRESETS as DCAE_PRESETS
from .dcae import DCAE, DCAEConfig
from .kl import PRESETS as KL_PRESETS
from .kl import AutoencoderKL, KLConfig
from .loading import BUNDLED, load, save
from .parallel import DataParallel, data_parallel
from .tiling import Tiling
from .taesd import PRESETS as TAESD_PRESETS
from .taesd import TAESD, TAESDConfig

__version__ = "0.2.0"
__all__ = ["load", "save", "encode_fn", "decode_fn", "Autoencoder", "pack_uint8", "unpack_uint8",
           "crop_to_multiple", "TAESD", "TAESDConfig", "TAESD_PRESETS", "BUNDLED",
           "posterior_fn", "scale_latents_fn", "unscale_latents_fn", "AutoencoderKL", "KLConfig", "KL_PRESETS",
           "DCAE", "DCAEConfig", "DCAE_PRESETS", "Tiling", "data_parallel", "DataParallel"]
