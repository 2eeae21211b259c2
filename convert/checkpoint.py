"""Reading and writing tensor files: safetensors (preferred) and PyTorch pickles (weights only)."""
import collections
import json
import math
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

# safetensors dtype -> bytes per element: the dtypes numpy reads (bfloat16 through ml_dtypes). The others (float8,
# sub-byte floats, complex) hold no autoencoder's weights, and the numpy reader fails on most of them.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
               "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_DIMS = 64  # numpy's; it also bounds the work of multiplying out a hostile shape


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
    check_safetensors_header(path)
    try:  # numpy: one copy of each tensor on the host (the flax framework makes a device copy first)
        with safetensors.safe_open(str(path), framework="numpy") as f:
            return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from None


def check_safetensors_header(path):
    """Raise a CheckpointError naming the first lie of a safetensors file's header (its 8-byte little-endian
    length, the JSON, each tensor's dtype, shape and data offsets) before the safetensors library maps the file:
    its errors name no tensor, and dtypes it accepts can fail later in numpy."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > size - 8:
            raise _unreadable(path, f"header length {length} is past the end of the file ({size} bytes): corrupt "
                                    "or truncated?")
        if length > MAX_HEADER_BYTES:
            raise _unreadable(path, f"header length {length} is over the limit of {MAX_HEADER_BYTES} bytes")
        text = f.read(length)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # not UTF-8 or not JSON, duplicate keys, too deep, too many digits
        raise _unreadable(path, f"header is not UTF-8 JSON ({describe_error(e)})") from None
    if not isinstance(header, dict):
        raise _unreadable(path, f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _unreadable(path, f"__metadata__ must map strings to strings, got {clip(metadata)}")
    data_bytes = size - 8 - length
    covered = 0  # the tensors tile the data exactly, in the order of their offsets (as the library requires)
    for begin, end, key in sorted(_span(path, key, info, data_bytes) for key, info in header.items()):
        if begin != covered:
            problem = "overlap the tensor before" if begin < covered else f"leave bytes {covered}-{begin} unused"
            raise _unreadable(path, f"tensor {clip(key)}: data offsets [{begin}, {end}] {problem}")
        covered = end
    if covered != data_bytes:
        raise _unreadable(path, f"the tensors end at byte {covered} of the data, which has {data_bytes}")


def _span(path, key, info, data_bytes) -> tuple[int, int, str]:
    """(begin, end, key) of one header entry, whose dtype, shape and offsets agree with each other and the data."""
    where = f"tensor {clip(key)}"
    if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
        raise _unreadable(path, f"{where}: expected an object with dtype, shape and data_offsets, got {clip(info)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise _unreadable(path, f"{where}: unsupported dtype {clip(dtype)} (supported: {', '.join(DTYPE_BYTES)})")
    if not (_whole_numbers(shape) and len(shape) <= MAX_DIMS):
        raise _unreadable(path, f"{where}: shape must be a list of at most {MAX_DIMS} whole numbers >= 0, got "
                                f"{clip(shape)}")
    if not (_whole_numbers(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise _unreadable(path, f"{where}: data_offsets must be [begin, end], whole numbers with begin <= end, got "
                                f"{clip(offsets)}")
    begin, end = offsets
    if end > data_bytes:
        raise _unreadable(path, f"{where}: data offsets [{begin}, {end}] run past the end of the data "
                                f"({data_bytes} bytes): corrupt or truncated?")
    if math.prod(shape) * DTYPE_BYTES[dtype] != end - begin:
        raise _unreadable(path, f"{where}: shape {clip(shape)} of {dtype} does not fill its data offsets "
                                f"[{begin}, {end}] ({end - begin} bytes)")
    return begin, end, key


def _unreadable(path, problem) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable safetensors file: {problem}")


def _unique_keys(pairs):
    """json's object_pairs_hook: a repeated key is an error (json keeps the last one, other readers the first)."""
    repeated = [key for key, n in collections.Counter(key for key, _ in pairs).items() if n > 1]
    if repeated:
        raise ValueError(f"duplicate key {clip(repeated[0])}")
    return dict(pairs)


def _whole_numbers(value) -> bool:
    return isinstance(value, list) and all(type(x) is int and x >= 0 for x in value)


def clip(value, limit=80) -> str:
    """repr(value), cut to `limit` characters: a hostile file's names and values go into one-line messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def describe_error(e: BaseException) -> str:
    """A parser's error as its type and the first line of its message, for a one-line CheckpointError."""
    line = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _torch_reason(e: BaseException) -> str:
    """torch's reason for refusing a pickle (the line naming the global), without its advice to turn the
    restriction off or to allowlist the global."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
    return f"{type(e).__name__}: {reason.split(' Please use ')[0]}"


def _read_torch(path):
    try:
        import torch
    except ImportError:
        raise CheckpointError(f'{path}: reading PyTorch files needs torch (pip install "flax-vae[torch]"), '
                              "or convert the file to .safetensors first") from None
    try:
        # weights_only: the restricted unpickler; arbitrary objects are refused, never executed.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(
            f"{path}: refused or unreadable PyTorch file ({_torch_reason(e)}). "
            "Only plain tensor state dicts are read; other pickled objects (e.g. training state in .ckpt files) "
            "are never unpickled. If you trust the file, convert it to .safetensors once, elsewhere: "
            "python -c \"import torch, safetensors.torch as st; sd = torch.load('in.ckpt', weights_only=False); "
            "sd = sd.get('state_dict', sd); st.save_file({k: v.contiguous() for k, v in sd.items() "
            "if isinstance(v, torch.Tensor)}, 'out.safetensors')\"") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # training checkpoints: the tensors, next to plain counters (global_step, ...)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    for key, value in obj.items():
        if not (isinstance(key, str) and isinstance(value, torch.Tensor)):
            raise CheckpointError(f"{path}: expected a state dict of tensors, got {clip(key)}: "
                                  f"{type(value).__name__}")
    return {key: _torch_to_numpy(path, key, t) for key, t in obj.items()}


def _torch_to_numpy(path, key, t):
    import torch
    try:
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    except (RuntimeError, TypeError) as e:  # float8, complex32, quantized and sparse tensors have no numpy form
        raise CheckpointError(f"{path}: tensor {clip(key)} ({t.dtype}, {t.layout}) cannot be read: "
                              f"{describe_error(e)}") from None


def write_atomic(path, data: bytes):
    """Write `data` to `path` so that readers (and a crash at any moment) see the old file or the new one, whole:
    a temporary sibling, flushed to disk, renamed into place (the rename flushed too, for a power cut)."""
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
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_safetensors(path, tensors: dict, metadata: dict[str, str] | None = None):
    """Atomically write tensors (numpy or jax arrays, any float dtype incl. bfloat16)."""
    write_atomic(path, safetensors.flax.save({k: jnp.asarray(v) for k, v in tensors.items()}, metadata=metadata))


def write_json(path, obj):
    """Atomically write `obj` as indented JSON with sorted keys."""
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path) -> dict:
    """A JSON object (dict) from `path`, or a CheckpointError."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # also: not UTF-8, numbers with too many digits, too deep
        raise CheckpointError(f"{path}: unreadable JSON: {describe_error(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


__all__ = ["CheckpointError", "read_tensors", "write_atomic", "write_safetensors", "read_json", "write_json",
           "TORCH_SUFFIXES", "CHECKPOINT_SUFFIXES"]
