"""Student networks: TAESD layouts sized to a teacher's latent space, and their initial weights.

A student is a `flax_vae.TAESDConfig`. `--student` names a preset or a JSON file of TAESDConfig fields;
latent channels and factor default to the teacher's latent space and must match it.
"""
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from flax_vae.family import init_params
from flax_vae.taesd import TAESDConfig

PRESETS = {  # the fields a preset fixes; the rest come from the teacher's latent space
    "taesd": dict(width=64, depth=3),  # the standard layout, at the teacher's factor
    "taesd-half": dict(width=32, depth=3),  # half the channels: about 1/4 of the compute
    "taesd-f32": dict(width=64, depth=3, factor=32),  # the 32x layout (taesana)
}


def student_config(spec: str, latent_channels: int, factor: int, teacher_config=None) -> TAESDConfig:
    """A preset name or a JSON config file -> TAESDConfig for a latent space of (latent_channels, factor).

    Presets keep a TAESD teacher's mid-block GroupNorm setting, so that the student can start from its weights."""
    if spec in PRESETS:
        fields = dict(PRESETS[spec], midblock_gn=getattr(teacher_config, "midblock_gn", False))
    elif Path(spec).is_file():
        try:
            fields = json.loads(Path(spec).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--student {spec}: not a readable JSON config: {e}") from None
        if not isinstance(fields, dict):
            raise ValueError(f"--student {spec}: expected a JSON object of TAESDConfig fields")
    else:
        raise ValueError(f"--student {spec!r}: neither a preset ({', '.join(PRESETS)}) nor a config file")
    known = {f.name for f in dataclasses.fields(TAESDConfig)} - {"scaling_factor", "shift_factor"}
    if set(fields) - known:
        raise ValueError(f"--student {spec}: unknown fields {sorted(set(fields) - known)}; "
                         f"TAESDConfig has {sorted(known)}")
    for name, teacher_value in (("latent_channels", latent_channels), ("factor", factor)):
        if fields.setdefault(name, teacher_value) != teacher_value:
            raise ValueError(f"--student {spec}: {name} {fields[name]} does not match the teacher's latent "
                             f"space ({latent_channels} channels, factor {factor})")
    return TAESDConfig(**fields)  # raises ValueError for a width or factor TAESD cannot take


def can_start_from(student: TAESDConfig, teacher_config) -> bool:
    """Whether the student can take a channel subset of the teacher's weights: same layout, no wider."""
    same = ("latent_channels", "factor", "depth", "midblock_gn")
    return (getattr(teacher_config, "family", None) == "taesd" and student.width <= teacher_config.width
            and all(getattr(student, f) == getattr(teacher_config, f) for f in same))


def initial_params(student: TAESDConfig, parts, rng, teacher_config=None, teacher_params=None):
    """Random weights, or (given a teacher of the same layout) the teacher's weights pruned to the student's width."""
    if teacher_params is None:
        params = jax.jit(init_params, static_argnums=0)(student, rng)  # one compilation, not one per operation
        return {part: params[part] for part in parts}
    shapes = jax.eval_shape(lambda: init_params(student, rng))
    return {part: prune(teacher_params[part], shapes[part], part, student, teacher_config) for part in parts}


# ---- structured pruning: keep the channels whose weights are largest

def _channel_groups(part: str, path: tuple[str, ...], config: TAESDConfig):
    """(input group, output group) of a parameter: channels that a residual stream or a layer's output share.

    None means the channels are fixed (image, latents). Biases and norms only have the output group."""
    module, leaf = path[0], path[-1]
    stages = len(config.decoder_widths) - 1 if part == "decoder" else 3
    last = f"stream_{stages}"
    if part == "decoder":
        simple = {"conv_in": (None, "stream_0"), "conv_out": (last, None), "block_out": last,
                  **{f"up_{s}": (f"stream_{s}", f"stream_{s + 1}") for s in range(stages)}}
    else:
        stem = ({"conv_in_0": (None, "stem"), "conv_in_1": ("stem", "stream_0")} if config.factor == 32
                else {"conv_in": (None, "stream_0")})
        simple = {**stem, "conv_out": (last, None), "block_in": "stream_0",
                  **{f"down_{s}": (f"stream_{s}", f"stream_{s + 1}") for s in range(stages)}}
    shift = 0 if part == "decoder" else 1  # encoder stage s runs after down_s
    stream = simple.get(module) or f"stream_{int(module.split('_')[1]) + shift}"
    if isinstance(stream, tuple):
        groups = stream
    else:  # a residual Block: its own hidden channels, the stream around it
        layer = path[1]
        groups = {"conv_0": (stream, f"{module}/conv_0"), "conv_1": (f"{module}/conv_0", f"{module}/conv_1"),
                  "conv_2": (f"{module}/conv_1", stream), "pool_in": (stream, f"{module}/pool"),
                  "pool_norm": (None, f"{module}/pool"), "pool_out": (f"{module}/pool", stream)}[layer]
    return groups if leaf == "kernel" else (None, groups[1])


def prune(teacher, student, part: str, config: TAESDConfig, teacher_config: TAESDConfig):
    """The teacher's parameters cut to the student's shapes, keeping per channel group the channels with the
    largest summed squared weights (reading and writing). GroupNorm groups keep an equal share each."""
    paths = {path: np.asarray(leaf, np.float32) for path, leaf in _flat(teacher)}
    scores = {}
    for path, w in paths.items():
        group_in, group_out = _channel_groups(part, path, config)
        for group, axis in ((group_in, -2), (group_out, -1)):
            if group is not None:
                sq = np.sum(w.reshape(-1, *w.shape[-2:]) ** 2, axis=(0, 2) if axis == -2 else (0, 1)) \
                    if w.ndim == 4 else w ** 2
                scores[group] = scores.get(group, 0) + sq
    sizes = {}
    for path, leaf in _flat(student):
        group_in, group_out = _channel_groups(part, path, config)
        for group, axis in ((group_in, -2), (group_out, -1)):
            if group is not None:
                sizes[group] = leaf.shape[axis]
    keep = {}
    for group, n in sizes.items():
        if group.endswith("/pool"):  # pick within each of the 4 GroupNorm groups, so groups stay groups
            per = len(scores[group]) // 4
            keep[group] = np.concatenate([g * per + _top(scores[group][g * per:(g + 1) * per], n // 4)
                                          for g in range(4)])
        else:
            keep[group] = _top(scores[group], n)

    def cut(path, leaf):
        w = paths[path]
        group_in, group_out = _channel_groups(part, path, config)
        if group_out is not None:
            w = np.take(w, keep[group_out], axis=-1)
        if group_in is not None:
            w = np.take(w, keep[group_in], axis=-2)
        assert w.shape == leaf.shape, (path, w.shape, leaf.shape)
        return w

    return jax.tree_util.tree_map_with_path(lambda p, leaf: cut(tuple(k.key for k in p), leaf), student)


def _top(scores, n):
    return np.sort(np.argsort(-scores, kind="stable")[:n])


def _flat(tree):
    return [(tuple(k.key for k in p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
