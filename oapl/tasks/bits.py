"""Toy tasks with a 6-token answer, for the tiny model (issue 18): ``toy:cmp`` and ``toy:thr``.

    cmp a1 a2 a3 a4 a5 a6 b1 b2 b3 b4 b5 b6 =  ->  c1 c2 c3 c4 c5 c6,  c_j = 1 if a_j > b_j else 0
    thr a1 a2 a3 a4 a5 a6 =                    ->  c1 c2 c3 c4 c5 c6,  c_j = 1 if a_j >= 3 else 0

Random digits in, six bits out, then EOS: seven completion tokens. The reward is sparse: 1 iff
the whole answer string is exactly right, else 0 (``ToyTask.score``). After the tiny model's
format-only warm-up (six uniformly random bits, then EOS) it answers at chance, 1/64 ~ 0.016.

``cmp`` draws b_j != a_j, so each bit is 1 with probability exactly 1/2, independently: no
answer is more frequent than another. ``thr`` (threshold ``THR`` = 3) makes each bit 1 with
probability 0.7, so its most frequent answer, ``1 1 1 1 1 1``, is right on 0.7^6 ~ 12% of
prompts: a prompt-independent first step for RL, and a trap (the policy can lock onto it).
Each bit depends on one or two prompt digits at a fixed distance from it. The tiny model
learns ``thr`` *supervised* in ~50 steps (lr 1e-3, batch 128, at threshold 5). With RL,
OAPL at L = 32 learned ``thr`` in 330-420 steps, and at L = 1 every run collapsed
(docs/RESULTS.md, issue 18; also for ``cmp`` and for a threshold of 5).

Prompts: ``NUM_TRAIN`` distinct digit strings for training (the task's ``records``) and
``NUM_HELDOUT`` others, disjoint from them, for held-out evaluation (``heldout_records``;
``write_heldout_jsonl`` writes them as a ``data.source`` file scored by exact match).
"""

from __future__ import annotations

import functools
import json
import random

from ..tiny import SPECIAL_TOKENS

WIDTH = 6  # answer bits (and digits per operand)
NUM_TRAIN = 2000
NUM_HELDOUT = 500
DATA_SEED = 18  # the prompts; independent of the run seed
THR = 3  # thr: c_j = [a_j >= THR]: each bit is 1 with probability 0.7
_DIGITS = tuple(str(d) for d in range(10))
VOCABS = {  # each task's tiny vocabulary (16 tokens, like toy:max's)
    "cmp": (*SPECIAL_TOKENS, *_DIGITS, "cmp", "="),
    "thr": (*SPECIAL_TOKENS, *_DIGITS, "thr", "="),
}


def _bits(xs) -> str:
    """The answer string as the tiny tokenizer decodes a completion: space-separated bits."""
    return " ".join("1" if x else "0" for x in xs)


def _draw(name: str, rng: random.Random) -> tuple[tuple[int, ...], dict]:
    a = [rng.randrange(10) for _ in range(WIDTH)]
    if name == "cmp":
        b = [rng.randrange(9) for _ in range(WIDTH)]
        b = [y + (y >= x) for x, y in zip(a, b)]  # uniform over the 9 digits != a_j
        digits = tuple(a + b)
        answer = _bits(x > y for x, y in zip(a, b))
    elif name == "thr":
        digits = tuple(a)
        answer = _bits(x >= THR for x in a)
    else:
        raise ValueError(f"unknown bits task {name!r}; available: {sorted(VOCABS)}")
    prompt = f"{name} " + " ".join(str(d) for d in digits) + " ="
    return digits, {"prompt": prompt, "answer": answer, "task": name}


@functools.lru_cache(maxsize=None)
def _splits(name: str) -> tuple[list[dict], list[dict]]:
    rng = random.Random(DATA_SEED)
    seen: set[tuple[int, ...]] = set()
    rows = []
    while len(rows) < NUM_TRAIN + NUM_HELDOUT:
        digits, rec = _draw(name, rng)
        if digits not in seen:
            seen.add(digits)
            rows.append(rec)
    return rows[:NUM_TRAIN], rows[NUM_TRAIN:]


def heldout_records(name: str) -> list[dict]:
    """The ``NUM_HELDOUT`` evaluation prompts of task ``name``, none among its training ones."""
    return [dict(r) for r in _splits(name)[1]]


def write_heldout_jsonl(name: str, path: str) -> str:
    """Write the held-out records as JSON lines (``data.source=<path>``, scored by exact match)."""
    with open(path, "w") as f:
        for r in heldout_records(name):
            f.write(json.dumps(r) + "\n")
    return path


def train_records(name: str) -> list[dict]:
    """The ``NUM_TRAIN`` training prompts of task ``name`` (the toy task's records)."""
    return _splits(name)[0]


def exact_reward(model_dir: str, records: list[dict], temperature: float = 1.0) -> dict:
    """The policy in ``model_dir`` on ``records``, exactly, from its log-probs under teacher
    forcing (no sampling noise):

    - ``expected_reward``: mean over prompts of P(the exact answer, then EOS) at
      ``temperature``, i.e. the expected reward (and pass@1) of one sample;
    - ``greedy_accuracy``: share of prompts whose greedy completion is exactly right;
    - ``bit_accuracy``: share of answer bits whose most likely value (after the right prefix)
      is right;
    - ``entropy_answer``: mean entropy (nats, over the whole vocabulary) of the 6 answer
      positions after the right prefix (~log 2 = 0.69 after the warm-up; 0 when deterministic);
    - ``per_prompt``: P(exact answer, EOS) per prompt.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = torch.tensor([tok(r["prompt"])["input_ids"] for r in records])
    ans = torch.tensor([tok(r["answer"], add_special_tokens=False)["input_ids"] for r in records])
    eos = torch.full((len(records), 1), tok.eos_token_id)
    target = torch.cat([ans, eos], 1)  # [N, 7]
    ids = torch.cat([prompts, target], 1)
    p = prompts.shape[1]
    with torch.no_grad():
        logits = model(ids).logits[:, p - 1 : p - 1 + target.shape[1]].float() / temperature
    logp = torch.log_softmax(logits, -1)
    seq = logp.gather(2, target[..., None])[..., 0].sum(1).exp()
    greedy = (logits.argmax(-1) == target).all(1)
    bit_ids = torch.tensor(tok.convert_tokens_to_ids(["0", "1"]))
    bits = logp[:, :WIDTH][..., bit_ids]  # [N, 6, 2]
    bit_ok = (bits.argmax(-1) == (ans == bit_ids[1]).long()).float().mean()
    ent = -(logp[:, :WIDTH].exp() * logp[:, :WIDTH]).sum(-1).mean()
    return {"expected_reward": float(seq.mean()), "greedy_accuracy": float(greedy.float().mean()),
            "bit_accuracy": float(bit_ok), "entropy_answer": float(ent),
            "per_prompt": [round(float(x), 5) for x in seq]}
