"""verifiers environments (``verifiers.v1``) in oapl: the taskset's tasks as records
(``oapl.tasks.verifiers_taskset``) and its ``Env`` played through oapl's protocol
(``oapl.envs.verifiers_env``), token-exactly: examples/vf_ask trains step for step like
toy:ask with oapl's own ``ask`` environment."""

import gc
import json
import os
import textwrap
import time

import pytest

from oapl.config import DataConfig, load_config
from oapl.envs import env_class
from oapl.tasks import load_reward, read_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VF_ASK = os.path.join(ROOT, "examples", "vf_ask")


def _play(record, turns, **env_kwargs):
    """The steps an episode of ``record`` answers to the model turns ``turns``."""
    env = env_class("verifiers")(**env_kwargs)
    messages = env.reset(record)
    steps = []
    for said in turns:
        messages.append({"role": "assistant", "content": said})
        steps.append(env.step(messages))
        if steps[-1].done:
            break
        messages.append({"role": "user", "content": steps[-1].reply})
    return messages, steps


def test_taskset_records_and_an_episode_played_by_hand():
    cfg = DataConfig(source=f"verifiers:{VF_ASK}")
    records = read_records(cfg)
    assert load_reward(cfg) == (None, 1)  # the environment scores
    assert len(records) == 100
    rec = records[37]  # a = 3, h = 7
    assert rec["prompt"] == "max 3 ="
    assert rec["verifiers"]["task"] == {"idx": 37, "prompt": "max 3 =", "hidden": 7,
                                        "answer": "7"}
    json.dumps(rec)  # a rollout file can carry it
    messages, steps = _play(rec, ["ask", "7"])
    assert messages[0] == {"role": "user", "content": "max 3 ="}
    assert [(s.reply, s.reward, s.done) for s in steps] == [("val 7 =", 0.0, False),
                                                            (None, 1.0, True)]
    assert [(s.reward, s.done) for s in _play(rec, ["5"])[1]] == [(0.0, True)]
    # the seat's turn limit (verifiers' own max_turns) ends the exchange: scored, last "ask"
    _, steps = _play(rec, ["ask", "ask", "ask"], player={"max_turns": 2})
    assert [(s.reward, s.done) for s in steps] == [(0.0, False), (0.0, True)]
    assert len(read_records(DataConfig(source=f"verifiers:{VF_ASK}", limit=5))) == 5


def test_episodes_cut_by_oapl_are_cancelled():
    import asyncio

    from oapl.envs import verifiers_env

    rec = read_records(DataConfig(source=f"verifiers:{VF_ASK}"))[0]
    for _ in range(3):
        _play(rec, ["ask"])  # left waiting for a second turn that never comes
    gc.collect()
    deadline = time.time() + 5
    while asyncio.all_tasks(verifiers_env._LOOP) and time.time() < deadline:
        time.sleep(0.05)
    assert not asyncio.all_tasks(verifiers_env._LOOP)


PKG = '''
import verifiers.v1 as vf

class D(vf.TaskData):
    answer: str

class T(vf.Task[D, vf.State, vf.TaskConfig]):
    @vf.reward
    async def right(self, trace: vf.Trace) -> float:
        return float(trace.last_reply == self.data.answer)

    @vf.stop
    async def said_stop(self, trace: vf.Trace) -> bool:
        return trace.last_reply == "stop"

class S(vf.Taskset[T, vf.TasksetConfig]):
    def load(self):
        yield T(D(prompt="q", answer="a", system_prompt="be brief"), self.config.task)
{extra}
__all__ = ["S"{names}]
'''

TWO_SEATS = '''
class C(vf.EnvConfig):
    solver: vf.AgentConfig = vf.AgentConfig()
    critic: vf.AgentConfig = vf.AgentConfig()

class E(vf.Env[C]):
    async def run(self, task, agents):
        await agents.solver.run(task)
'''

ON_RESPONSE = '''
import verifiers.v1 as vf

class R(vf.Task[vf.TaskData, vf.State, vf.TaskConfig]):
    @vf.stop
    async def long(self, response: vf.Response) -> bool:
        return True

class RS(vf.Taskset[R, vf.TasksetConfig]):
    def load(self):
        yield R(vf.TaskData(prompt="q"), self.config.task)

__all__ = ["RS"]
'''

