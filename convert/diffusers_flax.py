"""diffusers' Flax AutoencoderKL (`FlaxAutoencoderKL`, diffusers <= 0.39) <-> flax-vae's KL parameters.

A diffusers Flax folder is `config.json` (`_class_name` "FlaxAutoencoderKL", or "AutoencoderKL" in folders converted
from PyTorch) + `diffusion_flax_model.msgpack` (flax.serialization's msgpack of the parameter dict, no "params" level;
read with `msgpack_restore`, never unpickled). Its tree, and ours:

    diffusers Flax                                       flax-vae (flax_vae/kl.py)
    encoder/conv_in                                      encoder/conv_in
    encoder/down_blocks_{i}/resnets_{j}/{norm1, conv1,   encoder/down_{i}_resnet_{j}/{...the same names}
        norm2, conv2, conv_shortcut}
    encoder/down_blocks_{i}/downsamplers_0/conv          encoder/down_{i}_downsample
    {encoder,decoder}/mid_block/resnets_{0,1}            {encoder,decoder}/mid/resnet_{0,1}
    .../mid_block/attentions_0/{group_norm, query,       .../mid/attention/{group_norm, to_q, to_k, to_v, to_out}
        key, value, proj_attn}
    encoder/conv_norm_out, decoder/conv_norm_out         encoder/norm_out, decoder/norm_out
    quant_conv, post_quant_conv (top level)              encoder/quant_conv, decoder/post_quant_conv
    decoder/up_blocks_{i}/resnets_{j}                    decoder/up_{i}_resnet_{j}
    decoder/up_blocks_{i}/upsamplers_0/conv              decoder/up_{i}_upsample

Both are Flax Linen trees of the same layers, so every leaf is a plain copy: conv kernels HWIO, the attention
projections nn.Dense (in, out) kernels, GroupNorm `scale`/`bias`. Up block i is the lowest resolution first in both
(as in diffusers' PyTorch model; only the LDM layout counts the other way).

The converters are pure restructurings of the tree (no host copies, no dtype change), strict both ways (every
key consumed, every parameter filled, shapes and leaf kinds checked against the config: all static, so they run
inside jax.jit at no cost).
"""
import functools
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import serialization

from . import kl
from .checkpoint import CheckpointError, describe_error, write_atomic, write_json
from .rules import LAYOUTS, Rule, _preview, flatten, unflatten

WEIGHTS_FILE = "diffusion_flax_model.msgpack"
CLASS = "FlaxAutoencoderKL"
PYTORCH_CLASS = "AutoencoderKL"  # the PyTorch class of the same model (its config.json fields are the same)
DIFFUSERS_VERSION = "0.39.0"  # written into exported config.json files: the last diffusers with Flax models
MAX_DEPTH = 16  # levels of the msgpack's tree; diffusers' is 5 deep (encoder/down_blocks_0/resnets_0/conv1/kernel)

# The fields of diffusers 0.39's FlaxAutoencoderKL: its constructor's and its config.json's
FIELDS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
          "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor")

# diffusers' module name -> ours, per kind of block
RESNET = ("norm1", "conv1", "norm2", "conv2", "conv_shortcut")
ATTENTION = {"group_norm": "group_norm", "query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out"}
LEAVES = {"kernel": "copy", "bias": "copy", "scale": "copy"}  # leaf -> layout (the same names on both sides)


