"""Multi-turn rollouts: the token layout (masks, log-probs, segments), the loss on model tokens
only, rollout files, the driver against the real engine, bad environments."""

import dataclasses
import time

import pytest
import torch

from conftest_loop import ENGINE_CFG
from oapl.batch import Rollout, collate
from oapl.config import Config, EnvConfig
from oapl.envs import Step, env_class
from oapl.prompts import Prompt
from oapl.rollout.multiturn import TURN_SEED_STRIDE, run_episodes
from oapl.rollout.turns import TurnFormat
from oapl.sources.rollout_file import RolloutFileError, read_rollouts, write_rollouts
from oapl.tiny import build_tokenizer
from oapl.training.policy import Policy
from oapl.training.trainer import LocalTrainer

# prompt, model turn, env reply, model turn: [model 0..2) [env 2..5) [model 5..7)
PROMPT = [1, 14, 7, 9, 15]
COMPLETION = [9, 2, 14, 4, 15, 8, 2]
LOGPROBS = [-0.5, -0.1, 0.0, 0.0, 0.0, -1.2, -0.3]
SEGMENTS = [(0, 2, 3), (5, 7, 3)]


def _multiturn(reward_seed: int = 0) -> tuple[list[Rollout], list[float]]:
    """Two groups of 2 rollouts mixing single-turn and multi-turn ones (tiny vocabulary)."""
    mt = Rollout(0, PROMPT, COMPLETION, LOGPROBS, "stop", 3, SEGMENTS)
    st = Rollout(0, PROMPT, [9, 2], [-0.7, -0.2], "stop", 3)
    mt2 = Rollout(1, [1, 14, 3, 3, 15], [3, 2, 14, 5, 15, 5, 2, 15, 6, 2],
                  [-1.0, -0.2, 0, 0, 0, -0.4, -0.1, 0, -2.0, -0.6], "stop", 3,
                  [(0, 2, 3), (5, 7, 3), (8, 10, 3)])
    st2 = Rollout(1, [1, 14, 3, 3, 15], [4, 2], [-0.9, -0.05], "stop", 3)
    g = torch.Generator().manual_seed(reward_seed)
    return [mt, st, mt2, st2], torch.rand(4, generator=g).tolist()


def test_collate_masks_and_logprobs_match_a_hand_built_batch():
    rollouts, rewards = _multiturn()
    b = collate(rollouts, rewards, pad_id=0)
    p = len(PROMPT)
    # targets t = input_ids[t + 1]: completion token j sits at t = p - 1 + j
    expect_mask = torch.zeros(b.loss_mask.shape[1], dtype=torch.bool)
    expect_lps = torch.zeros(b.loss_mask.shape[1])
    for start, stop, _ in SEGMENTS:
        expect_mask[p - 1 + start: p - 1 + stop] = True
        expect_lps[p - 1 + start: p - 1 + stop] = torch.tensor(LOGPROBS[start:stop])
    assert torch.equal(b.loss_mask[0], expect_mask)
    assert torch.equal(b.sampler_logprobs[0], expect_lps)
    assert b.input_ids[0, : p + len(COMPLETION)].tolist() == PROMPT + COMPLETION
    assert b.attention_mask[0].sum() == p + len(COMPLETION)  # env tokens are real tokens
    assert b.num_completion_tokens == 4 + 2 + 6 + 2
    assert rollouts[0].model_mask == [True, True, False, False, False, True, True]
    # a single-turn row is laid out as before: the whole completion in the mask, its log-probs
    st = rollouts[1]
    assert b.loss_mask[1].nonzero().flatten().tolist() == [p - 1, p]
    assert b.sampler_logprobs[1, p - 1: p + 1].tolist() == torch.tensor(st.logprobs).tolist()
    # one segment covering the completion is the single-turn rollout, exactly
    one = dataclasses.replace(rollouts[1], segments=[(0, 2, 3)])
    a, c = collate([rollouts[1]], [1.0], 0), collate([one], [1.0], 0)
    assert all(torch.equal(getattr(a, f), getattr(c, f)) for f in
               ("input_ids", "attention_mask", "loss_mask", "sampler_logprobs"))


