"""optimal_values, oapl_loss and grpo_loss: input checks, V* and A from the rewards, and the
dispatch between the fused path (:mod:`oapl_kernels.fused`) and the unfused one (token
log-probs from :func:`linear_logprobs`, then autograd). The objectives themselves are in
:mod:`oapl_kernels.objective`, shared by both paths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import filtering, tuning
from .fused import FusedOAPL, plan
from .logprobs import backend, check_inputs, linear_logprobs, resolve_impl
from .objective import SEQUENCE, TOKEN, OAPLObjective, grpo_token_terms

_IGNORE = -100


@dataclass
class LossOutput:
    """What a policy loss returns. Everything except ``loss`` is detached.

    loss: scalar, differentiable w.r.t. hidden and weight.
    logprobs: [B, T] fp32 token log-probs under the current policy (0 off the mask).
    advantages: [B] fp32.
    values: [B] fp32 group value per sequence (OAPL's V*; GRPO's group mean reward).
    residuals: [B] fp32 OAPL residuals (None for GRPO).
    seq_logratio_mean: scalar, mean over sequences of sum_t mask (logp - inference_logprobs).
    entropy_mean: scalar, mean token entropy over the mask.
    clip_frac: scalar, share of masked tokens whose ratio was clipped (GRPO; None for OAPL).
    weighting: how a trainer weights the micro-batches of one optimizer step so that their
        sum equals the full-batch loss: "sequence" (the loss is a mean over sequences, OAPL:
        weight by the micro-batch's share of the batch's sequences) or "token" (a mean over
        completion tokens, GRPO: weight by its share of the masked tokens).
    """

    loss: torch.Tensor
    logprobs: torch.Tensor
    advantages: torch.Tensor
    values: torch.Tensor
    residuals: torch.Tensor | None
    seq_logratio_mean: torch.Tensor
    entropy_mean: torch.Tensor
    clip_frac: torch.Tensor | None = None
    weighting: str = SEQUENCE


def _check_finite(name: str, x: torch.Tensor) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"{name}{idx} is {x[tuple(idx)].item()}: {name} must be finite")


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards [B] (consecutive groups) or [P, G] -> fp32 [P, G], validated."""
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not torch.is_tensor(rewards) or not rewards.is_floating_point():
        raise TypeError("rewards must be a float tensor")
    _check_finite("rewards", rewards)
    if rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(f"rewards of shape {tuple(rewards.shape)} must have group_size={group_size} columns")
        return rewards.float()
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B] with B a multiple of group_size={group_size} "
                         f"(or [P, G]); got shape {tuple(rewards.shape)}")
    return rewards.float().view(-1, group_size)


def optimal_values(rewards: torch.Tensor, *, group_size: int, beta1: float) -> torch.Tensor:
    """OAPL's optimal value per prompt: V* = beta1 * log(mean_i exp(r_i / beta1)).

    Args:
        rewards: [B] float, consecutive groups of ``group_size`` completions of one prompt,
            or [P, G] with G == group_size.
        group_size: completions per prompt, G.
        beta1: > 0. Large beta1 tends to the group mean, small beta1 to the group max.

    Returns:
        [B // group_size] fp32. Computed in float64 as
        max_i r_i + beta1 * log1p(mean_i expm1((r_i - max r) / beta1)): no overflow when r / beta1
        is in the thousands, and no cancellation when beta1 is large (V* -> mean).
    """
    if not beta1 > 0:
        raise ValueError(f"beta1 must be > 0, got {beta1}")
    r = _groups(rewards, group_size).double()
    top = r.amax(dim=1)
    v = top + beta1 * torch.log1p(torch.expm1((r - top[:, None]) / beta1).mean(dim=1))
    return v.float()


