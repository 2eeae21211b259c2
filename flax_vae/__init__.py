"""flax-vae: the autoencoders of latent diffusion as Flax Linen modules (NHWC)."""
from .autoencoder import Autoencoder, crop_to_multiple, decode_fn, encode_fn, pack_uint8, unpack_uint8
from .loading import BUNDLED, load, save
from .taesd import PRESETS as TAESD_PRESETS
from .taesd import TAESD, TAESDConfig

__version__ = "0.1.0"
__all__ = ["load", "save", "encode_fn", "decode_fn", "Autoencoder", "pack_uint8", "unpack_uint8",
           "crop_to_multiple", "TAESD", "TAESDConfig", "TAESD_PRESETS", "BUNDLED"]