@pytest.mark.parametrize("name,packing", [("oapl", False), ("oapl", True), ("grpo", False)])
def test_loss_and_gradients_equal_hand_masked_tokens(tiny_model_dir, name, packing):
    """A multi-turn batch's loss and gradients equal those of the same token sequences
    collated as single-turn rollouts with the environment's positions masked out by hand."""
    rollouts, rewards = _multiturn()
    mt = collate(rollouts, rewards, pad_id=0)
    flat = [dataclasses.replace(r, segments=None) for r in rollouts]
    hand = collate(flat, rewards, pad_id=0)
    p = len(PROMPT)
    for row, env in ((0, [(2, 5)]), (2, [(2, 5), (7, 8)])):
        for a, b in env:
            hand.loss_mask[row, p - 1 + a: p - 1 + b] = False
            hand.sampler_logprobs[row, p - 1 + a: p - 1 + b] = 0.0
    assert torch.equal(hand.loss_mask, mt.loss_mask)
    cfg = Config()
    cfg.generation.n, cfg.algorithm.name, cfg.trainer.packing = 2, name, packing
    cfg.algorithm.tis_cap = 2.0 if name == "grpo" else None

    def loss_and_grads(batch):
        policy = Policy.from_pretrained(tiny_model_dir, torch.float32, torch.device("cpu"))
        trainer = LocalTrainer(policy, cfg)
        batch.lag_logprobs = batch.sampler_logprobs
        out = trainer._loss(batch)
        out.loss.backward()
        return out.loss.detach(), {k: v.grad.clone() for k, v in policy.named_parameters()}

    loss_mt, grads_mt = loss_and_grads(mt)
    loss_hand, grads_hand = loss_and_grads(hand)
    torch.testing.assert_close(loss_mt, loss_hand, rtol=1e-6, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads_mt.values())
    for k in grads_mt:
        torch.testing.assert_close(grads_mt[k], grads_hand[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_rollout_file_round_trip_and_version(tmp_path, ext):
    rollouts, rewards = _multiturn()
    rows = [{"group": i // 2, "prompt_ids": r.prompt_ids, "completion_ids": r.completion_ids,
             "logprobs": r.logprobs, "reward": rewards[i], "version": r.version,
             "segments": None if r.segments is None else [list(s) for s in r.segments],
             "status": "truncated" if i == 2 else "done"} for i, r in enumerate(rollouts)]
    path = write_rollouts(str(tmp_path / f"mt.{ext}"), rows)
    data = read_rollouts(path, group_size=2)
    for got, want in zip(data.rollouts, rollouts):
        assert (got.prompt_ids, got.completion_ids, got.segments) == (
            want.prompt_ids, want.completion_ids, want.segments)
        assert got.model_mask == want.model_mask
    assert [r.status for r in data.rollouts] == ["done", "done", "truncated", "done"]
    torch.testing.assert_close(collate(data.rollouts, data.rewards, 0).loss_mask,
                               collate(rollouts, rewards, 0).loss_mask)
    newer = [{**row, "file_version": 3} for row in rows]
    jsonl = str(tmp_path / "newer.jsonl")
    with open(jsonl, "w") as f:  # written by hand: write_rollouts tags its own version
        import json
        f.writelines(json.dumps(r) + "\n" for r in newer)
    with pytest.raises(RolloutFileError, match=r"row 0, column 'file_version': version 3: "
                       r"this oapl reads rollout files of versions 1 to 2"):
        read_rollouts(jsonl, group_size=2)
    old = [{**row, "file_version": 1} for row in rows]
    with open(jsonl, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in old)
    with pytest.raises(RolloutFileError, match=r"column 'segments': needs file_version 2"):
        read_rollouts(jsonl, group_size=2)
    bad = [dict(row) for row in rows]
    bad[0]["segments"] = [[0, 2, 3], [1, 4, 3]]
    with pytest.raises(RolloutFileError, match=r"row 0, column 'segments': segment \[1, 4, 3\]"):
        read_rollouts(write_rollouts(str(tmp_path / f"bad.{ext}"), bad), group_size=2)


# -- the driver, against the real engine -------------------------------------------------


class Quiz:
    """Replies ``max 7 =`` to the first turn; the second turn ends it (reward 1 iff "7")."""

    def reset(self, record):
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, messages):
        if len(messages) == 2:
            return Step({"role": "user", "content": "max 7 ="}, 0.25, False)
        return Step(None, float(messages[-1]["content"] == "7"), True)


class Broken(Quiz):
    """One misbehaviour per prompt, chosen by the record's first digit."""

    def reset(self, record):
        self.kind = int(record["prompt"].split()[1]) % 6
        if self.kind == 5:
            raise RuntimeError("reset failed")
        return super().reset(record)

    def step(self, messages):
        if self.kind == 0:
            raise ValueError("step failed")
        if self.kind == 1:
            return Step(["not", "text"], 0.0, False)
        if self.kind == 2:
            time.sleep(30)  # never answers within the timeout
        if self.kind == 3:
            return Step({"role": "user", "content": "max " * 10_000}, 0.5, False)  # a flood
        return Step("max 1 =", 0.5, False)  # 4: never ends


def _prompts(tok, texts):
    return [Prompt(i, tok(t)["input_ids"], {"prompt": t}) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_driver_matches_a_hand_driven_conversation(engine, tok):
    """run_episodes' rollouts equal the same conversation driven by hand with the engine:
    turn 1 as a single-turn call, the reply's ids appended, turn 2 with the conversation's
    seed; masks and log-probs lie on the model's tokens only."""
    sampling = dataclasses.replace(ENGINE_CFG, n=2)
    prompts = _prompts(tok, ["max 3 5 =", "max 8 1 ="])
    cfg = EnvConfig(max_turns=4, gather_s=0.5)
    fmt = TurnFormat(tok)
    ep = run_episodes(engine, Quiz, cfg, prompts, sampling, seed=11, fmt=fmt,
                      max_model_len=ENGINE_CFG.max_model_len)
    first = engine.generate([p.token_ids for p in prompts], [0, 1], sampling, seed=11)
    reply = tok("max 7 =", add_special_tokens=False)["input_ids"]
    assert ep.metrics["env_failures"] == 0 and len(ep.rollouts) == 4
    for row, r in enumerate(ep.rollouts):
        one = first[row // 2][row % 2]
        assert r.completion_ids[: len(one.completion_ids)] == one.completion_ids
        if one.finish_reason != "stop":  # cut at max_tokens: truncated, env asked once
            assert r.status == "truncated"
            assert r.segments == [(0, len(one.completion_ids), one.version)]
            continue
        ctx = one.prompt_ids + one.completion_ids + reply
        (two,), = engine.generate([ctx], [row // 2], dataclasses.replace(sampling, n=1),
                                  seed=0, seeds=[11 + TURN_SEED_STRIDE + row])
        k = len(one.completion_ids)
        assert r.completion_ids == one.completion_ids + reply + two.completion_ids
        v = one.version
        assert r.segments == [(0, k, v), (k + len(reply), len(r.completion_ids), v)]
        assert r.logprobs == one.logprobs + [0.0] * len(reply) + two.logprobs
        said = tok.decode(two.completion_ids, skip_special_tokens=True)
        assert ep.rewards[row] == float(said == "7") and r.status == (
            "done" if two.finish_reason == "stop" else "truncated")
    b = collate(ep.rollouts, ep.rewards, pad_id=0)
    assert b.num_completion_tokens == sum(r.num_model_tokens for r in ep.rollouts)


def test_bad_environments_fail_only_their_rollout(engine, tok):
    """Raising, non-text, hung, flooding and endless environments: each rollout is failed or
    truncated and counted; the others finish; the call returns within the timeout."""
    texts = [f"max {k} {k} =" for k in range(6)]
    prompts = _prompts(tok, texts)
    cfg = EnvConfig(max_turns=3, step_timeout_s=3.0, gather_s=0.2, max_reply_tokens=5)
    sampling = dataclasses.replace(ENGINE_CFG, n=1, max_tokens=2)
    t = time.perf_counter()
    ep = run_episodes(engine, Broken, cfg, prompts, sampling, seed=3, fmt=TurnFormat(tok),
                      max_model_len=ENGINE_CFG.max_model_len)
    assert time.perf_counter() - t < 25  # not the hung step's 30 s
    status = {k: r.status for k, r in enumerate(ep.rollouts)}
    for k in (0, 1, 2, 5):
        assert status[k] == "failed" and ep.failed[k] and ep.rewards[k] == 0.0
    assert status[3] == status[4] == "truncated" and not ep.failed[3] and not ep.failed[4]
    assert ep.metrics["env_failures"] == 4
    assert ep.metrics["env_truncated"] == 2
    flood = ep.rollouts[3]
    if len(flood.segments) > 1:  # the model's first turn ended with EOS: the reply was cut
        assert ep.metrics["env_reply_cut"] >= 1
        assert flood.segments[1][0] - flood.segments[0][1] <= 5


def test_env_class_loads_a_users_file(tmp_path):
    path = tmp_path / "my_env.py"
    path.write_text("from oapl.envs import Step\n"
                    "class Echo:\n"
                    "    def reset(self, record):\n"
                    "        return [{'role': 'user', 'content': record['prompt']}]\n"
                    "    def step(self, messages):\n"
                    "        return Step(None, 1.0, True)\n")
    cls = env_class(f"{path}:Echo")
    assert cls().step([]).done
    assert env_class("ask").__name__ == "AskEnv"
    with pytest.raises(ValueError, match="no file"):
        env_class(f"{tmp_path}/nope.py:Echo")
    with pytest.raises(ValueError, match="expected one of"):
        env_class("nope")
