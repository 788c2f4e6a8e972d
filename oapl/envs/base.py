"""The environment protocol's types (``oapl.envs`` re-exports them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

Message = dict  # {"role": "user" | "assistant" | "tool" | "system", "content": str}


@dataclass
class Step:
    """An environment's answer to a model turn: ``reply`` (a message, or text sent as a user
    turn; None when ``done``), ``reward`` (the rollout's score as of this step, finite) and
    ``done``."""

    reply: Message | str | None
    reward: float
    done: bool


class Environment(Protocol):
    def reset(self, record: dict) -> list[Message]:
        """The conversation before the model's first turn, for this task record."""

    def step(self, messages: list[Message]) -> Step:
        """The reply to the conversation ``messages`` (ending with the model's turn)."""
