"""The colab notebooks run top to bottom (their code cells, in order, in one namespace) within a time budget each,
and what they show is right; in the repository their outputs are cleared and their first code cell installs
flax-vae (with the extra it needs) unless it is importable."""
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_notebook
from flax_vae.images import psnr

COLAB = Path(__file__).parents[1] / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
EXPECTED = {"quickstart.ipynb", "preview_loop.ipynb", "encode_dataset.ipynb", "distill.ipynb", "convert.ipynb"}
EXTRAS = {"encode_dataset.ipynb": "[dataset]", "distill.ipynb": "[train]"}  # the pip extra each one installs
BUDGET_S = 180  # wall clock per notebook on a 2-core CPU machine; together they take about 2-4 minutes there
_runs = {}  # notebook name -> (namespace, displayed objects, working folder, seconds), or the error it raised


def run(path, tmp_path_factory):
    """Run a notebook once per session, timed, in a folder of its own (also its tempfile folder); the tests share
    the run."""
    if path.name not in _runs:
        workdir = tmp_path_factory.mktemp(path.stem)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tempfile, "tempdir", str(workdir))
            start = time.perf_counter()
            try:
                namespace, shown = run_notebook(path, patch, workdir)
            except Exception as e:
                _runs[path.name] = e
                raise
            _runs[path.name] = namespace, shown, workdir, time.perf_counter() - start
    if isinstance(_runs[path.name], Exception):
        pytest.fail(f"{path.name} failed: {_runs[path.name]!r}")
    return _runs[path.name]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path_factory):
    _, shown, _, seconds = run(path, tmp_path_factory)
    print(f"{path.name}: {seconds:.1f} s")
    assert shown, "the notebook displayed nothing"
    assert seconds < BUDGET_S, f"{path.name} took {seconds:.0f} s, over its {BUDGET_S} s budget"


def test_notebooks_are_cleared_and_install_flax_vae_first():
    try:
        import nbformat
    except ImportError:
        nbformat = None
    assert EXPECTED <= {p.name for p in NOTEBOOKS}
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        if nbformat is not None:
            nbformat.validate(nbformat.reads(path.read_text(), as_version=4))
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert nb["cells"][0]["cell_type"] == "markdown", f"{path.name}: starts without saying what it does"
        for cell in code:
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name}: outputs not cleared"
        first = "".join(code[0]["source"])
        for part in ("import flax_vae\nexcept ImportError:", "pyproject.toml", '"pip", "install"', '"flax-vae"'):
            assert part in first, f"{path.name}: the first code cell lacks the install pattern ({part!r})"
        assert '"-e"' not in first, f"{path.name}: an editable install does not import in the running kernel"
        extra = EXTRAS.get(path.name)
        assert (f'"-q", source + "{extra}"]' if extra else '"-q", source]') in first, \
            f"{path.name}: installs flax-vae with the wrong extra (wants {extra or 'none'})"


def test_quickstart_round_trips_the_bundled_photos(tmp_path_factory):
    nb, shown, _, _ = run(COLAB / "quickstart.ipynb", tmp_path_factory)
    assert set(nb["psnrs"]) == {"astronaut", "coffee", "chelsea"}
    assert min(nb["psnrs"].values()) > 28, nb["psnrs"]  # taef2 at 256x256: 29.6-31.5 dB
    assert nb["z"].shape == (3, 32, 32, 32) and len(shown) == 5


def test_preview_loop_compiles_once_and_matches_decoding_outside(tmp_path_factory):
    import jax

    nb, _, workdir, _ = run(COLAB / "preview_loop.ipynb", tmp_path_factory)
    vae, sample, steps = nb["vae"], nb["sample"], nb["STEPS"]
    assert len(nb["traces"]) == 1 and nb["previews"].shape[0] == steps
    outside = vae.decode(vae.unscale_latents(nb["latents"].reshape(-1, *nb["latents"].shape[2:])))
    np.testing.assert_allclose(nb["previews"].reshape(outside.shape), outside, atol=1e-5)
    sample(vae.params, jax.random.normal(jax.random.key(1), nb["noise"].shape))  # new noise: no new trace
    assert len(nb["traces"]) == 1 and sample._cache_size() == 1
    assert (workdir / "previews.gif").stat().st_size > 0


