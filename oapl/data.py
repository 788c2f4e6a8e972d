"""Prompt sources and the built-in toy tasks.

A source yields records (dicts with at least ``prompt`` and ``answer``); ``load_prompts``
formats and tokenizes them into ``Prompt``s, and ``PromptSampler`` walks them in reshuffled
epochs with a resumable position.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from .config import DataConfig


@dataclass(frozen=True)
class ToyTask:
    """A task that needs no files: its records and a checker of completions."""

    name: str
    records: list[dict]  # each with "prompt", "answer", "task"
    answers: list[str]  # every answer token, one token each in the tiny vocabulary
    vocab: tuple[str, ...] | None = None  # the tiny model's tokens; None: oapl.tiny.VOCAB
    answer_len: int = 1  # answer tokens per answer (the format warm-up's length)

    def score(self, record: dict, completion: str) -> float:
        """1.0 iff the completion, stripped, is exactly the answer."""
        return float(completion.strip() == record["answer"])


def _max_task() -> ToyTask:
    """``max a b =`` -> ``max(a, b)`` over digit pairs (100 prompts; chance 0.1 when uniform).
    Learnable at toy scale (it needs comparing two positions); (a + b) mod 10 is not."""
    records = [
        {"prompt": f"max {a} {b} =", "answer": str(max(a, b)), "task": "max"}
        for a in range(10)
        for b in range(10)
    ]
    return ToyTask("max", records, [str(d) for d in range(10)])


def _bits_task(name: str):
    def build() -> ToyTask:
        from .tasks.bits import bits_task  # 6-token answers (issue 18)

        return bits_task(name)

    return build


TOY_TASKS = {"max": _max_task, "cmp": _bits_task("cmp"), "thr": _bits_task("thr")}


def toy_task(name: str) -> ToyTask:
    if name not in TOY_TASKS:
        raise ValueError(f"unknown toy task {name!r}; available: {sorted(TOY_TASKS)}")
    return TOY_TASKS[name]()


@dataclass
class Prompt:
    """One prompt: ``token_ids`` as fed to the engine, ``record`` for the reward function."""

    index: int
    token_ids: list[int]
    record: dict


def read_records(cfg: DataConfig) -> list[dict]:
    """Raw records from ``cfg.source``, each with ``prompt`` and ``answer`` keys (renamed from
    ``cfg.prompt_key`` / ``cfg.answer_key``); other fields are kept."""
    src = cfg.source
    if src.startswith("toy:"):
        rows = toy_task(src[4:]).records
        return rows[: cfg.limit] if cfg.limit is not None else rows
    if src == "word_problems":
        return word_problem_records(cfg)
    if src.startswith("datasets:"):
        try:
            import datasets
        except ImportError:
            raise ValueError(f"data.source {src!r} needs the `datasets` package") from None
        name = src[len("datasets:") :]
        if os.path.isdir(name):
            ds = datasets.load_from_disk(name)
            ds = ds[cfg.split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, split=cfg.split)
        rows = list(ds)
    elif src.endswith(".jsonl"):
        with open(src) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif src.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(src).to_pylist()
    else:
        raise ValueError(
            f"data.source {src!r}: expected toy:<task> (tasks: {sorted(TOY_TASKS)}), "
            "word_problems, a .jsonl or .parquet file, or datasets:<name or dir>"
        )
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    out = []
    for i, row in enumerate(rows):
        for key in (cfg.prompt_key, cfg.answer_key):
            if key not in row:
                raise ValueError(f"{src}: record {i} has no field {key!r} (fields: {list(row)})")
        rec = {k: v for k, v in row.items() if k not in (cfg.prompt_key, cfg.answer_key)}
        rec["prompt"] = str(row[cfg.prompt_key])
        rec["answer"] = str(row[cfg.answer_key])
        out.append(rec)
    return out


# Records of data.source=word_problems when data.limit is not set, per split.
WORD_PROBLEMS_SIZE = {"train": 2000, "eval": 500}


def word_problem_records(cfg: DataConfig) -> list[dict]:
    """``data.source: word_problems``: the arithmetic word problems of ``oapl.word_problems``
    (reasoning-gym, generated offline and deterministically), split ``cfg.split`` (``train``,
    or the held-out ``eval``, also called ``test``), the first ``cfg.limit`` records
    (default ``WORD_PROBLEMS_SIZE``). Score them with ``data.reward: word_problems``."""
    from .word_problems import make_split

    split = "eval" if cfg.split == "test" else cfg.split
    if split not in WORD_PROBLEMS_SIZE:
        raise ValueError(f"data.split for word_problems must be train or eval, not {cfg.split!r}")
    return make_split(split, cfg.limit if cfg.limit is not None else WORD_PROBLEMS_SIZE[split])


def tokenize_prompt(record: dict, cfg: DataConfig, tokenizer) -> list[int]:
    """Token ids of ``cfg.prompt_template`` filled with the record, through the chat template
    when ``cfg.chat_template`` (as one user turn after the optional system prompt)."""
    text = cfg.prompt_template.format(**record)
    if not cfg.chat_template:
        return tokenizer(text)["input_ids"]
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    messages.append({"role": "user", "content": text})
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(chat, add_special_tokens=False)["input_ids"]


def load_prompts(cfg: DataConfig, tokenizer) -> list[Prompt]:
    """All prompts of the source, tokenized; those over ``cfg.max_prompt_tokens`` dropped."""
    prompts = []
    for rec in read_records(cfg):
        ids = tokenize_prompt(rec, cfg, tokenizer)
        if len(ids) <= cfg.max_prompt_tokens:
            prompts.append(Prompt(len(prompts), ids, rec))
    if len(prompts) < 1:
        raise ValueError(
            f"data.source {cfg.source!r} gave no prompts of <= {cfg.max_prompt_tokens} tokens"
        )
    return prompts


class PromptSampler:
    """Batches of prompt indices without replacement, reshuffled each epoch (seeded by
    ``seed`` and the epoch number); a batch may straddle two epochs. The position
    (``state_dict``) makes a resumed run see the same batches as an uninterrupted one."""

    def __init__(self, num_prompts: int, batch_size: int, seed: int):
        if num_prompts < 1 or batch_size < 1:
            raise ValueError(f"need num_prompts, batch_size >= 1, got {num_prompts}, {batch_size}")
        self.num_prompts, self.batch_size, self.seed = num_prompts, batch_size, seed
        self.epoch, self.cursor = 0, 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.num_prompts))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            take = min(self.batch_size - len(out), self.num_prompts - self.cursor)
            out += self._order(self.epoch)[self.cursor : self.cursor + take]
            self.cursor += take
            if self.cursor == self.num_prompts:
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
