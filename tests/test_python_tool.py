"""The python tool environment: scripted SmolLM2 conversations through the driver and the
real sandbox (exact ids, tool messages, scoring), and tools that fail, hang or flood."""

import json
import time

import pytest

from oapl.batch import Rollout
from oapl.config import EnvConfig, GenerationConfig
from oapl.envs import env_class
from oapl.envs.python_tool import PythonToolEnv, tool_code
from oapl.prompts import Prompt
from oapl.rollout.multiturn import run_episodes
from oapl.rollout.turns import TurnFormat
from oapl.sandbox import own_uids, processes_of, sandbox_problem

pytestmark = pytest.mark.skipif(sandbox_problem() is not None,
                                reason=f"no sandbox: {sandbox_problem()}")
ASSISTANT = "<|im_start|>assistant\n"


class Scripted:
    """A generator that says ``script[prompt][t]`` on its turn ``t`` (told by how many
    assistant turns the context opens), then EOS, with log-prob -0.5 per token."""

    version, logprobs_mode = 0, "processed_logprobs"

    def __init__(self, tok, script):
        self.tok, self.script, self.calls = tok, script, 0

    def load_weights(self, named_tensors, version):
        self.version = version

    def generate(self, prompts, prompt_indices, sampling, seed, seeds=None):
        self.calls += 1
        out = []
        for ids, index in zip(prompts, prompt_indices):
            turn = self.tok.decode(ids).count(ASSISTANT) - 1
            said = self.tok(self.script[index][turn], add_special_tokens=False)["input_ids"]
            said = said + [self.tok.eos_token_id]
            out.append([Rollout(index, list(ids), said, [-0.5] * len(said), "stop", 0)
                        for _ in range(sampling.n)])
        return out


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from oapl.model_source import resolve_model

    try:
        path = resolve_model("builtin:smollm2-135m-instruct")
    except Exception as exc:  # noqa: BLE001 - the package may be missing outside `make test`
        pytest.skip(f"SmolLM2 unavailable: {exc}")
    return AutoTokenizer.from_pretrained(path)


def _prompts(tok, problems):
    """Prompts of ``problems`` ((question, answer) pairs) in the chat template."""
    prompts = []
    for i, (question, answer) in enumerate(problems):
        text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        prompts.append(Prompt(i, ids, {"prompt": question, "answer": answer}))
    return prompts


def _run(tok, problems, script, cfg, **kwargs):
    """run_episodes of ``problems`` with the scripted model."""
    prompts = _prompts(tok, problems)
    cls = type("Env", (PythonToolEnv,), {"__init__": lambda self: PythonToolEnv.__init__(
        self, **kwargs)})
    gen = Scripted(tok, script)
    ep = run_episodes(gen, cls, cfg, prompts, GenerationConfig(n=1, max_tokens=64), seed=0,
                      fmt=TurnFormat(tok), max_model_len=1024)
    return ep, gen


def test_tool_code_picks_calls_and_answers():
    assert tool_code("```python\nprint(2)\n```") == "print(2)\n"
    assert tool_code("try\n```\n1+1\n```\nthen\n```py\n3*3\n```") == "3*3\n"
    assert tool_code("It is \\boxed{4}.\n```python\n2+2\n```") is None
    assert tool_code("The answer is 4.") is None
    assert tool_code("```bash\nls\n```") is None
    assert env_class("python") is PythonToolEnv


def test_scripted_conversation_through_the_sandbox(tok):
    """A tool call's output comes back as a tool message tokenized once with the chat
    template's markers; the final answer is scored; the ids are the conversation's rendering;
    errors and time limits are tool results (the rollout goes on)."""
    problems = [("What is 17 times 23?", "391"), ("What is 1 / 0?", "0"),
                ("Loop?", "7"), ("No tool: 2 + 5?", "7")]
    script = {0: ["```python\nx = 17\nx * 23\n```", "So \\boxed{391}."],
              1: ["```python\nprint('start')\nprint(1 / 0)\n```", "\\boxed{0}"],
              2: ["```python\nwhile True:\n    pass\n```", "\\boxed{6}"],
              3: ["2 + 5 = 7, so \\boxed{7}"]}
    cfg = EnvConfig(max_turns=3, step_timeout_s=60, gather_s=0.2, workers=4)
    ep, gen = _run(tok, problems, script, cfg, cpu_s=1.0, timeout_s=30.0)
    assert ep.rewards == [1.0, 1.0, 0.0, 1.0]
    assert [r.status for r in ep.rollouts] == ["done"] * 4 and not any(ep.failed)
    assert ep.metrics["env_failures"] == 0 and ep.metrics["multi_turn_frac"] == 0.75
    replies = {0: "391", 1: "start\nZeroDivisionError: division by zero",
               2: "error: CPU time limit (1 s) exceeded"}
    fmt = TurnFormat(tok)
    for row, r in enumerate(ep.rollouts):
        said = [r.completion_ids[a:b] for a, b, _ in r.segments]
        assert [tok.decode(s, skip_special_tokens=True) for s in said] == script[row]
        assert r.logprobs == [(-0.5 if m else 0.0) for m in r.model_mask]
        messages = [{"role": "user", "content": problems[row][0]},
                    {"role": "assistant", "content": script[row][0]}]
        if row in replies:
            env = r.completion_ids[r.segments[0][1]:r.segments[1][0]]
            assert env == fmt.reply_ids({"role": "tool", "content": replies[row]}, 256)[0]
            messages += [{"role": "tool", "content": replies[row]},
                         {"role": "assistant", "content": script[row][1]}]
        text = tok.apply_chat_template(messages, tokenize=False)
        assert tok.decode(r.prompt_ids + r.completion_ids) == text.rstrip("\n")
    # turn 1, then one call per set of replies back within env.gather_s of each other (which
    # ones arrive together depends on the machine): at most one per reply
    assert 2 <= gen.calls <= 4


