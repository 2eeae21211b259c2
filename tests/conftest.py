import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight CPU devices for the data-parallel tests; plain (unsharded) calls still run on the first one.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import io  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import types  # noqa: E402
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


def seeded_params(shapes: dict, seed: int) -> dict:
    """tests/data/diffusers_flax/make_reference.py's seeded weights (its documented algorithm), as a flat
    {"/"-joined path: float32 array} dict: one float64 standard-normal draw per leaf, in sorted path order."""
    rng = np.random.default_rng(seed)
    out = {}
    for path in sorted(shapes):
        shape = tuple(shapes[path])
        x = rng.standard_normal(size=shape)
        leaf = path.rsplit("/", 1)[1]
        if leaf == "kernel":
            x = x * (1.0 / np.sqrt(np.prod(shape[:-1])))
        out[path] = (1.0 + 0.1 * x if leaf == "scale" else 0.02 * x if leaf == "bias" else x).astype(np.float32)
    return out


def run_processes(args, processes=2, devices=2, timeout=600):
    """Run `python *args` as `processes` JAX processes of one job on loopback (gloo CPU collectives), each with
    `devices` CPU devices. Each reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID from its
    environment for jax.distributed.initialize. Returns their outputs (stdout); fails if any process fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes))
    procs = [subprocess.Popen([sys.executable, *map(str, args)], env=dict(env, JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    outputs = []
    try:
        for i, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"process {i} failed:\n{out}"
            outputs.append(out)
    finally:
        for proc in procs:
            proc.kill()
    return outputs


def run_notebook(path, monkeypatch, workdir):
    """Run a notebook's code cells in order in one namespace, in `workdir`, with IPython's display collecting
    what it shows (no Jupyter needed). Returns (namespace, displayed objects)."""
    shown = []
    display = types.ModuleType("IPython.display")
    display.display = shown.append
    ipython = types.ModuleType("IPython")  # what matplotlib reads from an imported IPython: no running kernel
    ipython.get_ipython, ipython.version_info = (lambda: None), (8, 30, 0)
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    monkeypatch.chdir(workdir)
    namespace = {}
    for cell in json.loads(Path(path).read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), Path(path).name, "exec"), namespace)
    return namespace, shown


def encoded(image, fmt, **kw) -> bytes:
    """A PIL image saved in memory as `fmt` (with Pillow's save options)."""
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def write_tar(path, members: dict):
    """An uncompressed tar at `path` holding {member name: bytes}, names as given (hostile ones too)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
