"""Config fields checked against their annotations, so a bad config.json fails on load, naming the field."""
import dataclasses
import math
import types
import typing

MAX_INT = 2**16  # no count or width in any released autoencoder comes near this; beyond it, allocation fails


def check_fields(config):
    """Raise ValueError naming the first field of the dataclass `config` whose value does not fit its annotation
    (bool, int in [0, MAX_INT], finite float, str, tuples and optional values of those), or whose
    latent_channels is below 1 or scaling_factor is 0."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        _check(field.name, getattr(config, field.name), hints[field.name])
    if config.latent_channels < 1:
        raise ValueError(f"latent_channels: must be at least 1, got {config.latent_channels}")
    if getattr(config, "scaling_factor", 1.0) == 0:
        raise ValueError("scaling_factor: must not be 0 (latents are divided by it)")


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
