"""The gap between the engine's log pi_lag and the trainer's at the same weights, on one batch
of a real run's first step, for each engine setting x trainer setting.

    python -m benchmarks.sampler_gap [--config examples/smollm2-cpu.yaml] \
        [--engines bf16,bf16-head32,fp32] [--trainers autocast,fp32] [--json out.json]

Per engine setting (a fresh in-process vLLM engine each: dtype bfloat16 or float32;
``head32``: vLLM's fp32 lm_head, ``hf_overrides={"head_dtype": "float32"}``) it samples the
run's first batch (its prompts, seed and sampling settings) and times the generate call. Per
trainer setting (``autocast``: the config's ``trainer.autocast_dtype``; ``fp32``: none) it
recomputes log pi_lag at the same weights with ``lag_logprobs=recompute`` (a frozen copy,
through the trainer's own forward, packing and head kernel) and reports the signed gap
``sum_t (trainer - sampler)`` per sequence (mean, std, mean |.|) and per token (mean |.|, max),
and the OAPL loss this batch gives at the first step with either log pi_lag
(``metrics.gap_sums``). Per trainer setting it also times one optimizer step (on the first
engine's batch) and the recompute forward itself. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time

import torch

ENGINES = {
    "bf16": dict(dtype="bfloat16"),
    "bf16-head32": dict(dtype="bfloat16", engine_kwargs={"hf_overrides": {"head_dtype": "float32"}}),
    "fp32": dict(dtype="float32"),
}
TRAINERS = ("autocast", "fp32")


def sample(cfg, path, tokenizer, engine: str):
    """The run's first batch from an engine built with setting ``engine``: a TrainBatch and
    the generate call's seconds."""
    from oapl.batch import collate, pad_token_id, score_rollouts
    from oapl.engine.generator import VLLMGenerator
    from oapl.prompts import PromptSampler, load_prompts, sampling_seed
    from oapl.tasks import load_reward

    gen_cfg = dataclasses.replace(cfg.generation, **ENGINES[engine])
    prompts = load_prompts(cfg.data, tokenizer)
    idx = PromptSampler(len(prompts), cfg.data.prompts_per_step, cfg.seed).next_batch()
    gen = VLLMGenerator(path, gen_cfg, seed=cfg.seed)
    try:
        t = time.perf_counter()
        groups = gen.generate([prompts[i].token_ids for i in idx], idx, gen_cfg,
                              seed=sampling_seed(cfg.seed, 0))
        generate_s = time.perf_counter() - t
    finally:
        gen.close()
        gc.collect()
    rollouts = [r for g in groups for r in g]
    reward_fn, workers = load_reward(cfg.data)
    _, rewards, _ = score_rollouts(reward_fn, tokenizer, rollouts,
                                   [prompts[r.prompt_index].record for r in rollouts], workers)
    return collate(rollouts, rewards, pad_token_id(tokenizer)), generate_s


def make_trainer(cfg, path, trainer: str):
    from oapl.training.policy import Policy
    from oapl.training.trainer import LocalTrainer

    c = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer), algorithm=dataclasses.replace(
        cfg.algorithm, lag_logprobs="recompute"))
    if trainer == "fp32":
        c.trainer.autocast_dtype = None
    policy = Policy.from_pretrained(path, getattr(torch, cfg.model.dtype), torch.device("cpu"))
    t = LocalTrainer(policy, c)
    t.freeze_lag_policy(0)
    return t


def measure(trainer, batch) -> dict:
    """The gap of ``batch``'s sampler log-probs against ``trainer``'s recomputed ones."""
    from oapl.metrics import gap_sums
    from oapl_kernels import optimal_values

    t = time.perf_counter()
    ref = trainer.lag_logprobs(batch)
    recompute_s = time.perf_counter() - t
    m, a, n = batch.loss_mask, trainer.cfg.algorithm, trainer.cfg.generation.n
    diff = (ref - batch.sampler_logprobs)[m]
    seq = torch.where(m, ref - batch.sampler_logprobs, 0).double().sum(dim=1)
    adv = batch.rewards - optimal_values(batch.rewards, group_size=n, beta1=a.beta1).repeat_interleave(n)
    # At the first step pi_theta = pi_lag: log pi_theta is the recomputed reference.
    sums = gap_sums(ref, batch.sampler_logprobs, m, ref, adv, a.beta2)
    return {"tokens": int(m.sum()), "seqs": len(batch),
            "gap_token_abs_mean": float(diff.abs().mean()), "gap_token_abs_max": float(diff.abs().max()),
            "gap_token_mean": float(diff.mean()),
            "gap_seq_mean": float(seq.mean()), "gap_seq_std": float(seq.std(unbiased=False)),
            "gap_seq_abs_mean": float(seq.abs().mean()),
            "loss_sampler": float(sums[3] / len(batch)), "loss_recompute": float(sums[4] / len(batch)),
            "recompute_s": recompute_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="examples/smollm2-cpu.yaml")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--trainers", default=",".join(TRAINERS))
    ap.add_argument("--no-train-step", action="store_true", help="skip timing an optimizer step")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from oapl.config import load_config
    from oapl.model_dir import model_dir
    from oapl.run import seed_all, set_threads

    cfg = load_config(args.config, args.overrides)
    set_threads(cfg)
    path = model_dir(cfg.model.path, cfg)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches = {}
    for engine in args.engines.split(","):
        batches[engine] = sample(cfg, path, tokenizer, engine)
        print(f"{engine}: sampled {len(batches[engine][0])} completions in "
              f"{batches[engine][1]:.1f} s", flush=True)
    rows = []
    for trainer_name in args.trainers.split(","):
        seed_all(cfg.seed)
        trainer = make_trainer(cfg, path, trainer_name)
        for engine, (batch, generate_s) in batches.items():
            r = {"engine": engine, "trainer": trainer_name, "generate_s": generate_s,
                 **measure(trainer, batch)}
            rows.append(r)
            print(json.dumps(r), flush=True)
        if not args.no_train_step:
            batch = next(iter(batches.values()))[0]
            batch.lag_logprobs = trainer.lag_logprobs(batch)
            t = time.perf_counter()
            trainer.train_step(batch)
            train_s = time.perf_counter() - t
            for r in rows:
                if r["trainer"] == trainer_name:
                    r["train_step_s"] = train_s
            print(f"{trainer_name}: one optimizer step {train_s:.1f} s", flush=True)
        del trainer
        gc.collect()
    print("\n| engine | trainer | gap/token mean abs (max) | gap/seq mean (std) | gap/seq mean abs "
          "| loss sampler / recompute | generate s | recompute fwd s | train step s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['trainer']} | {r['gap_token_abs_mean']:.4f} "
              f"({r['gap_token_abs_max']:.3f}) | {r['gap_seq_mean']:+.3f} ({r['gap_seq_std']:.3f}) "
              f"| {r['gap_seq_abs_mean']:.3f} | {r['loss_sampler']:.3g} / {r['loss_recompute']:.3g} "
              f"| {r['generate_s']:.1f} | {r['recompute_s']:.1f} | {r.get('train_step_s', float('nan')):.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
