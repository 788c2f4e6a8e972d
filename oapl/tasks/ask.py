"""``toy:ask``, a toy task that needs two turns, for the tiny model and the ``ask``
environment (``oapl.envs.toy_ask``)::

    max a =                      the model: "ask" (then EOS), or an answer digit (then EOS)
    val h =                      the environment's reply to "ask": the hidden digit h
    d                            the model's answer; reward 1 iff d = max(a, h)

``h`` is in the record but never in the prompt: answering right on every prompt needs the
second turn (answering at once is right with probability (a + 1) / 10 at best, 0.55 on
average). 100 records (every a, h). The tiny model's format warm-up (``warmup_examples``)
teaches the two shapes at chance: half "ask", then a random digit after the reply; half a
random digit at once.
"""

from __future__ import annotations

from ..tiny import SPECIAL_TOKENS

VOCAB = (*SPECIAL_TOKENS, *(str(d) for d in range(10)), "max", "=", "ask", "val")
ASK = "ask"


def reply(hidden: int) -> str:
    """The environment's answer to "ask"."""
    return f"val {hidden} ="


def records() -> list[dict]:
    return [{"prompt": f"max {a} =", "hidden": h, "answer": str(max(a, h)), "task": "ask"}
            for a in range(10) for h in range(10)]


def warmup_examples(tokenizer) -> list[tuple[list[int], list[bool]]]:
    """(ids, loss mask) pairs for the format warm-up: each prompt with each random answer
    digit at once, and with "ask", each reply and each random digit after it (the two shapes
    in equal numbers); the loss covers the model's tokens only."""
    eos = tokenizer.eos_token_id

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out = []
    for a in range(10):
        prompt = tokenizer(f"max {a} =")["input_ids"]
        for d in range(10):
            direct = prompt + ids(str(d)) + [eos]
            for _ in range(10):
                out.append((direct, [False] * len(prompt) + [True, True]))
            for h in range(10):
                env = ids(reply(h))
                seq = prompt + ids(ASK) + [eos] + env + ids(str(d)) + [eos]
                mask = [False] * len(prompt) + [True, True] + [False] * len(env) + [True, True]
                out.append((seq, mask))
    return out
