"""``oapl.tasks.ask.exact_reward`` against a token-by-token computation of the same paths."""

import pytest
import torch


@pytest.mark.slow
def test_exact_reward_matches_token_by_token(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oapl.config import load_config
    from oapl.model_dir import model_dir
    from oapl.tasks.ask import ASK, exact_reward, records, reply

    cfg = load_config("examples/tiny-multiturn.yaml", [f"output_dir={tmp_path}",
                                                        "model.tiny_format_warmup_steps=20"])
    path = model_dir("tiny", cfg)
    ev = exact_reward(path)
    assert exact_reward(path, max_turns=1)["expected_reward"] == pytest.approx(
        ev["direct_reward"], rel=1e-6)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eos = tok.eos_token_id

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    def p_next(prefix, token):
        with torch.no_grad():
            logits = model(torch.tensor([prefix])).logits[0, -1].float()
        return float(torch.softmax(logits, -1)[token])

    total = []
    for r in records():
        prompt = tok(r["prompt"])["input_ids"]
        paths = 0.0
        for asks in range(3):  # each: the model's tokens multiplied one at a time
            seq, prob = list(prompt), 1.0
            for _ in range(asks):
                for t in ids(ASK) + [eos]:
                    prob *= p_next(seq, t)
                    seq.append(t)
                seq += ids(reply(r["hidden"]))
            for t in ids(r["answer"]) + [eos]:
                prob *= p_next(seq, t)
                seq.append(t)
            paths += prob
        total.append(paths)
    assert ev["expected_reward"] == pytest.approx(sum(total) / len(total), rel=1e-4)