def _check_batch(hidden, targets, inference_logprobs, rewards, mask, group_size):
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, D], got shape {tuple(hidden.shape)}")
    bt = tuple(hidden.shape[:2])
    for name, x in (("targets", targets), ("inference_logprobs", inference_logprobs), ("mask", mask)):
        if tuple(x.shape) != bt:
            raise ValueError(f"{name} shape {tuple(x.shape)} must equal hidden.shape[:2] {bt}")
    if rewards.shape != (bt[0],):
        raise ValueError(f"rewards shape {tuple(rewards.shape)} must be [B] = ({bt[0]},)")
    if bt[0] % group_size:
        raise ValueError(f"B={bt[0]} must be a multiple of group_size={group_size}")
    _groups(rewards, group_size)


def _token_logprobs(hidden, weight, targets, mask, temperature, impl, workspace_bytes, grad_filter_eps):
    """Masked token log-probs and entropies [B, T] (0 off the mask) and the bool mask."""
    m = mask.bool() if mask.dtype != torch.bool else mask
    tgt = torch.where(m, targets, torch.full_like(targets, _IGNORE))
    logp, ent = linear_logprobs(hidden, weight, tgt, temperature=temperature, ignore_index=_IGNORE,
                                return_entropy=True, impl=impl, workspace_bytes=workspace_bytes,
                                grad_filter_eps=grad_filter_eps)
    return logp, ent, m


def _masked_ref(inference_logprobs: torch.Tensor, m: torch.Tensor, name: str = "inference_logprobs") -> torch.Tensor:
    """Sampler log-probs in fp32 with everything off the mask (NaN included) set to 0; a
    non-finite value on the mask raises, naming its index."""
    ref = torch.where(m, inference_logprobs.float(), torch.zeros((), device=m.device))
    _check_finite(name, ref)
    return ref


def _fused_oapl(hidden, weight, targets, m, objective, temperature, impl, workspace_bytes, grad_filter_eps):
    """(loss, logp [B, T], entropy [B, T], residuals [B]) through :class:`FusedOAPL`, which sees
    only the masked positions (gathered here, sequence-major)."""
    tgt = torch.where(m, targets, torch.full_like(targets, _IGNORE))
    check_inputs(hidden, weight, tgt, temperature, _IGNORE)
    chunk_type = backend(resolve_impl(impl, hidden.device)).FusedChunk
    rows_kept = m.reshape(-1).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1])[rows_kept]
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    lengths = m.sum(dim=1).tolist()
    rows, side_buffer = plan(chunk_type, tuning.workspace_bytes(hidden.device, workspace_bytes), w,
                             max(lengths, default=0))
    loss, logp_k, ent_k, res = FusedOAPL.apply(h, w, tgt.reshape(-1)[rows_kept], lengths, objective,
                                               1.0 / float(temperature), chunk_type, rows, side_buffer,
                                               filtering.check_eps(grad_filter_eps))
    logp = logp_k.new_zeros(m.numel()).index_put_((rows_kept,), logp_k).view(m.shape)
    ent = ent_k.new_zeros(m.numel()).index_put_((rows_kept,), ent_k).view(m.shape)
    return loss, logp, ent, res


