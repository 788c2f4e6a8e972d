"""Errors that end a command with a one-line message (see ``oapl.cli``)."""


class EngineError(RuntimeError):
    """The engine process died, failed or hung; the message says which."""
