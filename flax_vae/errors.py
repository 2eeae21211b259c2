"""The library's own exception, at the bottom of the layering so that every layer can raise it."""


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be read, is refused, or does not fit the model. The message is one line
    naming the file and the problem (keys, field, shapes)."""
