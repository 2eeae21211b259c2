"""bfloat16 and float16 compute for every family: the paths run and stay as close to float32 as measured.

Figures: `python bench/bench_precision.py` (README, "Precision"): PSNR (dB) of the reduced-precision encode and
decode against float32, measured on the three bundled photos; checked here on chelsea (448x288, a shape that
tests/test_tiling.py compiles in float32 too). taef2 has the bundled real weights (and GroupNorm); kl-small and
dcae-small are random weights. A NaN or an overflow is reported with the layer where it first appears.
"""
import jax
import numpy as np
import pytest

from flax_vae.autoencoder import Autoencoder
from flax_vae.testing import model, photos, precision_agreement

MEASURED = {  # model: {dtype: (encode PSNR, decode PSNR)} on chelsea
    "taef2": {"bfloat16": (52.5, 53.3), "float16": (66.8, 71.7)},
    "kl-small": {"bfloat16": (57.4, 60.1), "float16": (75.8, 78.0)},
    "dcae-small": {"bfloat16": (59.4, 59.0), "float16": (75.5, 76.3)},
}


@pytest.mark.parametrize("name", MEASURED)
def test_reduced_precision_stays_close_to_float32(name):
    psnrs = precision_agreement(name, {"chelsea": photos()["chelsea"]})
    print(name, psnrs)
    for dtype, (enc, dec) in MEASURED[name].items():
        assert psnrs[dtype] is not None, f"{name} overflows in {dtype}"
        got = psnrs[dtype]["chelsea"]
        assert got[0] >= enc - 3 and got[1] >= dec - 3, (dtype, got)


def scaled(vae, layer, factor):
    """`vae` with the kernel of `layer` (a path such as "decoder/up_1_resnet_0/conv1") multiplied by `factor`."""
    scale = lambda path, x: x * factor if "/".join(k.key for k in path) == f"{layer}/kernel" else x
    return Autoencoder(vae.config, vae.module, jax.tree_util.tree_map_with_path(scale, vae.params), "scaled")


def test_nan_is_reported_where_it_appears():
    """(Float16 overflow, with its remedy: tests/test_kl.py.)"""
    vae = scaled(scaled(model("kl-small"), "encoder/down_1_resnet_0/conv2", np.nan), "decoder/mid/resnet_1/conv1",
                 np.nan)
    with pytest.raises(FloatingPointError, match=r"encode: .*\(float32 compute\), first in the output of "
                                                 r"encoder/down_1_resnet_0/conv2; the inputs or weights are out"):
        vae.encode(photos()["chelsea"][:, :64, :64])
    with pytest.raises(FloatingPointError, match="decode: .*first in the output of decoder/mid/resnet_1/conv1;"):
        vae.decode_uint8(np.zeros((1, 8, 8, 4), np.float32))
