"""Math scorers, by math-verify.

``math_answer``: math-verify's own extraction of the completion's answer (needs the main thread:
its time limits use SIGALRM). ``final_answer``: the last ``\\boxed{...}`` (else the last
number) of the completion, checked against the gold answer; works in any thread.
"""

from __future__ import annotations

import logging
import re

# Longest answer string ``final_answer`` hands to sympy (see there).
MAX_ANSWER_CHARS = 64


def _not_timeout_notice(record: logging.LogRecord) -> bool:
    """Drops math-verify's warning that its time limits are off (``score`` turns them off on
    purpose, every call)."""
    return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_not_timeout_notice)


def math_answer(record: dict, completion: str) -> float:
    """1.0 iff math-verify finds the completion's final answer equal to ``record["answer"]``
    (e.g. ``\\frac{1}{2}`` and ``0.5``; ``\\boxed{...}`` is preferred when present)."""
    from math_verify import parse, verify

    gold = parse(str(record["answer"]))
    if not gold:
        raise ValueError(f"math-verify cannot parse the gold answer {record['answer']!r}")
    return float(verify(gold, parse(completion)))


def final_answer(record: dict, completion: str) -> float:
    """``score(completion, record["answer"])``."""
    return score(completion, str(record["answer"]))


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number not glued to a word or to a preceding number: 12, -4, 1,000, 0.5, 3/4.
_NUMBER = re.compile(r"(?<![\w.,/])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?![\w])")


def last_boxed(text: str) -> str | None:
    """The content (str) of the last ``\\boxed{...}`` in ``text`` with its braces balanced, or
    None when there is none (or the last one is never closed)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def extract_answer(text: str) -> str | None:
    """The model's final answer (str) in free-form ``text``: the last ``\\boxed{}``'s content,
    else the last number; None when there is neither."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def score(completion: str, gold: str) -> float:
    """1.0 if the final answer in ``completion`` (str) equals ``gold`` (str) by math-verify,
    else 0.0 (float). ``\\frac{1}{2}``, ``1/2`` and ``0.5`` are equal; ``1,000`` is 1000.

    math-verify's own time limits use SIGALRM, which only the main thread may set; they are
    turned off (``parsing_timeout=None``, ``timeout_seconds=None``) so that scoring works in
    any thread, and time is bounded instead by what is parsed: an answer of at most
    ``MAX_ANSWER_CHARS`` characters, without ``^`` or ``!`` (short strings whose value can take
    sympy forever, e.g. ``9^{9^{9^9}}``); such answers score 0. Raises ValueError when
    math-verify cannot parse ``gold``."""
    from math_verify import parse, verify

    gold_parsed = parse(gold, parsing_timeout=None)
    if not gold_parsed:
        raise ValueError(f"math-verify cannot parse the gold answer {gold!r}")
    pred = extract_answer(completion)
    if pred is None or len(pred) > MAX_ANSWER_CHARS or "^" in pred or "!" in pred:
        return 0.0
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
    return float(verify(gold_parsed, pred_parsed, timeout_seconds=None))
