import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from flax_vae.images import BUNDLED_PHOTOS, read_image  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def photos():
    """The bundled public-domain/CC0 photographs, (H, W, 3) float32 in [-1, 1], uncropped."""
    return {p.stem: read_image(p) for p in BUNDLED_PHOTOS}


def crop(image, multiple):
    """Top-left crop to the largest multiple (the reference figures' procedure)."""
    h, w = image.shape[0] // multiple * multiple, image.shape[1] // multiple * multiple
    return image[:h, :w]


def max_abs_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
