"""Errors of the models package that the commands turn into one-paragraph messages."""


class CheckpointError(ValueError):
    """A checkpoint could not be read, recognised or loaded; the message says why and what to do."""
