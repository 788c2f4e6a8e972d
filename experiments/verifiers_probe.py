"""Can the ``verifiers`` environments library run token-exact multi-turn rollouts here?

    .venv/bin/python -m pip install --target /tmp/vf_site --no-deps verifiers==0.4.0 \
        renderers==0.1.12 ...   # its pins, see docs/RESULTS.md; not in the project's venv
    PYTHONPATH=/tmp/vf_site .venv/bin/python experiments/verifiers_probe.py --samples 64

verifiers' training client renders the conversation to token ids with the ``renderers``
package and samples through vLLM's token-in/token-out route; the next turn is extended
token-exactly only by a renderer with a hand-written ``bridge_to_next_turn``, else the
whole conversation is rendered again from text. This script asks, for SmolLM2-135M-Instruct
(the project's real CPU model) and the engine's own samples:

1. which renderer ``renderers.create_renderer`` picks and whether it bridges;
2. how often rendering ``[user, assistant(decoded sample), user]`` again does not start with
   the exact ids the engine saw and sampled (prompt + completion): each such rollout would be
   trained on tokens the model never sampled, or with misaligned log-probs.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=64, help="completions sampled in all")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    from renderers import create_renderer
    from transformers import AutoTokenizer

    from oapl.config import DataConfig, GenerationConfig
    from oapl.engine.generator import VLLMGenerator
    from oapl.model_source import resolve_model
    from oapl.prompts import load_prompts

    path = resolve_model("builtin:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    renderer = create_renderer(tok)
    user = [{"role": "user", "content": "What is 12 + 7?"}]
    first = renderer.render(user, add_generation_prompt=True).token_ids
    bridged = renderer.bridge_to_next_turn(first, tok("19<|im_end|>")["input_ids"],
                                           [{"role": "user", "content": "Sure?"}])
    data = DataConfig(source="word_problems", chat_template=True, max_prompt_tokens=96,
                      limit=max(1, args.samples // 4))
    prompts = load_prompts(data, tok)
    gen_cfg = GenerationConfig(n=4, temperature=args.temperature, max_tokens=args.max_tokens,
                               dtype="bfloat16", max_model_len=192,
                               kv_cache_memory_bytes=256 * 2**20, skip_tokenizer_init=True)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    gen = VLLMGenerator(path, gen_cfg, seed=0)
    try:
        groups = gen.generate([p.token_ids for p in prompts], [p.index for p in prompts],
                              gen_cfg, seed=0)
    finally:
        gen.close()
    stats = {"stopped": 0, "prompt_differs": 0, "prefix_differs": 0, "text_roundtrip_differs": 0}
    for p, group in zip(prompts, groups):
        messages = [{"role": "user", "content": data.prompt_template.format(**p.record)}]
        rendered_prompt = renderer.render(messages, add_generation_prompt=True).token_ids
        stats["prompt_differs"] += len(group) * (rendered_prompt != p.token_ids)
        for r in group:
            if r.finish_reason != "stop":
                continue
            stats["stopped"] += 1
            text = tok.decode(r.completion_ids, skip_special_tokens=True)
            stats["text_roundtrip_differs"] += (
                tok(text, add_special_tokens=False)["input_ids"] != r.completion_ids[:-1])
            again = renderer.render(
                messages + [{"role": "assistant", "content": text},
                            {"role": "user", "content": "Are you sure?"}],
                add_generation_prompt=True).token_ids
            exact = p.token_ids + r.completion_ids
            stats["prefix_differs"] += again[: len(exact)] != exact
    print(json.dumps({"renderer": type(renderer).__name__,
                      "bridges": bridged is not None, **stats}, indent=1))


if __name__ == "__main__":
    main()