def test_failing_hung_and_flooding_tools(tok):
    """A sandbox that cannot start the interpreter (the tool raises) and a tool step past
    env.step_timeout_s fail their rollout (env_failures); a flood is cut to max_reply_tokens
    (env_reply_cut) and the rollout goes on; the others are unaffected."""
    flood = {0: ["```python\nprint('x' * 10**7)\n```", "\\boxed{1}"]}
    ok = {1: ["```python\n2 ** 10\n```", "\\boxed{1024}"]}
    problems = [("Flood", "1"), ("Power", "1024")]
    cfg = EnvConfig(max_turns=3, step_timeout_s=60, gather_s=0.2, max_reply_tokens=16)
    ep, _ = _run(tok, problems, {**flood, **ok}, cfg)
    assert ep.rewards == [1.0, 1.0] and ep.metrics["env_reply_cut"] == 1
    r = ep.rollouts[0]
    shown = {"role": "tool", "content": "x" * 1000 + "\n(output cut)"}  # max_output_chars
    cut, was_cut = TurnFormat(tok).reply_ids(shown, 16)  # then cut to 16 tokens + markers
    assert was_cut and r.completion_ids[r.segments[0][1]:r.segments[1][0]] == cut
    assert ep.metrics["env_failures"] == 0

    ep, _ = _run(tok, problems, {**flood, **ok}, cfg, python="/nonexistent/python3")
    assert [r.status for r in ep.rollouts] == ["failed", "failed"]
    assert ep.metrics["env_failures"] == 2 and ep.rewards == [0.0, 0.0] and all(ep.failed)

    hang = {0: ["```python\nimport time\ntime.sleep(60)\n```", "\\boxed{1}"]}
    cfg = EnvConfig(max_turns=3, step_timeout_s=4, gather_s=0.2)
    ep, _ = _run(tok, problems[:1], hang, cfg, timeout_s=10.0)
    assert ep.rollouts[0].status == "failed" and ep.metrics["env_failures"] == 1
    # The abandoned step's program still ends at the sandbox's own wall limit: nothing is left.
    deadline = time.monotonic() + 30
    while processes_of(own_uids()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(own_uids()) == []


def test_sample_episodes_in_chunks(tok):
    """`oapl eval` / `oapl generate` with env.name: every prompt's rollout, in order, chunk
    by chunk, scored by the environment."""
    from oapl.rollout.multiturn import sample_episodes

    cfg = EnvConfig(name="python", max_turns=3, gather_s=0.2)
    sampling = GenerationConfig(n=1, max_tokens=64, max_model_len=1024)
    problems = [("3 + 4?", "7"), ("5 * 6?", "30"), ("9 - 2?", "1")]
    script = {0: ["\\boxed{7}"], 1: ["```python\n5 * 6\n```", "\\boxed{30}"],
              2: ["```python\n9 - 2\n```", "\\boxed{7}"]}
    gen = Scripted(tok, script)
    rollouts, rewards, failed = sample_episodes(gen, cfg, _prompts(tok, problems), sampling, 0, TurnFormat(tok),
                                                chunk=2, desc="t")
    assert [r.prompt_index for r in rollouts] == [0, 1, 2] and rewards == [1.0, 1.0, 0.0]
    assert failed == [False] * 3 and gen.calls == 4  # two turns in each of two batches
    assert [len(r.segments) for r in rollouts] == [1, 2, 2]


def test_generate_writes_multiturn_rollout_files(tok, tmp_path):
    """`oapl generate` with env.name: a version-2 file whose rows carry the model's segments
    (at the recorded version), the status and the environment's reward; it reads back."""
    from oapl.config import load_config
    from oapl.offline import generate_rollouts
    from oapl.sources.rollout_file import read_rollouts

    cfg = load_config("examples/smollm2-tool-cpu.yaml",
                      ["data.limit=2", "generation.n=2", "data.prompts_per_step=2",
                       f"output_dir={tmp_path}", "env.gather_s=0.2"])
    script = {i: ["```python\n1 + 1\n```", "\\boxed{2}"] for i in range(2)}
    path = str(tmp_path / "r.jsonl")
    summary = generate_rollouts(cfg, path, Scripted(tok, script), version=3)
    assert summary["rows"] == 4 and summary["reward_errors"] == 0
    rows = [json.loads(line) for line in open(path)]
    assert {r["file_version"] for r in rows} == {2} and {r["status"] for r in rows} == {"done"}
    assert all(len(r["segments"]) == 2 and r["segments"][0][2] == 3 for r in rows)
    got = read_rollouts(path, group_size=2)
    assert [r.segments for r in got.rollouts] == [[tuple(x) for x in r["segments"]]
                                                  for r in rows]
