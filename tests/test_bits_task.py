"""``toy:cmp`` and ``toy:thr`` (oapl/tasks/bits.py): their records, the exact-match reward of
the whole 6-bit answer, their own tiny vocabularies, the format-only warm-up (well-formed
answers at chance), and ``toy:max`` left exactly as it was."""

import pytest

from oapl import tiny
from oapl.tasks.toy import toy_task
from oapl.rewards import get_reward_fn
from oapl.tasks import bits

TASKS = ["cmp", "thr"]


def _answer(prompt: str) -> str:
    """The answer recomputed from the prompt, independently of oapl.tasks.bits."""
    words = prompt.split()
    assert words[-1] == "="
    digits = [int(w) for w in words[1:-1]]
    if words[0] == "cmp":
        a, b = digits[:6], digits[6:]
        assert all(x != y for x, y in zip(a, b))
        return " ".join("1" if x > y else "0" for x, y in zip(a, b))
    assert words[0] == "thr" and len(digits) == 6
    return " ".join("1" if x >= 3 else "0" for x in digits)


@pytest.mark.parametrize("name", TASKS)
def test_records_and_split(name):
    task = toy_task(name)
    held = bits.heldout_records(name)
    assert len(task.records) == bits.NUM_TRAIN and len(held) == bits.NUM_HELDOUT
    assert task.answer_len == 6 and task.answers == ["0", "1"]
    assert not {r["prompt"] for r in task.records} & {r["prompt"] for r in held}
    for r in task.records[:300] + held[:300]:
        assert r["answer"] == _answer(r["prompt"]) and r["task"] == name
    # each bit is 1 with probability 1/2 (cmp: no answer is a shortcut) or 0.7 (thr)
    ones = sum(r["answer"].split().count("1") for r in task.records) / (6 * len(task.records))
    p = {"cmp": 0.5, "thr": 0.7}[name]
    assert p - 0.03 < ones < p + 0.03
    assert toy_task(name) is toy_task(name)  # cached


@pytest.mark.parametrize("name", TASKS)
def test_reward_is_exact_match_of_the_whole_answer(name):
    reward = get_reward_fn("exact_match")
    rec = toy_task(name).records[1]
    ans = rec["answer"]
    assert reward(rec, ans) == 1.0
    assert reward(rec, " " + ans + " ") == 1.0
    flipped = ans[:-1] + ("0" if ans[-1] == "1" else "1")
    assert reward(rec, flipped) == 0.0  # 5 of 6 bits right earns nothing
    assert reward(rec, ans[:-2]) == 0.0
    assert reward(rec, ans + " 1") == 0.0


@pytest.mark.parametrize("name", TASKS)
def test_tokenizer_round_trip(name):
    task = toy_task(name)
    tok = tiny.build_tokenizer(task.vocab)
    rec = task.records[0]
    ids = tok(rec["prompt"])["input_ids"]
    assert tok.unk_token_id not in ids
    ans_ids = tok(rec["answer"], add_special_tokens=False)["input_ids"]
    assert len(ans_ids) == 6
    # what the loop decodes (skip_special_tokens) is what the reward compares
    assert tok.decode(ans_ids + [tok.eos_token_id], skip_special_tokens=True) == rec["answer"]


def test_toy_max_vocabulary_unchanged():
    assert tiny.VOCAB == ["<pad>", "<bos>", "<eos>", "<unk>", *"0123456789", "max", "="]
    assert toy_task("max").vocab is None and toy_task("max").answer_len == 1
    assert tiny.build_tokenizer().get_vocab() == {t: i for i, t in enumerate(tiny.VOCAB)}
    with pytest.raises(ValueError, match="must start with"):
        tiny.build_tokenizer(["0", "1"])


def test_base_model_is_formatted_but_at_chance(tmp_path):
    """After the format-only warm-up the tiny model writes six bits then EOS, and is exactly
    right about 1/64 of the time (measured exactly from its log-probs, held-out prompts)."""
    import torch
    from transformers import AutoModelForCausalLM

    task = toy_task("thr")
    tok = tiny.build_tokenizer(task.vocab)
    prompts = [tok(r["prompt"])["input_ids"] for r in task.records]
    torch.set_num_threads(1)
    d = tiny.build_tiny_model(str(tmp_path / "m"), seed=0, warmup_prompts=prompts,
                              warmup_answers=task.answers, warmup_steps=100,
                              vocab=task.vocab, warmup_answer_len=task.answer_len)
    held = bits.heldout_records("thr")[:300]
    ev = bits.exact_reward(d, held)
    assert ev["expected_reward"] < 0.05  # chance: 1/64 = 0.016
    assert ev["entropy_answer"] > 0.6  # each bit near a coin flip (log 2 = 0.69)
    # the format: P(six bits, then EOS) = the sum over all 64 bit strings
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    p_ids = tok(held[0]["prompt"])["input_ids"]
    rows = [p_ids + [tok.convert_tokens_to_ids(str((k >> j) & 1)) for j in range(6)]
            + [tok.eos_token_id] for k in range(64)]
    ids = torch.tensor(rows)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, len(p_ids) - 1 : -1].float(), -1)
    total = float(logp.gather(2, ids[:, len(p_ids):, None]).sum((1, 2)).exp().sum())
    assert total > 0.9, total  # well-formed answers
