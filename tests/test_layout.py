"""The install layout and the layering: one import name, imports that run one way, a lean `import flax_vae`."""
import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def installed(tmp_path_factory):
    """The wheel built from this checkout, and a folder it is installed into (without dependencies)."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # a copy: an in-tree build/ folder would outlive files deleted from the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "site", "*.egg-info",
                                                                "__pycache__", "demo_out", "reconstructions"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out,
                    source], check=True, cwd=out)
    [wheel] = out.glob("flax_vae-*.whl")
    target = out / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, wheel],
                   check=True, cwd=out)
    return wheel, target


def test_the_wheel_installs_one_import_name(installed):
    wheel, _ = installed
    names = {Path(n).parts[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {n for n in names if not n.endswith(".dist-info")} == {"flax_vae"}
    files = zipfile.ZipFile(wheel).namelist()
    assert "flax_vae/convert/__init__.py" in files and "flax_vae/train/distill.py" in files
    assert "flax_vae/weights/taef2_decoder.safetensors" in files


def test_cli_works_beside_a_users_convert_and_train_modules(installed, tmp_path):
    """A working directory holding convert.py and train.py that raise on import does not disturb flax-vae."""
    _, target = installed
    for name in ("convert", "train"):
        (tmp_path / f"{name}.py").write_text(f"raise RuntimeError('the user\\'s own {name}.py was imported')\n")
    Image.fromarray(np.full((64, 48, 3), 120, np.uint8)).save(tmp_path / "grey.png")
    env = {"PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    for command in ([sys.executable, "-m", "flax_vae.cli"], [str(target / "bin" / "flax-vae")]):
        run = subprocess.run([*command, "reconstruct", "--model", "taesd", "grey.png", "--out", "out"], cwd=tmp_path,
                             env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert str(target) in subprocess.run([sys.executable, "-c", "import flax_vae; print(flax_vae.__file__)"],
                                             cwd=tmp_path, env=env, capture_output=True, text=True).stdout
    assert list((tmp_path / "out").glob("*.png"))


def test_imports_run_one_way(installed, tmp_path):
    """pyproject.toml's import-linter contracts (layers; no cycles), checked on the installed package, where
    convert/ and train/ sit inside flax_vae as they do for users."""
    _, target = installed
    run = subprocess.run([Path(sys.executable).with_name("lint-imports"), "--config", ROOT / "pyproject.toml",
                          "--no-cache"], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 kept, 0 broken" in run.stdout, run.stdout


def test_no_code_imports_convert_or_train_as_top_level_packages():
    offenders = []
    for path in ROOT.glob("**/*.py"):
        if any(part.startswith(".") or part in ("build", "site") for part in path.relative_to(ROOT).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n and n.split(".")[0] in ("convert", "train")]
    assert not offenders


def test_import_flax_vae_is_lean():
    """The base install's import loads neither the jobs' dependencies nor the jobs."""
    code = ("import sys, flax_vae, flax_vae.cli; heavy = {'grain', 'orbax', 'tensorboardX', 'torch', 'optax'}; "
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}), "
            "sorted(m for m in sys.modules if m.startswith(('flax_vae.train', 'flax_vae.encode_dataset'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"


def test_the_version_is_defined_once():
    import flax_vae
    from importlib.metadata import version
    assert version("flax-vae") == flax_vae.__version__
    assert 'version = "' not in (ROOT / "pyproject.toml").read_text()
