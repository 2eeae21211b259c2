"""Config fields checked against their annotations, so a bad config.json fails on load, naming the field."""
import dataclasses
import math
import types
import typing

MAX_INT = 2**16  # no count or width in any released autoencoder comes near this; beyond it, allocation fails
# Reading any checkpoint traces the model layer by layer, so a config.json asking for thousands of stages or layers
# would hang the loader. Released autoencoders have at most 8 stages and 10 layers per stage.
MAX_STAGES = 10  # entries of each of these
STAGE_FIELDS = ("block_out_channels", "decoder_block_out_channels", "encoder_widths", "decoder_widths")
MAX_LAYERS = 16  # each of these, or each of their entries
LAYER_FIELDS = ("depth", "layers_per_block", "encoder_depths", "decoder_depths")
POSITIVE_FIELDS = ("latent_channels", "norm_num_groups", "head_dim")  # counts that are divided by


def check_fields(config):
    """Raise ValueError naming the first field of the dataclass `config` whose value does not fit its annotation
    (bool, int in [0, MAX_INT], finite float, str, tuples and optional values of those), that is 0 where it is
    divided by (POSITIVE_FIELDS, scaling_factor), or that asks for more than MAX_STAGES stages or MAX_LAYERS layers
    per stage."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        _check(field.name, getattr(config, field.name), hints[field.name])
    for name in POSITIVE_FIELDS:
        if getattr(config, name, 1) < 1:
            raise ValueError(f"{name}: must be at least 1, got {getattr(config, name)}")
    if getattr(config, "scaling_factor", 1.0) == 0:
        raise ValueError("scaling_factor: must not be 0 (latents are divided by it)")
    for name in STAGE_FIELDS:
        if len(getattr(config, name, None) or ()) > MAX_STAGES:
            raise ValueError(f"{name}: at most {MAX_STAGES} stages, got {len(getattr(config, name))}")
    for name in LAYER_FIELDS:
        value = getattr(config, name, 0)
        if max(value if isinstance(value, (tuple, list)) else [value], default=0) > MAX_LAYERS:
            raise ValueError(f"{name}: at most {MAX_LAYERS} layers per stage, got {value}")


def _check(name, value, hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        _check(name, value, next(a for a in args if a is not type(None)))
    elif origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise ValueError(f"{name}: expected {len(args)} values, got {len(value)}")
        for i, v in enumerate(value):
            _check(f"{name}[{i}]", v, args[0] if args[-1] is Ellipsis else args[i])
    elif hint is bool and not isinstance(value, bool):
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    elif hint is int and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT):
        raise ValueError(f"{name}: expected a whole number from 0 to {MAX_INT}, got {value!r}")
    elif hint is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    elif hint is str and not isinstance(value, str):
        raise ValueError(f"{name}: expected a string, got {value!r}")
