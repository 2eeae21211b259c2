"""bfloat16 and float16 compute for every family: the paths run and stay as close to float32 as measured.

Figures: `python bench/bench_precision.py` (README, "Precision"): PSNR (dB) of the reduced-precision encode and
decode against float32, measured on the three bundled photos; checked here on chelsea (448x288, a shape that
tests/test_tiling.py compiles in float32 too). taef2 has the bundled real weights (and GroupNorm); kl-small and
dcae-small are random weights.
"""
import pytest

from flax_vae.testing import photos, precision_agreement

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