def _modules(config):
    """(diffusers Flax module path, flax-vae module path) for every module that may hold parameters."""
    def resnet(theirs, ours):
        for sub in RESNET:
            yield f"{theirs}/{sub}", f"{ours}/{sub}"

    def mid(part):
        yield from resnet(f"{part}/mid_block/resnets_0", f"{part}/mid/resnet_0")
        for theirs, ours in ATTENTION.items():
            yield f"{part}/mid_block/attentions_0/{theirs}", f"{part}/mid/attention/{ours}"
        yield from resnet(f"{part}/mid_block/resnets_1", f"{part}/mid/resnet_1")

    yield "encoder/conv_in", "encoder/conv_in"
    for i in range(len(config.block_out_channels)):
        for j in range(config.layers_per_block):
            yield from resnet(f"encoder/down_blocks_{i}/resnets_{j}", f"encoder/down_{i}_resnet_{j}")
        yield f"encoder/down_blocks_{i}/downsamplers_0/conv", f"encoder/down_{i}_downsample"
    yield from mid("encoder")
    yield "encoder/conv_norm_out", "encoder/norm_out"
    yield "encoder/conv_out", "encoder/conv_out"
    yield "quant_conv", "encoder/quant_conv"

    yield "post_quant_conv", "decoder/post_quant_conv"
    yield "decoder/conv_in", "decoder/conv_in"
    yield from mid("decoder")
    for i in range(len(config.decoder_widths)):
        for j in range(config.layers_per_block + 1):
            yield from resnet(f"decoder/up_blocks_{i}/resnets_{j}", f"decoder/up_{i}_resnet_{j}")
        yield f"decoder/up_blocks_{i}/upsamplers_0/conv", f"decoder/up_{i}_upsample"
    yield "decoder/conv_norm_out", "decoder/norm_out"
    yield "decoder/conv_out", "decoder/conv_out"


@functools.lru_cache(maxsize=None)
def rules(config) -> tuple[Rule, ...]:
    """Rule(diffusers Flax path, flax-vae path, layout) for every parameter of `config`."""
    _check_config(config)
    shapes = kl.expected_shapes(config)
    return tuple(Rule(f"{theirs}/{leaf}", f"{ours}/{leaf}", layout)
            for theirs, ours in _modules(config) for leaf, layout in LEAVES.items() if f"{ours}/{leaf}" in shapes)


def _check_config(config):
    if getattr(config, "family", None) != "kl":
        raise CheckpointError(f"diffusers' {CLASS} holds AutoencoderKL models only, not "
                              f"{getattr(config, 'family', type(config).__name__)}")
    if config.latent_batch_norm:
        raise CheckpointError(f"FLUX.2's latent BatchNorm has no place in diffusers' {CLASS}")


@functools.lru_cache(maxsize=None)
def expected_shapes(config) -> dict:
    """{diffusers Flax path: shape} of `config`'s tree."""
    native = kl.expected_shapes(config)
    return {r.source: _shape(LAYOUTS[r.layout][1], native[r.target]) for r in rules(config)}


def _shape(layout, shape):  # a layout's output shape, from a zero-stride view (nothing allocated)
    return tuple(layout(np.broadcast_to(np.int8(0), shape)).shape)


def _describe(value) -> str:
    dtype = getattr(value, "dtype", None)
    if dtype is None or not hasattr(value, "shape"):
        return f"a {type(value).__name__}, not an array"
    return f"an array of {dtype}, not of floats"


def _move(tree, moves: dict, shapes: dict, where: str):
    """Strict restructuring: moves {source path: (target path, layout function)}; shapes {target path: shape}."""
    if not hasattr(tree, "items"):
        raise CheckpointError(f"{where}: expected a tree of parameters (a dict), got {type(tree).__name__}")
    flat = flatten(tree)
    unknown, missing = set(flat) - set(moves), set(moves) - set(flat)
    unfilled = set(shapes) - {target for target, _ in moves.values()}
    problems = [f"{what}: {_preview(keys)}" for what, keys in (
        ("unexpected keys", unknown), ("missing keys", missing), ("parameters with no source", unfilled)) if keys]
    if problems:
        raise CheckpointError(f"{where}: does not match the model: " + "; ".join(problems))
    out = {}
    for path, value in flat.items():
        if not (hasattr(value, "shape") and hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.floating)):
            raise CheckpointError(f"{where}: {path} is {_describe(value)}")
        target, layout = moves[path]
        value = layout(value)
        if tuple(value.shape) != shapes[target]:
            raise CheckpointError(f"{where}: {path} has shape {tuple(value.shape)} but "
                                  f"{target} needs {shapes[target]}")
        out[target] = value
    return unflatten(out)


