"""Checkpoints that lie: code-executing pickles, safetensors headers whose lengths, offsets, shapes and dtypes do not
agree, hostile msgpack trees and config.json files. Each is one CheckpointError, one line naming the file and the
problem; nothing runs, hangs or allocates what the file does not hold."""
import io
import json
import os
import pickle
import sys
import tracemalloc
import zipfile

import msgpack
import numpy as np
import pytest
import torch
from flax import serialization

import flax_vae
from flax_vae.convert.checkpoint import (DTYPE_BYTES, TORCH_SUFFIXES, CheckpointError, check_safetensors_header,
                                         read_tensors, write_safetensors)
from flax_vae.convert.diffusers_flax import WEIGHTS_FILE
from flax_vae.loading import WEIGHTS_DIR
from flax_vae.testing import model


def refused(path, *phrases):
    """The CheckpointError message of loading `path`, checked to be one line naming the file and each phrase."""
    with pytest.raises(CheckpointError) as e:
        flax_vae.load(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


# ---- pickles: read with torch's weights-only unpickler, never with pickle

class Payload:
    """Unpickled, this runs a shell command that creates `marker`: proof of execution if it ever exists."""
    marker = None

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _zip_with_member(archive: bytes, name: str, data: bytes) -> bytes:
    """A copy of the zip `archive` with the member ending in `name` replaced by `data`."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info, data if info.filename.endswith(name) else src.read(info))
    return out.getvalue()


def _torch_bytes(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


PAYLOADS = {  # name -> (file bytes, a phrase of torch's refusal naming the global)
    "reduce_os_system_in_zip": lambda: _torch_bytes({"0.weight": torch.zeros(1), "x": Payload()}),
    "reduce_os_system_legacy_torch": lambda: _torch_bytes({"0.weight": torch.zeros(1), "x": Payload()},
                                                          _use_new_zipfile_serialization=False),
    "reduce_os_system_plain_pickle": lambda: pickle.dumps({"0.weight": Payload()}, protocol=2),
    "payload_as_zip_member_data_pkl": lambda: _zip_with_member(
        _torch_bytes({"0.weight": torch.zeros(1)}), "/data.pkl", pickle.dumps({"0.weight": Payload()}, protocol=2)),
    # protocol 0 by hand: GLOBAL builtins.eval, MARK, a string, TUPLE, REDUCE, STOP
    "global_opcode_builtins_eval": lambda: (b"cbuiltins\neval\n(S'__import__(\"os\").system(\"touch "
                                            + str(Payload.marker).encode() + b"\")'\ntR."),
}


@pytest.mark.parametrize("suffix", TORCH_SUFFIXES)
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_code_executing_pickles_are_refused_and_never_run(tmp_path, payload, suffix):
    Payload.marker = tmp_path / "executed"
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(PAYLOADS[payload]())
    message = refused(path, "refused or unreadable PyTorch file", "never unpickled", "GLOBAL")
    assert "eval" in message if "eval" in payload else "system" in message
    assert "Please use" not in message and "weights_only` set to `False`" not in message  # torch's unsafe advice
    assert not Payload.marker.exists()


def test_pth_without_torch_names_the_install(tmp_path, monkeypatch):
    path = tmp_path / "taef2_encoder.pth"
    path.write_bytes(_torch_bytes({"0.weight": torch.zeros(1)}))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    refused(path, 'pip install "flax-vae[torch]"', "convert the file to .safetensors")


@pytest.mark.parametrize("contents,phrase", [
    (lambda: [torch.zeros(1)], "expected a state dict of tensors, got list"),
    (lambda: {0: torch.zeros(1)}, "expected a state dict of tensors, got 0: Tensor"),
    (lambda: {"0.weight": {"nested": torch.zeros(1)}}, "got '0.weight': dict"),
    (lambda: {"0.weight": torch.zeros(2, dtype=torch.float8_e4m3fn)}, "tensor '0.weight' (torch.float8_e4m3fn"),
    (lambda: {"0.weight": torch.zeros(2, 2).to_sparse()}, "tensor '0.weight' (torch.float32, torch.sparse_coo"),
])
def test_pth_that_is_not_a_plain_state_dict(tmp_path, contents, phrase):
    path = tmp_path / "model.pth"
    path.write_bytes(_torch_bytes(contents()))
    refused(path, phrase)


# ---- safetensors headers: checked before the safetensors library maps the file

GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}}


def safetensors_file(header=GOOD, data=bytes(24), length=None, **changes) -> bytes:
    """A safetensors file: 8-byte little-endian header length, the header (a dict, or raw bytes), the data.
    changes: {tensor name: {field: value}} merged into the header's entries."""
    if changes:
        header = {k: {**v, **changes.get(k, {})} for k, v in header.items()}
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


LIES = {  # name -> (file bytes, phrase of the message)
    "length_past_the_end": (safetensors_file(length=10_000), "header length 10000 is past the end of the file"),
    "length_2_to_the_40": (safetensors_file(length=2**40), "header length 1099511627776 is past the end"),
    "shorter_than_the_length_field": (b"\x10\x00", "past the end of the file (2 bytes)"),
    "offsets_past_the_end": (safetensors_file(b={"data_offsets": [16, 40], "shape": [12]}),
                             "tensor 'b': data offsets [16, 40] run past the end of the data (24 bytes)"),
    "offsets_overlapping": (safetensors_file(b={"data_offsets": [8, 16]}, data=bytes(16)),
                            "tensor 'b': data offsets [8, 16] overlap the tensor before"),
    "offsets_leaving_a_gap": (safetensors_file(b={"data_offsets": [18, 26]}, data=bytes(26)),
                              "tensor 'b': data offsets [18, 26] leave bytes 16-18 unused"),
    "bytes_after_the_last_tensor": (safetensors_file(data=bytes(30)),
                                    "tensors end at byte 24 of the data, which has 30"),
    "offsets_reversed": (safetensors_file(b={"data_offsets": [24, 16]}), "data_offsets must be [begin, end]"),
    "offsets_negative": (safetensors_file(a={"data_offsets": [-16, 0]}), "data_offsets must be [begin, end]"),
    "offsets_not_a_pair": (safetensors_file(a={"data_offsets": [0, 8, 16]}), "data_offsets must be [begin, end]"),
    "offsets_floats": (safetensors_file(a={"data_offsets": [0.0, 16.0]}), "data_offsets must be [begin, end]"),
    "shape_product_not_the_bytes": (safetensors_file(a={"shape": [3, 2]}),
                                    "tensor 'a': shape [3, 2] of F32 does not fill its data offsets [0, 16]"),
    "shape_of_a_huge_product": (safetensors_file(a={"shape": [2**62, 2**62]}), "does not fill its data offsets"),
    "shape_negative": (safetensors_file(a={"shape": [-2, -2]}), "tensor 'a': shape must be a list of at most 64"),
    "shape_floats": (safetensors_file(a={"shape": [2.0, 2]}), "shape must be a list of at most 64 whole numbers"),
    "shape_booleans": (safetensors_file(b={"shape": [True, 4]}), "shape must be a list of at most 64 whole numbers"),
    "shape_not_a_list": (safetensors_file(a={"shape": "2x2"}), "shape must be a list"),
    "shape_of_65_dimensions": (safetensors_file(a={"shape": [1] * 61 + [2, 2, 1, 1]}), "at most 64 whole numbers"),
    "unknown_dtype": (safetensors_file(a={"dtype": "F33"}), "tensor 'a': unsupported dtype 'F33' (supported: "),
    "float8_dtype": (safetensors_file(b={"dtype": "F8_E4M3", "shape": [8]}), "unsupported dtype 'F8_E4M3'"),
    "dtype_not_a_string": (safetensors_file(a={"dtype": 4}), "unsupported dtype 4"),
    "entry_not_an_object": (safetensors_file({**GOOD, "c": [0, 0]}), "tensor 'c': expected an object with dtype"),
    "entry_without_offsets": (safetensors_file({**GOOD, "c": {"dtype": "F32", "shape": [0]}}),
                              "expected an object with dtype, shape and data_offsets"),
    "duplicate_tensor": (safetensors_file(b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
                                          b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}'),
                         "duplicate key 'a'"),
    "duplicate_field": (safetensors_file(b'{"a": {"dtype": "F32", "dtype": "F64", "shape": [6], '
                                         b'"data_offsets": [0, 24]}}'), "duplicate key 'dtype'"),
    "header_not_utf8": (safetensors_file(b'{"\xff\xfe": 1}'), "header is not UTF-8 JSON (UnicodeDecodeError"),
    "header_not_json": (safetensors_file(b"PK\x03\x04 a zip, maybe"), "header is not UTF-8 JSON (JSONDecodeError"),
    "header_a_list": (safetensors_file(b"[1, 2, 3]"), "header is a JSON list, not an object"),
    "header_nested_100000_deep": (safetensors_file(b"[" * 100_000 + b"]" * 100_000), "(RecursionError"),
    "number_of_5000_digits": (safetensors_file(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b"]}}"),
                              "header is not UTF-8 JSON (ValueError: Exceeds the limit"),
    "metadata_not_strings": (safetensors_file({**GOOD, "__metadata__": {"format": 1}}),
                             "__metadata__ must map strings to strings"),
    "newline_in_a_name": (safetensors_file({"a\nb": {**GOOD["a"], "shape": [5]}, "b": GOOD["b"]}),
                          r"tensor 'a\nb': shape [5] of F32"),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_lying_safetensors_headers_are_named(tmp_path, lie):
    data, phrase = LIES[lie]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        refused(path, "not a readable safetensors file: ", phrase)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak} bytes allocated to refuse a {len(data)}-byte file"


def test_header_length_over_the_library_limit(tmp_path):
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:  # a sparse 200 MB file: the length fits in it, but is over safetensors' limit
        f.write((150_000_000).to_bytes(8, "little"))
        f.truncate(200_000_000)
    refused(path, "header length 150000000 is over the limit of 100000000 bytes")


def test_what_the_header_check_accepts(tmp_path):
    """Metadata, every supported dtype, empty tensors and the padding safetensors writes are legal."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for i, (dtype, size) in enumerate(DTYPE_BYTES.items()):
        header[f"t{i}"] = {"dtype": dtype, "shape": [3, 1], "data_offsets": [offset, offset + 3 * size]}
        offset += 3 * size
    header["empty"] = {"dtype": "F32", "shape": [0, 5], "data_offsets": [offset, offset]}
    text = json.dumps(header).encode()
    path = tmp_path / "all.safetensors"
    path.write_bytes(safetensors_file(text + b" " * (-len(text) % 8), bytes(offset)))
    tensors = read_tensors(path)
    assert [str(tensors[f"t{i}"].dtype) for i in range(len(DTYPE_BYTES))] == [
        "bool", "uint8", "int8", "int16", "uint16", "float16", "bfloat16", "int32", "uint32", "float32", "int64",
        "uint64", "float64"]
    assert tensors["empty"].shape == (0, 5)
    for f in WEIGHTS_DIR.glob("*.safetensors"):  # files written by the safetensors library itself
        check_safetensors_header(f)


def test_nan_or_infinite_weights_are_refused(tmp_path):
    tensors = read_tensors(WEIGHTS_DIR / "taesd_decoder.safetensors")
    tensors["1.weight"] = tensors["1.weight"].copy()
    tensors["1.weight"][0, 0, 0, 0] = np.inf
    write_safetensors(tmp_path / "taesd_decoder.safetensors", tensors)
    refused(tmp_path / "taesd_decoder.safetensors", "decoder/conv_in/kernel holds NaN or infinite values")


# ---- diffusers Flax msgpack

@pytest.fixture(scope="module")
def flax_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flax") / "vae"
    flax_vae.save(model("kl-small"), folder, to="diffusers-flax")
    return folder


def _nested(levels):
    tree = {"kernel": np.zeros(1, np.float32)}
    for _ in range(levels):
        tree = {"x": tree}
    return tree


@pytest.mark.parametrize("data,phrase", [
    (b"\x81\xa1x" * 100_000 + b"\xc0", "not a readable Flax msgpack file (corrupt or truncated?): StackError"),
    (serialization.msgpack_serialize(_nested(200)), "a tree nested deeper than 16 levels is no diffusers model"),
    (serialization.msgpack_serialize({"a": 1.5}), "does not match the model"),
    # an array claiming 2**40 float32 values in 4 bytes (flax's ndarray extension: shape, dtype name, bytes)
    (msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb(((2**40,), "float32", bytes(4))))}),
     "not a readable Flax msgpack file"),
])
def test_hostile_msgpack(tmp_path, flax_folder, data, phrase):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_bytes((flax_folder / "config.json").read_bytes())
    (folder / WEIGHTS_FILE).write_bytes(data)
    refused(folder, str(folder / WEIGHTS_FILE), phrase)


def test_msgpack_with_nan_weights(tmp_path, flax_folder):
    tree = serialization.msgpack_restore((flax_folder / WEIGHTS_FILE).read_bytes())
    tree["quant_conv"]["bias"] = np.full_like(tree["quant_conv"]["bias"], np.nan)
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_bytes((flax_folder / "config.json").read_bytes())
    (folder / WEIGHTS_FILE).write_bytes(serialization.msgpack_serialize(tree))
    refused(folder, "encoder/quant_conv/bias holds NaN or infinite values")


# ---- config.json

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    for to in ("diffusers", "flax"):
        flax_vae.save(model("kl-small"), root / to, to=to)
    return root


def _with_config(tmp_path, source, text: bytes):
    folder = tmp_path / "vae"
    folder.mkdir()
    for f in source.iterdir():
        (folder / f.name).write_bytes(text if f.name == "config.json" else f.read_bytes())
    return folder


def _edited(source, change):
    cfg = json.loads((source / "config.json").read_text())
    change(cfg.get("config", cfg))
    return json.dumps(cfg).encode()


@pytest.mark.parametrize("to,change,phrase", [
    ("diffusers", lambda c: c.update(layers_per_block=65536), "layers_per_block: at most 16 layers per stage"),
    ("diffusers", lambda c: c.update(norm_num_groups=0), "norm_num_groups: must be at least 1, got 0"),
    ("diffusers", lambda c: c.update(scaling_factor=float("nan")), "scaling_factor: expected a finite number"),
    ("diffusers", lambda c: c.update(scaling_factor=1e400), "scaling_factor: expected a finite number, got inf"),
    ("diffusers", lambda c: c.update(latent_channels=2**40), "latent_channels: expected a whole number from 0 to"),
    ("diffusers", lambda c: c.pop("_class_name"), "unsupported diffusers model None"),
    ("flax", lambda c: c.update(block_out_channels=[8] * 11, norm_num_groups=8), "at most 10 stages, got 11"),
    ("flax", lambda c: c.update(layers_per_block=True), "layers_per_block: expected a whole number"),
    ("flax", lambda c: c.clear() or c.update(bogus=1), "bad config: "),
])
def test_config_json_fields(tmp_path, folders, to, change, phrase):
    refused(_with_config(tmp_path, folders / to, _edited(folders / to, change)), phrase)


@pytest.mark.parametrize("text,phrase", [
    (b"\xff\xfe{}", "unreadable JSON: UnicodeDecodeError"),
    (b'{"latent_channels": ' + b"4" * 5000 + b"}", "unreadable JSON: ValueError: Exceeds the limit"),
    (b"[" * 100_000 + b"]" * 100_000, "unreadable JSON: RecursionError"),
    (b'"a string"', "expected a JSON object, got str"),
    (b"", "unreadable JSON: JSONDecodeError"),
])
def test_unreadable_config_json(tmp_path, folders, text, phrase):
    refused(_with_config(tmp_path, folders / "diffusers", text), "config.json", phrase)
