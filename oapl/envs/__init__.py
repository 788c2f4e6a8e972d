"""Multi-turn environments: what answers the model between its turns and scores the rollout.

The protocol (one environment object per rollout, built with ``env.kwargs``)::

    class MyEnv:
        def reset(self, record: dict) -> list[dict]:
            # the conversation so far as chat messages ({"role", "content"}); the model's
            # first turn answers the task's prompt (its ids come from the task, as single-turn)
        def step(self, messages: list[dict]) -> Step:
            # messages: reset's, then each model turn ({"role": "assistant", "content": text})
            # and each earlier reply; return the reply (a message, or text as a user turn),
            # the rollout's reward as of now, and whether it is over

``Step.reward`` is the rollout's score if it ended here: the driver keeps the last one when a
turn or token limit cuts the rollout (it is then ``truncated``, scored as the environment
said). ``env.name`` picks one: a name in ``ENVS`` or a user's class, ``path/to/file.py:Class``
or ``package.module:Class``. The driver (``oapl.rollout.multiturn``) runs ``step`` in a thread
pool with a timeout; an environment that raises, returns something else, never answers or
floods output fails (or truncates) only its own rollout.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable

from .base import Environment, Message, Step

__all__ = ["ENVS", "Environment", "Message", "Step", "env_class"]


def _ask() -> type:
    from .toy_ask import AskEnv

    return AskEnv


def _python() -> type:
    from .python_tool import PythonToolEnv

    return PythonToolEnv


def _verifiers() -> type:
    from .verifiers_env import VerifiersEnv

    return VerifiersEnv


ENVS: dict[str, Callable[[], type]] = {"ask": _ask, "python": _python,
                                       "verifiers": _verifiers}


def env_class(name: str) -> type:
    """The environment class ``name`` names: a key of ``ENVS``, ``file.py:Class`` or
    ``module:Class``."""
    if name in ENVS:
        return ENVS[name]()
    where, sep, attr = name.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError(f"env.name {name!r}: expected one of {sorted(ENVS)}, "
                         "path/to/file.py:Class or package.module:Class")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ValueError(f"env.name {name!r}: no file {where!r}")
        spec = importlib.util.spec_from_file_location(
            f"oapl_user_env_{abs(hash(os.path.abspath(where)))}", where)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    cls = getattr(module, attr, None)
    if cls is None or not callable(getattr(cls, "reset", None)) or not callable(
            getattr(cls, "step", None)):
        raise ValueError(f"env.name {name!r}: {attr!r} in {where!r} is not an environment "
                         "class with reset(record) and step(messages)")
    return cls
