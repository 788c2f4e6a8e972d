"""An easy arithmetic word-problem task, generated offline by ``reasoning-gym``.

``make_split("train" | "eval", size)`` gives records ``{"prompt", "answer", "task", "index"}``:
``prompt`` is the raw user message (the caller wraps it in its tokenizer's chat template),
``answer`` the gold answer (an integer, as a string). Both splits are deterministic. The held-out
split is the first ``size`` items of a fixed pool of ``EVAL_POOL`` distinct questions drawn
with ``EVAL_SEED``; the train split is drawn with ``TRAIN_SEED`` and skips every question of that
pool, so the splits never overlap whatever their sizes. (reasoning-gym seeds item ``i`` of a
dataset with ``seed + i``: seeds a few apart give shifted copies of the same items, hence seeds
far apart, and the overlap check by question text on top.)

Scored by ``data.reward: final_answer`` (``oapl.rewards.math.final_answer``): the last
``\\boxed{...}`` (else the last number) of the completion against the gold answer, by math-verify.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import DataConfig

BOXED_INSTRUCTION = "Put your final answer in \\boxed{}."


@dataclass(frozen=True)
class TaskSpec:
    """Which reasoning-gym generator, and how hard.

    ``dataset`` (str): a reasoning-gym dataset name; ``options`` (dict): its config keywords
    (difficulty); ``instruction`` (str): appended to each question ('' for none)."""

    dataset: str
    options: dict = field(default_factory=dict)
    instruction: str = BOXED_INSTRUCTION


# The default task: SmolLM2-135M-Instruct gets it right sometimes, not often (see the README).
DEFAULT_TASK = TaskSpec(
    dataset="basic_arithmetic",
    options=dict(
        min_terms=2,
        max_terms=2,
        min_digits=1,
        max_digits=2,
        operators=("+", "-"),
        allow_parentheses=False,
        allow_negation=False,
        format_style="natural",
    ),
)
TRAIN_SEED = 0
EVAL_SEED = 1_000_000_000
EVAL_POOL = 500


def _questions(spec: TaskSpec, seed: int, size: int) -> list[dict]:
    """``size`` items of ``spec``'s generator drawn with ``seed``, as reasoning-gym gives them."""
    import reasoning_gym

    return list(reasoning_gym.create_dataset(spec.dataset, size=size, seed=seed, **spec.options))


def _record(spec: TaskSpec, item: dict, index: int) -> dict:
    prompt = item["question"].strip()
    if spec.instruction:
        prompt = f"{prompt} {spec.instruction}"
    return {"prompt": prompt, "answer": str(item["answer"]), "task": spec.dataset, "index": index}


def _held_out_pool(spec: TaskSpec) -> list[dict]:
    """The ``EVAL_POOL`` distinct held-out items (list of dict) of ``spec``, in draw order."""
    pool, seen = [], set()
    for item in _questions(spec, EVAL_SEED, 4 * EVAL_POOL):
        if item["question"] not in seen:
            seen.add(item["question"])
            pool.append(item)
            if len(pool) == EVAL_POOL:
                return pool
    raise ValueError(
        f"{spec.dataset} with {spec.options} is too small: {len(pool)} distinct questions in "
        f"{4 * EVAL_POOL} draws, fewer than the {EVAL_POOL} of the held-out pool"
    )


def make_split(split: str, size: int, spec: TaskSpec = DEFAULT_TASK) -> list[dict]:
    """The first ``size`` (int) records (list of dict) of the ``split`` (str: "train" or
    "eval") of the task ``spec`` (TaskSpec). Held-out questions are distinct from each other and
    from every train question; train questions may repeat. Raises ValueError for an unknown
    split, a held-out size over ``EVAL_POOL``, or a task too small for both splits."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    if split == "eval" and size > EVAL_POOL:
        raise ValueError(f"the held-out split has at most {EVAL_POOL} items, not {size}")
    pool = _held_out_pool(spec)
    if split == "eval":
        return [_record(spec, item, i) for i, item in enumerate(pool[:size])]
    held_out = {item["question"] for item in pool}
    # Draw enough to replace the held-out questions that turn up; give up if the task is tiny.
    drawn = _questions(spec, TRAIN_SEED, 4 * size + 100)
    train = [item for item in drawn if item["question"] not in held_out][:size]
    if len(train) < size:
        raise ValueError(
            f"{spec.dataset} with {spec.options} gave only {len(train)} train questions outside "
            f"the held-out pool in {len(drawn)} draws; ask for fewer or make the task larger"
        )
    return [_record(spec, item, i) for i, item in enumerate(train)]


# Records of data.source=word_problems when data.limit is not set, per split.
SIZE = {"train": 2000, "eval": 500}


def load(cfg: DataConfig) -> list[dict]:
    """``data.source: word_problems``: split ``cfg.split`` (``train``, or the held-out
    ``eval``, also called ``test``), the first ``cfg.limit`` records (default ``SIZE``)."""
    split = "eval" if cfg.split == "test" else cfg.split
    if split not in SIZE:
        raise ValueError(f"data.split for word_problems must be train or eval, not {cfg.split!r}")
    return make_split(split, cfg.limit if cfg.limit is not None else SIZE[split])
