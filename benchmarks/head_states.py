"""Real inputs of the head for the kernel measurements: SmolLM2-135M-Instruct's own last hidden
states at its own completion tokens, and its head.

    PYTHONPATH=. .venv/bin/python -m benchmarks.head_states [--tokens 8192] [--out runs/head_states]

The trained state: the model (``builtin:smollm2-135m-instruct``, ``oapl.model_source``) samples
completions (temperature 0.7, at most 96 tokens, as ``examples/smollm2-cpu.yaml``) to chat-templated
word problems of the example's train split; its final-norm hidden states at the completion
positions (position t predicts token t + 1) and those tokens are kept until ``--tokens`` are
collected. The untrained state: the same token sequences through a model of the same config
with Hugging Face's random initialization (seed 0), with its own (random) head. Each state is
saved once as ``<out>/{trained,untrained}.pt``: hidden [N, D] fp32, targets [N] int64, lengths
(completion tokens per sequence, summing to N), weight [V, D] fp32; later calls load the files.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

DEFAULT_OUT = Path("runs/head_states")
STATES = ("trained", "untrained")


def _sample(model, tok, prompts, max_new_tokens: int, seed: int):
    """(prompt ids, completion ids) per prompt, sampled at temperature 0.7 in batches of 16."""
    torch.manual_seed(seed)
    tok.padding_side = "left"
    out = []
    for i in range(0, len(prompts), 16):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in prompts[i : i + 16]]
        enc = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=True, temperature=0.7, top_p=1.0, top_k=0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        width = enc["input_ids"].shape[1]
        for row, mask, full in zip(enc["input_ids"], enc["attention_mask"], gen):
            comp = full[width:].tolist()
            if tok.eos_token_id in comp:
                comp = comp[: comp.index(tok.eos_token_id) + 1]
            out.append((row[mask.bool()].tolist(), comp))
    return out


def _states(model, sequences, tokens: int) -> dict:
    """Final-norm hidden states at the completion positions of ``sequences`` (one forward each)."""
    hidden, targets, lengths = [], [], []
    decoder = model.get_decoder()
    for prompt, comp in sequences:
        ids = torch.tensor([prompt + comp])
        with torch.no_grad():
            h = decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
        p, take = len(prompt), min(len(comp), tokens - sum(lengths))
        hidden.append(h[p - 1 : p - 1 + take].float())
        targets.append(torch.tensor(comp[:take]))
        lengths.append(take)
        if sum(lengths) == tokens:
            break
    return {"hidden": torch.cat(hidden), "targets": torch.cat(targets), "lengths": lengths,
            "weight": model.get_output_embeddings().weight.detach().float().clone()}


def build(tokens: int, out: Path) -> None:
    """Write ``<out>/trained.pt`` and ``<out>/untrained.pt`` (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from oapl.model_source import resolve_model
    from oapl.tasks.word_problems import make_split

    path = resolve_model("builtin:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    records = make_split("train", 400)
    sequences, t0 = [], time.time()
    while sum(len(c) for _, c in sequences) < tokens:
        batch = records[len(sequences) : len(sequences) + 32]
        sequences += _sample(model, tok, [r["prompt"] for r in batch], 96, seed=len(sequences))
        print(f"  sampled {len(sequences)} completions, {sum(len(c) for _, c in sequences)} tokens, "
              f"{time.time() - t0:.0f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(_states(model, sequences, tokens), out / "trained.pt")
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(path)
    untrained = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    torch.save(_states(untrained, sequences, tokens), out / "untrained.pt")
    print(f"  states written to {out} in {time.time() - t0:.0f} s", flush=True)


def load(state: str, out: Path = DEFAULT_OUT, tokens: int = 8192) -> dict:
    """The saved ``state`` ("trained" or "untrained"), built first when missing."""
    if not (out / f"{state}.pt").is_file():
        build(tokens, out)
    data = torch.load(out / f"{state}.pt")
    if len(data["targets"]) < tokens:
        raise ValueError(f"{out / state}.pt holds {len(data['targets'])} tokens, fewer than {tokens}: "
                         "delete it to rebuild")
    return data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    build(args.tokens, args.out)


if __name__ == "__main__":
    main()