def test_encode_dataset_writes_verified_shards_that_decode(tmp_path_factory):
    nb, _, _, _ = run(COLAB / "encode_dataset.ipynb", tmp_path_factory)
    assert nb["problems"] == []
    assert nb["manifest"]["counts"] == dict(inputs=4, encoded=4, skipped=0, unreadable_tar_files=0, shards=2)
    assert sorted(p.name for p in nb["OUTPUT"].glob("*.safetensors")) == ["latents-000000.safetensors",
                                                                          "latents-000001.safetensors"]
    assert nb["again"]["shards_already_done"] == 2 and nb["again"]["shards_written"] == 0
    assert sorted(nb["keys"]) == ["astronaut.png", "astronaut_small.jpg", "chelsea.png", "coffee.png"]
    assert nb["latents"].shape == (4, 16, 16, 4) and nb["decoded"].shape == (4, 128, 128, 3)
    # the stored latents are the photo's (512x512, resized to 128x128 as a whole): TAESD encodes it to them
    photo = np.asarray(Image.open(nb["INPUT"] / "astronaut.png").resize((128, 128), Image.BICUBIC)) / 127.5 - 1
    row = nb["keys"].index("astronaut.png")
    assert np.abs(nb["vae"].encode(photo[None].astype(np.float32)) - nb["latents"][row]).max() < 1e-3  # 3e-6
    assert psnr(nb["decoded"][row], photo) > 17  # TAESD at 128x128: 19.1 dB


def test_distill_learns_and_its_export_loads(tmp_path_factory):
    nb, _, _, _ = run(COLAB / "distill.ipynb", tmp_path_factory)
    result, curve = nb["result"], nb["curve"]
    assert result["step"] == nb["STEPS"] and [m["step"] for m in curve] == [0, 4, 8, 12, 16, 20, 24]
    # measured: held-out PSNR vs the teacher 12.7 dB at step 0 (pruned teacher weights), 20.6 dB at step 24
    assert np.isfinite(result["psnr_ema"]) and result["psnr_ema"] > 18
    assert curve[-1]["psnr_ema"] > curve[0]["psnr_ema"] + 4
    assert curve[-1]["latent_mse_ema"] < curve[0]["latent_mse_ema"]
    assert set(result["export"]) == {"flax", "madebyollin", "diffusers"}
    assert all(Path(where).is_dir() for where in result["export"].values())
    student = nb["student_vae"]  # the flax export, loaded with flax_vae.load
    assert (student.config.width, student.config.depth, set(student.params)) == (32, 3, {"encoder", "decoder"})
    assert np.isfinite(nb["student_psnr"]) and nb["student_psnr"] > 15  # measured 18.1 dB


def test_convert_reloads_every_format_identically(tmp_path_factory):
    nb, _, _, _ = run(COLAB / "convert.ipynb", tmp_path_factory)
    assert nb["identical"] == {"flax": True, "madebyollin": True, "diffusers": True}
    assert len(nb["shown"]) == 5
    np.testing.assert_array_equal(nb["again"].decode(nb["z"]), nb["y"])  # convert.load -> convert.export -> load
    if nb["torch"] is None:
        pytest.skip("the notebook skipped its PyTorch diffusers part: torch or diffusers is not installed")
    assert max(nb["kl_errors"].values()) < 1e-4, nb["kl_errors"]  # measured 2.8e-5
    assert nb["kl_weights_identical"]
    assert nb["images_nchw"].shape == nb["x_nchw"].shape == (1, 3, 64, 64)
