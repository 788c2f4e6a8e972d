"""Prompts: a task's records formatted and tokenized (``load_prompts``), the resumable
order in which a run draws them (``PromptSampler``) and the engine seed they are sampled with
(``sampling_seed``)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .config import DataConfig
from .tasks import read_records


def sampling_seed(seed: int, samples_before: int) -> int:
    """The engine seed of a call whose first completion is the run's ``samples_before``-th."""
    return seed * 1_000_000_007 + samples_before


@dataclass
class Prompt:
    """One prompt: ``token_ids`` as fed to the engine, ``record`` for the reward function."""

    index: int
    token_ids: list[int]
    record: dict


def tokenize_prompt(record: dict, cfg: DataConfig, tokenizer) -> list[int]:
    """Token ids of ``cfg.prompt_template`` filled with the record, through the chat template
    when ``cfg.chat_template`` (as one user turn after the optional system prompt: the
    record's ``system_prompt``, else ``cfg.system_prompt``)."""
    text = cfg.prompt_template.format(**record)
    if not cfg.chat_template:
        return tokenizer(text)["input_ids"]
    system = record.get("system_prompt", cfg.system_prompt)
    messages = [{"role": "system", "content": system}] if system else []
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
