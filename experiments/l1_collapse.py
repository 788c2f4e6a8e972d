"""Why an OAPL run at L = 1 on ``toy:max`` can stall near 0.47 (issue 18, part 4).

    .venv/bin/python experiments/l1_collapse.py RUN_DIR [RUN_DIR ...] --out experiments/l1_collapse

For each run (``oapl train`` output with checkpoints every few steps) and each of its
checkpoints ``step_N``, the exact policy on the 100 ``toy:max`` prompts, from the model's
log-probs (no sampling):

- ``p_correct``: mean over prompts of P(right digit) * P(EOS | it) (the exact expected reward);
- ``entropy_answer``: mean entropy (nats) of the answer digit's distribution;
- ``locked_wrong``: share of prompts whose most likely digit is wrong and has P >= 0.9 (all 8
  samples of such a prompt are wrong with P >= 0.43, and then A = 0: no signal);
- ``p_no_signal``: mean over prompts of P(a group of 8 is all wrong or all right), i.e. of a
  group with A = 0 for every sample;
- ``rule_max``: share of prompts (a != b) whose most likely digit is max(a, b);
- ``per_prompt_top``: the most likely digit of each prompt (prompt 10 a + b is ``max a b =``).

It also reads each run's ``metrics.jsonl`` (reward, entropy, |A|, log-ratio, grad norm), and
writes ``<out>/<run>.json``, ``<out>/summary.json`` and ``<out>/l1_collapse.png``.

``--finals RUN_DIR ...`` instead measures only each run's ``final_model`` (exact reward,
locked prompts, entropy) and counts its clipped steps, into ``<out>/finals.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (REPO, os.path.join(REPO, "experiments")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def exact_policy(model_dir_or_ckpt: str, torch, tiny, toy_task) -> dict:
    """The measures above for one set of weights (a HF directory or a checkpoint dir)."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    if os.path.exists(os.path.join(model_dir_or_ckpt, "config.json")):
        model = AutoModelForCausalLM.from_pretrained(model_dir_or_ckpt, dtype=torch.float32)
    else:
        model = tiny.build_model(0)
        safetensors.torch.load_model(model, os.path.join(model_dir_or_ckpt, "model.safetensors"))
    model.eval()
    tok = tiny.build_tokenizer()
    recs = toy_task("max").records
    digit_ids = torch.tensor([tok.convert_tokens_to_ids(str(d)) for d in range(10)])
    with torch.no_grad():
        prompts = torch.tensor([tok(r["prompt"])["input_ids"] for r in recs])
        logp = torch.log_softmax(model(prompts).logits[:, -1].float(), -1)
        ans = torch.tensor([int(r["answer"]) for r in recs])
        eos = torch.full((len(recs), 1), tok.eos_token_id)
        full = torch.cat([prompts, digit_ids[ans][:, None], eos], 1)
        lp2 = torch.log_softmax(model(full).logits.float(), -1)
        p_eos = lp2[:, prompts.shape[1], tok.eos_token_id].exp()
    pd = logp[:, digit_ids].exp()  # [100, 10] P(digit)
    p_right = pd[torch.arange(len(recs)), ans] * p_eos
    pdn = pd / pd.sum(1, keepdim=True)
    ent = -(pdn * pdn.clamp_min(1e-12).log()).sum(1)
    top_p, top = pd.max(1)
    a = torch.tensor([int(r["prompt"].split()[1]) for r in recs])
    b = torch.tensor([int(r["prompt"].split()[2]) for r in recs])
    neq = a != b
    g = 8
    p_none = (1 - p_right) ** g + p_right**g
    return {
        "p_correct": float(p_right.mean()),
        "entropy_answer": float(ent.mean()),
        "p_eos_after_answer": float(p_eos.mean()),
        "locked_wrong": float(((top != ans) & (top_p >= 0.9)).float().mean()),
        "locked_right": float(((top == ans) & (top_p >= 0.9)).float().mean()),
        "p_no_signal": float(p_none.mean()),
        "rule_max": float((top == ans)[neq].float().mean()),
        "per_prompt_p_correct": [round(float(x), 4) for x in p_right],
        "per_prompt_top": top.tolist(),
    }