def oapl_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              inference_logprobs: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, *,
              group_size: int, beta1: float, beta2: float, temperature: float = 1.0,
              values: torch.Tensor | None = None, impl: str = "auto", fused: bool = True,
              workspace_bytes: int | None = None, grad_filter_eps: float = 0.0) -> LossOutput:
    """OAPL loss mean_i (beta2 * (log pi_theta(y_i) - log pi_vllm(y_i)) - A_i)^2, fused.

    Args:
        hidden: [B, T, D] float (fp32/bf16/fp16) hidden states; hidden[:, t] predicts targets[:, t].
        weight: [V, D] lm_head weight, same dtype.
        targets: [B, T] int64 token ids (only read where mask is set).
        inference_logprobs: [B, T] float, the sampler's log-probs of targets (pi_vllm).
            Values off the mask are ignored, NaN included.
        rewards: [B] float, finite; consecutive groups of ``group_size`` share a prompt.
        mask: [B, T] bool or float 0/1, 1 on completion tokens. An all-zero row (empty
            completion) is valid: its log-prob sum is 0.
        group_size: G, completions per prompt.
        beta1: > 0, temperature of the optimal value V*.
        beta2: > 0, weight of the KL-regularized log-ratio.
        temperature: sampling temperature (logits are divided by it).
        values: optional precomputed V*, [B // group_size] or [B] (offline data).
        impl: "auto", "torch" or "triton" (see :func:`linear_logprobs`).
        fused: when a gradient is needed, finish it inside the forward (3 GEMM-equivalents
            instead of 4; 4 on the rows of completions longer than a chunk when the side buffer
            does not fit the workspace, see :mod:`oapl_kernels.fused`); the backward then only
            scales the stored dH and dW.
            False: forward, then a recomputing backward.
        workspace_bytes: memory the op may use beyond its inputs, outputs, gradients and O(N)
            per-token statistics, whatever the completion lengths (int bytes; None: 2 GiB on
            CUDA, 64 MiB elsewhere; OAPL_WORKSPACE_MB overrides it, see :mod:`oapl_kernels.tuning`).
        grad_filter_eps: in [0, 1); > 0: the gradient skips the vocab blocks whose softmax
            probabilities are all below it in every row of a chunk (never a target's block),
            see :mod:`oapl_kernels.filtering`; 0 (default): exact. The loss and log-probs are
            never filtered.

    Returns:
        :class:`LossOutput`; ``loss`` differentiable w.r.t. hidden and weight.
    """
    if not beta1 > 0:
        raise ValueError(f"beta1 must be > 0, got {beta1}")
    if not beta2 > 0:
        raise ValueError(f"beta2 must be > 0, got {beta2}")
    _check_batch(hidden, targets, inference_logprobs, rewards, mask, group_size)
    m = mask.bool() if mask.dtype != torch.bool else mask
    seq_ref = _masked_ref(inference_logprobs, m).sum(dim=1)
    r = rewards.float()
    if values is None:
        v = optimal_values(r, group_size=group_size, beta1=beta1).repeat_interleave(group_size)
    else:
        v = values.float().reshape(-1)
        _check_finite("values", v)
        if v.numel() * group_size == r.numel():
            v = v.repeat_interleave(group_size)
        elif v.numel() != r.numel():
            raise ValueError(f"values must be [B // group_size] or [B], got shape {tuple(values.shape)}")
    objective = OAPLObjective(seq_ref, r - v, float(beta2))
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if fused and needs_grad:
        loss, logp, ent, res = _fused_oapl(hidden, weight, targets, m, objective, temperature, impl,
                                           workspace_bytes, grad_filter_eps)
    else:
        logp, ent, m = _token_logprobs(hidden, weight, targets, m, temperature, impl, workspace_bytes,
                                       grad_filter_eps)
        res = objective.residuals(logp.sum(dim=1))
        loss = objective.loss(res)
    n_tok = m.sum().clamp(min=1)
    return LossOutput(
        loss=loss, logprobs=logp.detach(), advantages=objective.advantages, values=v, residuals=res.detach(),
        seq_logratio_mean=objective.log_ratio(res.detach()).mean(), entropy_mean=(ent.detach() * m).sum() / n_tok,
        weighting=objective.weighting,
    )


def grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              inference_logprobs: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, *,
              group_size: int, clip_eps: float = 0.2, temperature: float = 1.0,
              old_logprobs: torch.Tensor | str | None = None, tis_cap: float | None = None,
              scale_rewards: bool = True, impl: str = "auto", workspace_bytes: int | None = None,
              grad_filter_eps: float = 0.0) -> LossOutput:
    """GRPO baseline: group-normalized advantages, token-level clipped ratio, optional truncated IS.

    The ratio is pi_theta / pi_old per token, where pi_old is
      - the sampler's ``inference_logprobs`` when ``old_logprobs`` is None (PPO-clip against
        the behaviour policy);
      - ``old_logprobs`` [B, T] when given (e.g. the trainer's own log-probs of the weights that
        sampled the data);
      - the current policy, detached, when ``old_logprobs="detached"``: the ratio is 1 in value
        and its gradient is that of log pi_theta, so with ``tis_cap`` the loss is a truncated-IS
        policy gradient, the usual choice when the sampler lags many steps behind.
    With ``tis_cap``, each token's surrogate is weighted by the detached
    min(pi_old / pi_vllm, tis_cap) (truncated importance sampling). The loss is the mean over
    all masked tokens of -w * min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A).

    Shapes and dtypes (and ``impl``, ``workspace_bytes``, ``grad_filter_eps``) as in :func:`oapl_loss`;
    A_i = (r_i - mean_g r) / (std_g r + 1e-6) (``scale_rewards=False`` keeps r_i - mean_g r).
    The per-token terms are :func:`oapl_kernels.objective.grpo_token_terms`.
    """
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    if tis_cap is not None and not tis_cap > 0:
        raise ValueError(f"tis_cap must be > 0, got {tis_cap}")
    _check_batch(hidden, targets, inference_logprobs, rewards, mask, group_size)
    logp, ent, m = _token_logprobs(hidden, weight, targets, mask, temperature, impl, workspace_bytes,
                                   grad_filter_eps)
    r = _groups(rewards, group_size)
    mean = r.mean(dim=1, keepdim=True)
    adv = r - mean
    if scale_rewards:
        adv = adv / (r.std(dim=1, keepdim=True, unbiased=False) + 1e-6)
    adv, mean = adv.reshape(-1), mean.expand_as(r).reshape(-1)
    ref = _masked_ref(inference_logprobs, m)
    if isinstance(old_logprobs, str):
        if old_logprobs != "detached":
            raise ValueError(f"old_logprobs must be a tensor, None or 'detached', got {old_logprobs!r}")
        old = logp.detach()
    else:
        old = ref if old_logprobs is None else _masked_ref(old_logprobs, m, "old_logprobs")
    surrogate, clipped = grpo_token_terms(logp, old, ref, adv, clip_eps, tis_cap)
    n_tok = m.sum().clamp(min=1)
    loss = -(surrogate * m).sum() / n_tok
    return LossOutput(
        loss=loss, logprobs=logp.detach(), advantages=adv, values=mean, residuals=None,
        seq_logratio_mean=(logp.detach() - ref).sum(dim=1).mean(),
        entropy_mean=(ent.detach() * m).sum() / n_tok, clip_frac=(clipped & m).sum() / n_tok,
        weighting=TOKEN,
    )


class OAPLLoss(torch.nn.Module):
    """Module form of :func:`oapl_loss` for users' trainers.

    ``OAPLLoss(beta1=1.0, beta2=0.05, group_size=8)(hidden, lm_head_weight, targets,
    inference_logprobs, rewards, mask)`` returns a :class:`LossOutput`.
    """

    def __init__(self, *, beta1: float, beta2: float, group_size: int, temperature: float = 1.0,
                 impl: str = "auto", workspace_bytes: int | None = None, grad_filter_eps: float = 0.0):
        super().__init__()
        if not beta1 > 0 or not beta2 > 0:
            raise ValueError(f"beta1 and beta2 must be > 0, got {beta1}, {beta2}")
        self.beta1, self.beta2, self.group_size = beta1, beta2, group_size
        self.temperature, self.impl, self.workspace_bytes = temperature, impl, workspace_bytes
        self.grad_filter_eps = filtering.check_eps(grad_filter_eps)

    def forward(self, hidden, weight, targets, inference_logprobs, rewards, mask, values=None):
        return oapl_loss(hidden, weight, targets, inference_logprobs, rewards, mask,
                         group_size=self.group_size, beta1=self.beta1, beta2=self.beta2,
                         temperature=self.temperature, values=values, impl=self.impl,
                         workspace_bytes=self.workspace_bytes, grad_filter_eps=self.grad_filter_eps)

    def extra_repr(self) -> str:
        return (f"beta1={self.beta1}, beta2={self.beta2}, group_size={self.group_size}, "
                f"temperature={self.temperature}, grad_filter_eps={self.grad_filter_eps}")
