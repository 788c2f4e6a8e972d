"""``toy:ask``, a toy task that needs two turns, for the tiny model and the ``ask``
environment (``oapl.envs.toy_ask``)::

    max a =                      the model: "ask" (then EOS), or an answer digit (then EOS)
    val h =                      the environment's reply to "ask": the hidden digit h
    d                            the model's answer; reward 1 iff d = max(a, h)

``h`` is in the record but never in the prompt: answering right on every prompt needs the
second turn (answering at once is right with probability (a + 1) / 10 at best, 0.55 on
average). 100 records (every a, h). The tiny model's format warm-up (``warmup_examples``)
teaches the two shapes at chance: half "ask", then a random digit after the reply; half a
random digit at once.
"""

from __future__ import annotations

from ..tiny import SPECIAL_TOKENS

VOCAB = (*SPECIAL_TOKENS, *(str(d) for d in range(10)), "max", "=", "ask", "val")
ASK = "ask"


def reply(hidden: int) -> str:
    """The environment's answer to "ask"."""
    return f"val {hidden} ="


def records() -> list[dict]:
    return [{"prompt": f"max {a} =", "hidden": h, "answer": str(max(a, h)), "task": "ask"}
            for a in range(10) for h in range(10)]


def warmup_examples(tokenizer) -> list[tuple[list[int], list[bool]]]:
    """(ids, loss mask) pairs for the format warm-up: each prompt with each random answer
    digit at once, and with "ask", each reply and each random digit after it (the two shapes
    in equal numbers); the loss covers the model's tokens only."""
    eos = tokenizer.eos_token_id

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out = []
    for a in range(10):
        prompt = tokenizer(f"max {a} =")["input_ids"]
        for d in range(10):
            direct = prompt + ids(str(d)) + [eos]
            for _ in range(10):
                out.append((direct, [False] * len(prompt) + [True, True]))
            for h in range(10):
                env = ids(reply(h))
                seq = prompt + ids(ASK) + [eos] + env + ids(str(d)) + [eos]
                mask = [False] * len(prompt) + [True, True] + [False] * len(env) + [True, True]
                out.append((seq, mask))
    return out


def exact_reward(model_dir: str, temperature: float = 1.0, max_turns: int = 3) -> dict:
    """The policy in ``model_dir`` on the 100 records, exactly, from its log-probs under
    teacher forcing (no sampling noise), with the ``ask`` environment's replies:

    - ``expected_reward``: mean over records of the probability that a rollout of at most
      ``max_turns`` turns ends with the right answer: the sum over k < ``max_turns`` of
      P(k times "ask" EOS, each followed by the reply, then the answer digit, EOS) (up to
      special tokens that the decoded text skips);
    - ``p_ask``: mean P("ask" EOS) on the first turn;
    - ``direct_reward``: mean P(the right digit, EOS) on the first turn.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    recs = records()
    eos = tok.eos_token_id

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def path_logp(asks: int) -> torch.Tensor:
        """log P of the model's tokens of the path with ``asks`` asks, per record."""
        seqs, masks = [], []
        for r in recs:
            seq = tok(r["prompt"])["input_ids"]
            mask = [False] * len(seq)
            for _ in range(asks):
                env = ids(reply(r["hidden"]))
                seq += ids(ASK) + [eos] + env
                mask += [True, True] + [False] * len(env)
            seq += ids(r["answer"]) + [eos]
            mask += [True, True]
            seqs.append(seq)
            masks.append(mask)
        x, m = torch.tensor(seqs), torch.tensor(masks)
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits[:, :-1].float() / temperature, -1)
        tok_lp = logp.gather(2, x[:, 1:, None])[..., 0]
        return (tok_lp * m[:, 1:]).sum(1)

    paths = torch.stack([path_logp(k) for k in range(max_turns)]).exp()  # [turns, 100]
    prompts = [tok(r["prompt"])["input_ids"] for r in recs]
    x = torch.tensor([p + ids(ASK) + [eos] for p in prompts])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[:, :-1].float() / temperature, -1)
    p = len(prompts[0])
    ask_lp = logp.gather(2, x[:, 1:, None])[..., 0][:, p - 1:].sum(1)
    return {"expected_reward": float(paths.sum(0).mean()), "p_ask": float(ask_lp.exp().mean()),
            "direct_reward": float(paths[0].mean())}