ENDLESS = '''
class C(vf.EnvConfig):
    agent: vf.AgentConfig = vf.AgentConfig()

class E(vf.Env[C]):
    async def run(self, task, agents):
        async with agents.agent.interaction(task) as chat:
            segment = await chat.turn()
            while not segment.terminated:
                if segment.last_reply == "boom":
                    raise RuntimeError("the env broke")
                segment = await chat.turn("more")
'''


def _package(tmp_path, name, extra="", names=""):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "__init__.py").write_text(PKG.format(extra=textwrap.dedent(extra),
                                                            names=names))
    return str(tmp_path / name)


def test_single_turn_taskset_stops_and_failures(tmp_path):
    # a plain taskset: verifiers' SingleAgentEnv, one model turn, its @vf.reward
    rec, = read_records(DataConfig(source=f"verifiers:{_package(tmp_path, 'vf_one')}"))
    assert rec["system_prompt"] == "be brief"
    messages, steps = _play(rec, ["a"])
    assert messages[:2] == [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": "q"}]
    assert [(s.reward, s.done) for s in steps] == [(1.0, True)]
    # a multi-turn env: @vf.stop ends it (scored), a raise fails the rollout
    src = "verifiers:" + _package(tmp_path, "vf_more", ENDLESS, ', "E"')
    rec, = read_records(DataConfig(source=src))
    _, steps = _play(rec, ["x", "a", "stop"])
    assert [(s.reply, s.done) for s in steps] == [("more", False), ("more", False),
                                                  (None, True)]
    assert steps[-1].reward == 0.0  # its last reply was "stop"
    with pytest.raises(RuntimeError, match="the env broke"):
        _play(rec, ["boom", "x"])
    # what oapl does not play is refused, naming it
    src = "verifiers:" + _package(tmp_path, "vf_two", TWO_SEATS, ', "E"')
    rec, = read_records(DataConfig(source=src))
    with pytest.raises(RuntimeError, match=r"seats \['critic', 'solver'\]"):
        _play(rec, ["a"])
    os.makedirs(tmp_path / "vf_resp")
    (tmp_path / "vf_resp" / "__init__.py").write_text(ON_RESPONSE)
    rec, = read_records(DataConfig(source=f"verifiers:{tmp_path / 'vf_resp'}"))
    with pytest.raises(RuntimeError, match="@vf.stop long reads a model request or response"):
        _play(rec, ["a"])
    with pytest.raises(ValueError, match="verifiers taskset 'no_such_taskset'"):
        read_records(DataConfig(source="verifiers:no_such_taskset"))


def test_config_pairs_source_and_env():
    with pytest.raises(ValueError, match="go together"):
        load_config(os.path.join(ROOT, "examples", "tiny-verifiers.yaml"), ["env.name=ask"])
    with pytest.raises(ValueError, match="go together"):
        load_config(os.path.join(ROOT, "examples", "tiny-multiturn.yaml"),
                    ["env.name=verifiers"])


@pytest.mark.slow
@pytest.mark.vllm
def test_trains_step_for_step_like_the_native_environment(tmp_path):
    """examples/tiny-verifiers.yaml (toy:ask as a verifiers package) and tiny-multiturn.yaml
    (toy:ask with oapl's own environment): the same metrics on every step (rewards, turns,
    tokens, losses), so the adapter's rollouts are the same tokens."""
    from oapl.loop import train
    from oapl.metrics import read_metrics

    small = ["trainer.steps=4", "data.prompts_per_step=16", "output.save_every=4",
             "output.plot=false", "model.tiny_format_warmup_steps=40"]
    rows = {}
    for name in ("tiny-multiturn", "tiny-verifiers"):
        out = tmp_path / name
        train(load_config(os.path.join(ROOT, "examples", f"{name}.yaml"),
                          [f"output_dir={out}", *small]))
        rows[name] = read_metrics(str(out / "metrics.jsonl"))
    native, vf = rows["tiny-multiturn"], rows["tiny-verifiers"]
    assert len(native) == len(vf) == 4
    assert sum(r["multi_turn_frac"] for r in native) > 0  # conversations of several turns
    for a, b in zip(native, vf):
        same = {k: a[k] for k in a if k != "time" and not k.endswith("_s")}
        assert {k: b[k] for k in same} == same
