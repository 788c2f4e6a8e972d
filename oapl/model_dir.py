"""Any model a command may name, as a Hugging Face directory that vLLM and transformers load.

``model_dir(path, cfg)`` accepts ``tiny`` (the built-in model, built under
``<cfg.output_dir>/base_model`` by ``prepare_tiny``), a built-in alias
(``builtin:smollm2-135m-instruct``, see ``oapl.model_source``), a HF directory (a run's ``final_model`` or ``base_model``
included), a training checkpoint ``<run>/checkpoints/step_<N>`` (weights and optimizer
only), or a LoRA adapter directory (a ``model.lora`` run's ``final_model``, naming its base):
the checkpoint's weights, or its adapter merged in, are loaded into the base model and saved
once, as a HF directory, under ``<cfg.output_dir>/models/<run>-step_<N>`` (or
``<run>-final_model``; written to a temporary name and renamed, so an interrupted export is
never taken for a finished one).

``push_model(generator, path, version)`` loads a HF directory's weights into a running engine.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator

import torch
import yaml

from . import tiny
from .config import Config
from .engine.adapter import ADAPTER_FILE, CONFIG_FILE, is_adapter_dir
from .engine.generator import Generator
from .model_source import BUILTIN_PREFIX, resolve_model
from .tasks.toy import toy_task


def prepare_tiny(cfg: Config) -> str:
    """The tiny model built (once, deterministically) under ``<output_dir>/base_model``, with
    its format warm-up (``model.tiny_format_warmup_steps``) on the toy task's prompts (the
    task ``model.tiny_task``, else ``data.source``'s)."""
    steps = cfg.model.tiny_format_warmup_steps
    prompts, answers, vocab, answer_len, examples = [], [], None, 1, None
    name = cfg.model.tiny_task or (
        cfg.data.source[4:] if cfg.data.source.startswith("toy:") else None)
    task = toy_task(name) if name is not None else None
    if task is not None:
        vocab, answer_len = task.vocab, task.answer_len  # the task's vocabulary (None: VOCAB)
    if steps:
        if task is None:
            raise ValueError("model.tiny_format_warmup_steps needs a toy:<task> data.source "
                             "or model.tiny_task")
        tok = tiny.build_tokenizer(vocab or tiny.VOCAB)
        if task.warmup_examples is not None:  # whole sequences (a multi-turn task's)
            examples = task.warmup_examples(tok)
        else:
            prompts = [tok(cfg.data.prompt_template.format(**r))["input_ids"]
                       for r in task.records]
            answers = task.answers
    return tiny.build_tiny_model(
        os.path.join(cfg.output_dir, "base_model"),
        seed=cfg.model.tiny_seed,
        warmup_prompts=prompts,
        warmup_answers=answers,
        warmup_steps=steps,
        vocab=vocab,
        warmup_answer_len=answer_len,
        warmup_examples=examples,
    )


def is_checkpoint(path: str) -> bool:
    """A checkpoint written by ``oapl.checkpoint.save_checkpoint``."""
    return os.path.isfile(os.path.join(path, "state.json")) and not os.path.isfile(
        os.path.join(path, "config.json")
    )


def checkpoint_step(path: str) -> int:
    """The trainer step a checkpoint was taken at."""
    with open(os.path.join(path, "state.json")) as f:
        return int(json.load(f)["step"])


def _export_checkpoint(ckpt: str, out_root: str) -> str:
    """The checkpoint ``ckpt`` as a HF directory under ``out_root`` (exported once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import safetensors.torch

    run = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    out = os.path.join(out_root, f"{os.path.basename(run)}-{os.path.basename(ckpt)}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    with open(os.path.join(run, "config.yaml")) as f:
        base = yaml.safe_load(f)["model"]["path"]
    base = os.path.join(run, "base_model") if base == "tiny" else base
    if base.startswith(BUILTIN_PREFIX):
        base = resolve_model(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if os.path.isfile(os.path.join(ckpt, ADAPTER_FILE)):  # a model.lora run: its adapter
        model = _merged(model, ckpt)
    else:
        safetensors.torch.load_model(model, os.path.join(ckpt, "model.safetensors"))
    return _save_once(model, AutoTokenizer.from_pretrained(base), out)


def _merged(model, adapter_dir: str):
    """``model`` with the PEFT adapter of ``adapter_dir`` merged into its weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def _save_once(model, tokenizer, out: str) -> str:
    """Save ``model`` and ``tokenizer`` as the HF directory ``out``, atomically."""
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def _export_adapter(path: str, out_root: str) -> str:
    """The adapter directory ``path`` merged into the base its config names, as a HF
    directory under ``out_root`` (exported once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    out = os.path.join(out_root, f"{parent}-{os.path.basename(os.path.normpath(path))}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    with open(os.path.join(path, CONFIG_FILE)) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base or not os.path.isfile(os.path.join(base, "config.json")):
        raise ValueError(f"{path}: its {CONFIG_FILE} names base model {base!r}, which is not a "
                         "model directory here")
    model = _merged(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), path)
    tok = path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else base
    return _save_once(model, AutoTokenizer.from_pretrained(tok), out)


def model_dir(path: str, cfg: Config) -> str:
    """``path`` (``tiny``, a HF directory, a checkpoint, or an adapter) as a HF directory."""
    if path == "tiny":
        return prepare_tiny(cfg)
    if path.startswith(BUILTIN_PREFIX):  # e.g. builtin:smollm2-135m-instruct
        return resolve_model(path)
    if is_checkpoint(path):
        return _export_checkpoint(path, os.path.join(cfg.output_dir, "models"))
    if is_adapter_dir(path):
        return _export_adapter(path, os.path.join(cfg.output_dir, "models"))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model {path!r}: not `tiny`, a builtin: alias, a HF model directory, "
                         "a checkpoint or a LoRA adapter directory")
    return path


def hf_weights(path: str,
               dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every parameter of the HF directory ``path``, loaded as ``dtype``
    (None: float32; a tied lm_head appears once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    for name, p in model.named_parameters():
        yield name, p.detach()


def push_model(generator: Generator, path: str, version: int,
               dtype: torch.dtype | None = None) -> None:
    """Load the weights of the HF directory ``path`` (as ``dtype``, e.g. the wire dtype
    ``oapl.engine.transport.wire_dtype``; None: float32) into ``generator``; the engine must
    have been built for the same architecture."""
    generator.load_weights(hf_weights(path, dtype), version)