def from_diffusers_flax(tree, config, where: str = "diffusers Flax params"):
    """diffusers' FlaxAutoencoderKL parameter tree (nested dicts, numpy or jax leaves) -> flax-vae KL params."""
    moves = {r.source: (r.target, LAYOUTS[r.layout][0]) for r in rules(config)}
    return _move(tree, moves, kl.expected_shapes(config), where)


def to_diffusers_flax(params, config, where: str = "flax-vae params"):
    """flax-vae KL params -> diffusers' FlaxAutoencoderKL parameter tree (what its `params` are)."""
    moves = {r.target: (r.source, LAYOUTS[r.layout][1]) for r in rules(config)}
    return _move(params, moves, expected_shapes(config), where)


# ---- folders

def read_msgpack(path):
    """The parameter tree of a diffusion_flax_model.msgpack (flax.serialization's msgpack), or a CheckpointError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable: {e.strerror or e}") from None
    try:  # a parser of untrusted bytes: msgpack, numpy and flax raise many kinds of errors on bad input
        tree = serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable Flax msgpack file (corrupt or truncated?): "
                              f"{describe_error(e)}") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: expected a tree of parameters (a dict), got {type(tree).__name__}")
    if _deeper_than(tree, MAX_DEPTH):
        raise CheckpointError(f"{path}: a tree nested deeper than {MAX_DEPTH} levels is no diffusers model")
    return tree


def _deeper_than(tree, levels) -> bool:
    """Whether `tree` nests dicts more than `levels` deep (looked at only that far: a hostile file may nest
    hundreds of levels, and each level is a recursion of the functions that walk the tree)."""
    return levels < 0 or any(_deeper_than(v, levels - 1) for v in tree.values() if isinstance(v, dict))


def load_folder(cfg: dict, weights: Path, where: str, hint: str = ""):
    """A diffusers Flax folder's config.json dict (`_class_name` already mapped to AutoencoderKL) and its msgpack
    -> (config, params as numpy in the stored dtype, variant name)."""
    if cfg.get("_class_name") != PYTORCH_CLASS:
        raise CheckpointError(f"{weights}: a Flax msgpack holds {CLASS} weights only, not "
                              f"{cfg.get('_class_name')!r}")
    config = kl.config_from_diffusers(cfg, where)
    return config, from_diffusers_flax(read_msgpack(weights), config, str(weights)), kl.variant_name(config, hint)


def diffusers_config(config, sample_size: int = 32) -> dict:
    """config.json of a FlaxAutoencoderKL: the fields diffusers 0.39 writes (`sample_size`: the image side its
    init_weights used; flax-vae does not need it), and our latent conventions where set (diffusers ignores fields
    it does not know)."""
    _check_config(config)
    cant = [what for what, bad in (
        ("no quant convs", not (config.use_quant_conv and config.use_post_quant_conv)),
        ("no mid-block attention", not config.mid_block_attention),
        ("separate decoder widths", config.decoder_block_out_channels not in (None, config.block_out_channels)),
    ) if bad]
    if cant:
        raise CheckpointError(f"diffusers' {CLASS} cannot express this model ({', '.join(cant)}): its quant convs "
                              "and mid-block attention are fixed; save it as 'diffusers' or 'flax' instead")
    fields = dict(kl.diffusers_config(config), sample_size=sample_size)
    cfg = {"_class_name": CLASS, "_diffusers_version": DIFFUSERS_VERSION, **{k: fields[k] for k in FIELDS}}
    if config.shift_factor:
        cfg["shift_factor"] = config.shift_factor
    if config.latents_mean is not None:
        cfg.update(latents_mean=list(config.latents_mean), latents_std=list(config.latents_std))
    return cfg


def export(config, params, out: Path):
    """Write a diffusers Flax folder (config.json + diffusion_flax_model.msgpack) into `out`."""
    cfg = diffusers_config(config)
    tree = to_diffusers_flax(params, config, "export")
    write_atomic(Path(out) / WEIGHTS_FILE, serialization.msgpack_serialize(tree))
    write_json(Path(out) / "config.json", cfg)


__all__ = ["from_diffusers_flax", "to_diffusers_flax", "rules", "expected_shapes", "read_msgpack", "load_folder",
           "export", "WEIGHTS_FILE", "CLASS", "FIELDS"]
