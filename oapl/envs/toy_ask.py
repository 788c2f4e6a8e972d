"""The ``ask`` environment of ``toy:ask`` (``oapl.tasks.ask``): it answers "ask" with the
record's hidden digit and scores the first answer that is not "ask"."""

from __future__ import annotations

from ..tasks.ask import ASK, reply
from .base import Message, Step


class AskEnv:
    """Reward 1 iff the model's answer (a turn other than "ask") is the record's ``answer``;
    every "ask" gets the hidden digit (the reward stays 0 until an answer)."""

    def reset(self, record: dict) -> list[Message]:
        self.record = record
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, messages: list[Message]) -> Step:
        said = messages[-1]["content"].strip()
        if said == ASK:
            return Step(reply(self.record["hidden"]), 0.0, False)
        return Step(None, float(said == self.record["answer"]), True)
