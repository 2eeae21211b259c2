"""A property-based fuzz of the loaders (hypothesis), starting from real files: the bundled TAESD pair, diffusers
folders (AutoencoderKL, DC-AE), a diffusers Flax msgpack folder, a flax-vae folder, an LDM single file, a MIT-HAN
DC-AE file and a .pth (the bundled TAESD decoder, saved by torch). Each case truncates a file, flips bits in its
header or data, edits its header (shapes, dtypes, offsets), renames, drops, reshapes or retypes a tensor, or edits
config.json, then loads the result.

The property: `flax_vae.load` raises CheckpointError with a one-line message naming the file, or returns a model
whose output on a tiny input is finite; nothing else is raised, no case runs longer than CASE_SECONDS, and no file
is written. A model whose weights a flipped exponent bit made huge (finite, so no loader can tell them from trained
weights) may overflow: its decode then raises its FloatingPointError, accepted only when some weight is beyond
HUGE_WEIGHT.

CI runs EXAMPLES cases, derandomized (the same cases each run, so a failure replays); FLAX_VAE_FUZZ_EXAMPLES=100000
runs a longer one (docs/security.md)."""
import collections
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest
import torch
from flax import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flax_vae
from flax_vae import convert
from flax_vae.autoencoder import Autoencoder
from flax_vae.convert.checkpoint import DTYPE_BYTES, CheckpointError, read_tensors, write_safetensors
from flax_vae.convert.rules import flatten, from_flax, unflatten
from flax_vae.kl import KLConfig
from flax_vae.loading import WEIGHTS_DIR
from flax_vae.testing import model, random_params

EXAMPLES = int(os.environ.get("FLAX_VAE_FUZZ_EXAMPLES", "1100"))
MIN_CASES = min(EXAMPLES, 1000)
CASE_SECONDS = 60  # a first compile of a new config takes seconds on a busy 2-core machine; a hang takes forever
HUGE_WEIGHT = 1e4  # beyond any weight of the source files


@dataclasses.dataclass(frozen=True)
class Source:
    files: dict  # file name -> bytes
    load: str  # what flax_vae.load is given: "." (the folder) or a file name


# LDM files hold no norm_num_groups: they get 32, so this KL model's widths are multiples of 32
KL = KLConfig(block_out_channels=(32, 32), layers_per_block=1)


def _saved(vae, to, folder) -> dict:
    flax_vae.save(vae, folder, to=to)
    return {f.name: f.read_bytes() for f in folder.iterdir()}


def _file(folder, name, tensors) -> dict:
    write_safetensors(folder / name, tensors)
    return {name: (folder / name).read_bytes()}


def _pth(tensors) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: torch.from_numpy(np.asarray(v, np.float32)).half() for k, v in tensors.items()}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    kl, dcae = Autoencoder(KL, flax_vae.family.module(KL), random_params(KL), "kl"), model("dcae-small")
    taesd = {f: (WEIGHTS_DIR / f).read_bytes() for f in ("taesd_encoder.safetensors", "taesd_decoder.safetensors")}
    return {
        "bundled TAESD pair": Source(taesd, "."),
        "diffusers folder": Source(_saved(kl, "diffusers", root / "diffusers"), "."),
        "diffusers DC-AE folder": Source(_saved(dcae, "diffusers", root / "dcae"), "."),
        "diffusers Flax folder": Source(_saved(kl, "diffusers-flax", root / "diffusers-flax"), "."),
        "flax-vae folder": Source(_saved(kl, "flax", root / "flax"), "."),
        "LDM single file": Source(_file(root, "vae.safetensors", from_flax(kl.params, convert.kl.rules(KL, ldm=True))),
                                  "vae.safetensors"),
        "MIT-HAN DC-AE file": Source(_file(root, "dc-ae.safetensors", from_flax(
            dcae.params, convert.dcae.mit_rules(dcae.config))), "dc-ae.safetensors"),
        ".pth": Source({"taesd_decoder.pth": _pth(read_tensors(WEIGHTS_DIR / "taesd_decoder.safetensors"))},
                       "taesd_decoder.pth"),
    }


# ---- mutations: each draws what it changes, so that hypothesis can shrink a failing case

def truncate(data, draw, suffix):
    return data[:draw(st.integers(0, max(len(data) - 1, 0)))]


def _flip(data, draw, start, end):
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(start, max(start, end - 1)))
        if i < len(data):
            data[i] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


def _head(data, suffix):
    """Where a file's header ends: safetensors' JSON, else its first kilobyte."""
    return 8 + int.from_bytes(data[:8], "little") if suffix == ".safetensors" else min(len(data), 1024)


def flip_head(data, draw, suffix):
    return _flip(data, draw, 0, _head(data, suffix))


def flip_data(data, draw, suffix):
    return _flip(data, draw, min(_head(data, suffix), len(data)), len(data))


SHAPE_EDITS = [lambda s, n: s[::-1], lambda s, n: [*s, 1], lambda s, n: s[1:], lambda s, n: [n, *s[1:]],
               lambda s, n: [int(np.prod(s))], lambda s, n: [-n, *s], lambda s, n: [float(x) for x in s]]


