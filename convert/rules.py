"""Declarative key mapping between PyTorch state dicts and Flax parameter trees.

A format is a list of `Rule(source_key, flax_path, layout)`. The same list converts in both
directions: `to_flax` (loading, strict) and `from_flax` (export).
"""
import dataclasses
import operator
import re

import numpy as np

from .checkpoint import CheckpointError, clip

# layout name -> (PyTorch -> Flax, Flax -> PyTorch)
LAYOUTS = {
    "copy": (lambda a: a, lambda a: a),
    "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),  # OIHW <-> HWIO
    "linear": (lambda a: a.T, lambda a: a.T),  # (out, in) <-> (in, out)
    # a 1x1 conv (out, in, 1, 1) <-> Dense (in, out); also reads a Linear (out, in)
    "conv1x1_dense": (lambda a: a.reshape(a.shape[0], -1).T, lambda a: a.T[:, :, None, None]),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str  # PyTorch state-dict key
    target: str  # Flax parameter path, "/"-separated
    layout: str = "copy"


def flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten(flat):
    tree = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _preview(keys, n=8):
    keys = sorted(keys)
    shown = [k if k.isprintable() and len(k) <= 80 else clip(k) for k in keys[:n]]  # a file's names, one line
    return ", ".join(shown) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def to_flax(tensors: dict, rules: list[Rule], expected_shapes: dict, where: str = "checkpoint"):
    """Strict conversion: every source key consumed, every Flax parameter filled, shapes checked.

    expected_shapes: flat {flax_path: shape}. Returns the nested Flax tree (numpy, source dtype).
    """
    by_source = {r.source: r for r in rules}
    unknown = set(tensors) - set(by_source)
    missing = {r.source for r in rules} - set(tensors)
    unfilled = set(expected_shapes) - {r.target for r in rules}
    problems = []
    if unknown:
        problems.append(f"unexpected keys: {_preview(unknown)}")
    if missing:
        problems.append(f"missing keys: {_preview(missing)}")
    if unfilled:
        problems.append(f"parameters with no source: {_preview(unfilled)}")
    if problems:
        raise CheckpointError(f"{where}: does not match the model: " + "; ".join(problems))
    flat = {}
    for key, value in tensors.items():
        rule = by_source[key]
        value = np.asarray(value)
        converted = _flax_layout(rule.layout, value)
        want = tuple(expected_shapes[rule.target])
        if converted is None or converted.shape != want:
            needs = LAYOUTS[rule.layout][1](np.broadcast_to(np.int8(0), want)).shape  # zero-stride: no allocation
            raise CheckpointError(f"{where}: {key} has shape {value.shape} but {rule.target} needs {needs}")
        flat[rule.target] = converted
    return unflatten(flat)


def _flax_layout(layout, value):
    """`value` in the Flax layout, or None where the layout cannot take its rank (a shape mismatch)."""
    try:
        return LAYOUTS[layout][0](value)
    except (ValueError, IndexError):
        return None


def from_flax(params, rules: list[Rule]) -> dict[str, np.ndarray]:
    """Export: Flax tree -> PyTorch state dict, every parameter accounted for."""
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    unmapped = set(flat) - {r.target for r in rules}
    if unmapped:
        raise CheckpointError(f"export: parameters with no rule: {_preview(unmapped)}")
    return {r.source: np.ascontiguousarray(LAYOUTS[r.layout][1](flat[r.target])) for r in rules}


def matching_presets(presets: dict, config, hint: str = "", same=operator.eq) -> list[str]:
    """The names of `presets` whose config is `same` as `config`, in preset order; if `hint` (a file, folder or
    hub name) names some of them as a whole word, only those."""
    matches = [n for n, p in presets.items() if same(p, config)]
    hinted = [n for n in matches if re.search(rf"(^|[^a-z0-9]){re.escape(n)}($|[^a-z0-9])", hint.lower())]
    return hinted or matches