def analyze(run_dir: str, torch, tiny, toy_task) -> dict:
    ck = os.path.join(run_dir, "checkpoints")
    steps = sorted(int(d.split("_")[1]) for d in os.listdir(ck) if d.startswith("step_")
                   and not d.endswith(".tmp")) if os.path.isdir(ck) else []
    points = [{"step": 0, **exact_policy(os.path.join(run_dir, "base_model"), torch, tiny,
                                         toy_task)}]
    for s in steps:
        points.append({"step": s, **exact_policy(os.path.join(ck, f"step_{s:08d}"), torch,
                                                 tiny, toy_task)})
    if os.path.isdir(os.path.join(run_dir, "final_model")) and (not steps or steps[-1] < 300):
        points.append({"step": "final", **exact_policy(os.path.join(run_dir, "final_model"),
                                                       torch, tiny, toy_task)})
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    keys = ["reward_mean", "entropy_mean", "adv_abs_mean", "seq_logratio_mean", "grad_norm",
            "loss", "completion_len_mean"]
    return {"run": os.path.basename(run_dir.rstrip("/")), "checkpoints": points,
            "metrics": {k: [m[k] for m in metrics] for k in keys}}


def figure(results: list[dict], path: str) -> None:
    from panels import plot_panels

    runs = []
    for res in results:
        pts = [p for p in res["checkpoints"] if p["step"] != "final"]
        keys = ("p_correct", "entropy_answer", "locked_wrong", "p_no_signal")
        runs.append((res["run"], [p["step"] for p in pts], [[p[k] for p in pts] for k in keys]))
    plot_panels(path, runs, ["exact expected reward (checkpoints)",
                             "entropy of the answer digit (nats)",
                             "prompts locked on a wrong digit (P >= 0.9)",
                             "P(a group of 8 has A = 0 for all), mean over prompts"], marker=".")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="experiments/l1_collapse")
    p.add_argument("--finals", action="store_true", help="only the final models, finals.json")
    args = p.parse_args(argv)
    import torch

    from oapl import tiny
    from oapl.tasks.toy import toy_task

    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    if args.finals:
        out = {}
        for run in args.runs:
            pt = exact_policy(os.path.join(run, "final_model"), torch, tiny, toy_task)
            recs = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
            clip = yaml.safe_load(open(os.path.join(run, "config.yaml")))["trainer"]["grad_clip"]
            out[os.path.basename(run.rstrip("/"))] = {
                "final_exact": pt["p_correct"], "locked_wrong": round(pt["locked_wrong"] * 100),
                "entropy_answer": pt["entropy_answer"],
                "steps_clipped": sum(r["grad_norm"] > clip for r in recs)}
            print(os.path.basename(run.rstrip("/")), out[os.path.basename(run.rstrip("/"))])
        with open(os.path.join(args.out, "finals.json"), "w") as f:
            json.dump(out, f, indent=1)
        return
    results = []
    for run in args.runs:
        res = analyze(run, torch, tiny, toy_task)
        results.append(res)
        with open(os.path.join(args.out, res["run"] + ".json"), "w") as f:
            json.dump(res, f)
        for pt in res["checkpoints"]:
            print(f"{res['run']} step {pt['step']}: p_correct {pt['p_correct']:.3f} "
                  f"H {pt['entropy_answer']:.3f} locked_wrong {pt['locked_wrong']:.2f} "
                  f"no_signal {pt['p_no_signal']:.2f} argmax=max {pt['rule_max']:.2f} "
                  f"eos {pt['p_eos_after_answer']:.3f}")
    summary = {r["run"]: [{k: v for k, v in pt.items() if not k.startswith("per_prompt")}
                          for pt in r["checkpoints"]] for r in results}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    figure(results, os.path.join(args.out, "l1_collapse.png"))


if __name__ == "__main__":
    main()
