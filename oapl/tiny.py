"""A tiny Llama-architecture model and a digit tokenizer, built deterministically in code.

The CPU demo and the tests use it instead of a download: a random-init 330k-parameter Llama
(hidden 128, 2 layers, 2 heads of dim 64 - the vLLM CPU attention backend needs head_dim 64 -,
MLP 256, untied lm_head) over a 16-token word-level vocabulary (digits and a few symbols):
``VOCAB`` for the demo's ``toy:max``, or the one a toy task names (``ToyTask.vocab``).
``build_tiny_model`` writes a Hugging Face directory (config, safetensors, tokenizer) that both
transformers and vLLM load. An optional short supervised warm-up teaches the answer *format*
only (``answer_len`` random answer tokens, then EOS), so that the task itself is left to RL.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
VOCAB = SPECIAL_TOKENS + [str(d) for d in range(10)] + ["max", "="]
_MARKER = "oapl_tiny.json"


def build_tokenizer(vocab_list: Sequence[str] = VOCAB) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``vocab_list`` (default ``VOCAB``, the ``toy:max`` demo's;
    another task may name its own, which must start with ``SPECIAL_TOKENS``): whitespace-split
    words, ``<bos>`` prepended."""
    _check_vocab(vocab_list)
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def _check_vocab(vocab_list: Sequence[str]) -> None:
    if list(vocab_list[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS or len(set(vocab_list)) != len(
        vocab_list
    ):
        raise ValueError(f"a tiny vocabulary must start with {SPECIAL_TOKENS} and have no "
                         f"duplicates, got {list(vocab_list)}")


def build_model(seed: int, vocab_list: Sequence[str] = VOCAB) -> LlamaForCausalLM:
    """Random-init tiny Llama (fp32) over ``vocab_list``, identical for identical arguments."""
    _check_vocab(vocab_list)
    cfg = LlamaConfig(
        vocab_size=len(vocab_list),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=SPECIAL_TOKENS.index("<bos>"),
        eos_token_id=SPECIAL_TOKENS.index("<eos>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.float()


def format_warmup(
    model: LlamaForCausalLM,
    prompts: Sequence[Sequence[int]],
    answer_token_ids: Sequence[int],
    eos_token_id: int,
    *,
    steps: int,
    seed: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    answer_len: int = 1,
) -> None:
    """Supervised warm-up on the answer format only, in place.

    Each example is a prompt (token ids, all of one length) followed by ``answer_len``
    answer tokens drawn *uniformly and independently at random* (unrelated to the prompt) and
    EOS; the loss covers the completion tokens. The model learns to emit ``answer_len``
    answer tokens then stop, at chance accuracy.
    """
    if steps <= 0:
        return
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
        raise ValueError(f"format_warmup needs prompts of one length, got {sorted(lengths)}")
    gen = torch.Generator().manual_seed(seed)
    prompt_t = torch.tensor(prompts, dtype=torch.long)  # [N, P]
    answers = torch.tensor(answer_token_ids, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(prompt_t), (batch_size,), generator=gen)
        if answer_len == 1:  # toy:max's draws, unchanged
            ans = answers[torch.randint(len(answers), (batch_size,), generator=gen)][:, None]
        else:
            ans = answers[torch.randint(len(answers), (batch_size, answer_len), generator=gen)]
        eos = torch.full((batch_size,), eos_token_id, dtype=torch.long)
        ids = torch.cat([prompt_t[rows], ans, eos[:, None]], dim=1)  # [B, P + answer_len + 1]
        labels = ids.clone()
        labels[:, : prompt_t.shape[1]] = -100
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def sequence_warmup(
    model: LlamaForCausalLM,
    examples: Sequence[tuple[Sequence[int], Sequence[bool]]],
    pad_token_id: int,
    *,
    steps: int,
    seed: int,
    lr: float = 1e-3,
    batch_size: int = 128,
) -> None:
    """Supervised warm-up on whole sequences, in place: ``examples`` are (token ids, loss
    mask) pairs of any lengths (right-padded per batch), drawn uniformly; the loss covers the
    masked tokens (a multi-turn task's model turns, not its environment's)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(len(ids) for ids, _ in examples)
    ids_t = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels_t = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (ids, mask) in enumerate(examples):
        if len(mask) != len(ids):
            raise ValueError(f"warm-up example {i}: {len(mask)} mask entries for {len(ids)} ids")
        ids_t[i, : len(ids)] = torch.tensor(list(ids))
        keep = torch.tensor(list(mask), dtype=torch.bool)
        labels_t[i, : len(ids)] = torch.where(keep, ids_t[i, : len(ids)], -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(examples), (batch_size,), generator=gen)
        loss = model(input_ids=ids_t[rows], attention_mask=(ids_t[rows] != pad_token_id).long(),
                     labels=labels_t[rows]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def build_tiny_model(
    out_dir: str,
    *,
    seed: int,
    warmup_prompts: Sequence[Sequence[int]] = (),
    warmup_answers: Sequence[str] = (),
    warmup_steps: int = 0,
    vocab: Sequence[str] | None = None,
    warmup_answer_len: int = 1,
    warmup_examples: Sequence[tuple[Sequence[int], Sequence[bool]]] | None = None,
) -> str:
    """Write the tiny model + tokenizer to ``out_dir`` (a HF directory) and return ``out_dir``.

    ``vocab``: the task's token list (None: ``VOCAB``, the demo's); ``warmup_answer_len``:
    answer tokens per warm-up example; ``warmup_examples``: (ids, loss mask) pairs for a
    warm-up on whole sequences (``sequence_warmup``) instead of prompts and answers.
    Deterministic in its arguments; a directory already built with the same arguments is
    reused. The write is atomic (temporary directory, then rename).
    """
    spec = {
        "seed": seed,
        "warmup_steps": warmup_steps,
        "warmup_prompts": [list(p) for p in warmup_prompts],
        "warmup_answers": list(warmup_answers),
    }
    # Only when not the default, so that toy:max's marker (and its reuse) stay as they were.
    if vocab is not None and list(vocab) != VOCAB:
        spec["vocab"] = list(vocab)
    if warmup_answer_len != 1:
        spec["warmup_answer_len"] = warmup_answer_len
    if warmup_examples is not None:
        spec["warmup_examples"] = [[list(ids), [bool(m) for m in mask]]
                                   for ids, mask in warmup_examples]
    vocab_list = list(vocab) if vocab is not None else VOCAB
    marker = os.path.join(out_dir, _MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == spec:
                return out_dir
        raise ValueError(f"{out_dir} holds a tiny model built with other settings; remove it")
    tokenizer = build_tokenizer(vocab_list)
    model = build_model(seed, vocab_list)
    if warmup_steps and warmup_examples is not None:
        sequence_warmup(model, warmup_examples, tokenizer.pad_token_id, steps=warmup_steps,
                        seed=seed)
    elif warmup_steps:
        answer_ids = [tokenizer.convert_tokens_to_ids(a) for a in warmup_answers]
        if tokenizer.unk_token_id in answer_ids:
            raise ValueError(f"warm-up answers {list(warmup_answers)} are not all single tokens")
        format_warmup(
            model,
            warmup_prompts,
            answer_ids,
            tokenizer.eos_token_id,
            steps=warmup_steps,
            seed=seed,
            answer_len=warmup_answer_len,
        )
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, _MARKER), "w") as f:
        json.dump(spec, f)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)
    return out_dir