def edit_header(data, draw, suffix):
    """One safetensors header entry's dtype, shape, offsets or name changed, or the entry dropped (its bytes
    left behind)."""
    length = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + length]), data[8 + length:]
    key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    entry = header[key]
    edit = draw(st.sampled_from(["dtype", "shape", "offsets", "swap offsets", "rename", "drop entry"]))
    if edit == "dtype":
        entry["dtype"] = draw(st.sampled_from([*DTYPE_BYTES, "F8_E4M3", "C64", "F4", "F32 "]))
    elif edit == "shape":
        entry["shape"] = draw(st.sampled_from(SHAPE_EDITS))(entry["shape"], draw(st.integers(0, 2**20)))
    elif edit == "offsets":
        entry["data_offsets"] = [o + draw(st.integers(-64, 64)) for o in entry["data_offsets"]]
    elif edit == "swap offsets":
        other = header[draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))]
        entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif edit == "rename":
        header[_renamed(key, draw)] = header.pop(key)
    else:
        del header[key]
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def _renamed(key, draw):
    return draw(st.sampled_from([key + "_", key.replace(".", "_", 1), key.upper(), "x." + key])
                | st.text(max_size=12))


def edit_tensors(data, draw, suffix):
    """A tensor renamed, dropped, reshaped or retyped: the file rewritten in its own format."""
    flat = (flatten(serialization.msgpack_restore(data)) if suffix == ".msgpack" else
            {k: v.numpy() for k, v in torch.load(io.BytesIO(data), weights_only=True).items()})
    key = draw(st.sampled_from(sorted(flat)))
    edit = draw(st.sampled_from(["rename", "drop", "transpose", "flatten", "cast", "empty"]))
    value = flat.pop(key)
    if edit != "drop":
        flat[_renamed(key, draw) if edit == "rename" else key] = (
            value.T if edit == "transpose" else value.reshape(-1) if edit == "flatten" else
            value.astype(draw(st.sampled_from([np.float64, np.int32, np.bool_, np.uint8]))) if edit == "cast" else
            np.zeros((0,), value.dtype) if edit == "empty" else value)
    if suffix == ".msgpack":
        return serialization.msgpack_serialize(unflatten(flat))
    buffer = io.BytesIO()
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in flat.items()}, buffer)
    return buffer.getvalue()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, 2, 3, 4, 8, 32, -1]) |
    st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)


def edit_json(data, draw, suffix):
    """A config.json field set to another JSON value (NaN, huge numbers, wrong types), or deleted."""
    cfg = json.loads(data)
    key = draw(st.sampled_from(sorted(cfg)))
    if draw(st.booleans()):
        del cfg[key]
    else:
        cfg[key] = draw(JSON_VALUES)
    return json.dumps(cfg).encode()


MUTATIONS = {  # file suffix -> what may be done to such a file
    ".safetensors": [truncate, flip_head, flip_data, edit_header],
    ".msgpack": [truncate, flip_head, flip_data, edit_tensors],
    ".pth": [truncate, flip_head, flip_data, edit_tensors],
    ".json": [truncate, flip_head, edit_json],
}


# ---- running a case

class Hang(BaseException):
    """Raised by the per-case alarm; a BaseException, so that no `except Exception` in the loaders hides it."""


@contextlib.contextmanager
def time_limit(seconds):
    def alarm(signum, frame):
        raise Hang(f"a case ran for more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(path) -> str:
    """What loading `path` came to: refused (with the message), loaded, or overflowed (see the module docstring).
    Anything else fails the test."""
    try:
        vae = flax_vae.load(path)
    except CheckpointError as e:
        message = str(e)
        assert str(path.parent) in message and "\n" not in message, repr(message)
        return f"refused: {message}"
    c = vae.config
    try:
        if "decoder" in vae.params:
            out = vae.decode(np.random.default_rng(0).standard_normal((1, 2, 2, c.latent_channels), np.float32))
        else:
            out = vae.encode(np.zeros((1, 2 * c.factor, 2 * c.factor, 3), np.float32))
    except FloatingPointError:
        assert max(float(np.max(np.abs(np.asarray(a, np.float32)), initial=0)) for a in jax.tree.leaves(vae.params)) \
            > HUGE_WEIGHT, "a model with weights in range overflowed"
        return "overflowed"
    assert np.isfinite(np.asarray(out)).all()
    return "loaded"


def test_loaders_survive_mutated_checkpoints(sources, tmp_path):
    seen = collections.Counter()
    messages = set()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def case(data):
        source = sources[data.draw(st.sampled_from(sorted(sources)), label="source")]
        target = data.draw(st.sampled_from(sorted(source.files)), label="file")
        suffix = os.path.splitext(target)[1]
        mutation = data.draw(st.sampled_from(MUTATIONS[suffix]), label="mutation")
        folder = tmp_path / "case"
        shutil.rmtree(folder, ignore_errors=True)  # what a failed case left
        folder.mkdir()
        for name, content in source.files.items():
            (folder / name).write_bytes(mutation(content, data.draw, suffix) if name == target else content)
        before = sorted(os.listdir(folder))
        with time_limit(CASE_SECONDS):
            result = outcome(folder / source.load)
        assert sorted(os.listdir(folder)) == before, "the loader wrote a file"
        seen[result.split(":")[0]] += 1
        messages.add(re.sub(r"\d+", "N", result.replace(str(folder), "<case>")))

    case()
    print(f"\nfuzz: {sum(seen.values())} cases: {dict(seen)}; {len(messages)} distinct messages (numbers as N)")
    assert sum(seen.values()) >= MIN_CASES
    assert seen["loaded"] and seen["refused"]  # the mutations neither all break the files nor all miss
