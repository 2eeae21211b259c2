"""The colab notebooks run top to bottom (their code cells, in order, in one namespace)."""
from pathlib import Path

import pytest

from conftest import run_notebook

NOTEBOOKS = sorted((Path(__file__).parents[1] / "colab").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch, tmp_path):
    _, shown = run_notebook(path, monkeypatch, tmp_path)
    assert shown, "the notebook displayed nothing"


def test_preview_loop_compiles_once_and_matches_decoding_outside(monkeypatch, tmp_path):
    import jax
    import numpy as np

    nb, _ = run_notebook(Path(__file__).parents[1] / "colab" / "preview_loop.ipynb", monkeypatch, tmp_path)
    vae, sample, steps = nb["vae"], nb["sample"], nb["STEPS"]
    assert len(nb["traces"]) == 1 and nb["previews"].shape[0] == steps
    outside = vae.decode(vae.unscale_latents(nb["latents"].reshape(-1, *nb["latents"].shape[2:])))
    np.testing.assert_allclose(nb["previews"].reshape(outside.shape), outside, atol=1e-5)
    sample(vae.params, jax.random.normal(jax.random.key(1), nb["noise"].shape))  # new noise: no new trace
    assert len(nb["traces"]) == 1 and sample._cache_size() == 1
    assert (tmp_path / "previews.gif").stat().st_size > 0
