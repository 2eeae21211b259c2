"""Reading and writing tensor files: safetensors (preferred) and PyTorch pickles (weights only)."""
import json
import os
import tempfile
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.flax

from flax_vae.errors import CheckpointError


TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")  # pickles: read with torch's restricted unpickler only
CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)


def read_tensors(path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors or PyTorch file as numpy arrays in their stored dtype."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r} (expected .safetensors or "
                          f"{', '.join(TORCH_SUFFIXES)})")


def _read_safetensors(path):
    try:  # numpy: one copy of each tensor on the host (the flax framework makes a device copy first)
        with safetensors.safe_open(str(path), framework="numpy") as f:
            return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from None


def _read_torch(path):
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading PyTorch files needs torch (pip install 'flax-vae[torch]'), "
                              "or convert the file to .safetensors first") from None
    try:
        # weights_only: the restricted unpickler; arbitrary objects are refused, never executed.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(
            f"{path}: refused or unreadable PyTorch file ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Only plain tensor state dicts are read; other pickled objects (e.g. training state in .ckpt files) "
            "are never unpickled. If you trust the file, convert it to .safetensors once, elsewhere: "
            "python -c \"import torch, safetensors.torch as st; sd = torch.load('in.ckpt', weights_only=False); "
            "sd = sd.get('state_dict', sd); st.save_file({k: v.contiguous() for k, v in sd.items() "
            "if isinstance(v, torch.Tensor)}, 'out.safetensors')\"") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # training checkpoints: the tensors, next to plain counters (global_step, ...)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return {k: _torch_to_numpy(v) for k, v in obj.items()}


def _torch_to_numpy(t):
    import torch
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def write_atomic(path, data: bytes):
    """Write `data` to `path` so that readers (and a crash at any moment) see the old file or the new one, whole:
    a temporary sibling, flushed to disk, renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_safetensors(path, tensors: dict, metadata: dict[str, str] | None = None):
    """Atomically write tensors (numpy or jax arrays, any float dtype incl. bfloat16)."""
    write_atomic(path, safetensors.flax.save({k: jnp.asarray(v) for k, v in tensors.items()}, metadata=metadata))


def write_json(path, obj):
    """Atomically write `obj` as indented JSON with sorted keys."""
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path) -> dict:
    """A JSON object (dict) from `path`, or a CheckpointError."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


__all__ = ["CheckpointError", "read_tensors", "write_atomic", "write_safetensors", "read_json", "write_json",
           "TORCH_SUFFIXES", "CHECKPOINT_SUFFIXES"]
