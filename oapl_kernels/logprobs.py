"""linear_logprobs: per-token log-probs (and entropy) of a linear head without [N, V] logits."""
from __future__ import annotations

import torch

from . import filtering, reference, tuning

IMPLS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' elsewhere; checks that 'triton' can run here."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda":
        from .triton import interpreting

        if not interpreting():
            raise ValueError(
                "impl='triton' on a CPU tensor needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before importing oapl_kernels, or use impl='torch'"
            )
    return impl


def backend(impl: str):
    """The module implementing a resolved impl: :mod:`oapl_kernels.triton` for "triton",
    :mod:`oapl_kernels.reference` for "torch". Both offer forward_stats, backward, FusedChunk."""
    if impl == "triton":
        from . import triton

        return triton
    return reference


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 temperature: float, ignore_index: int) -> None:
    """Raise ValueError/TypeError naming the argument when the inputs cannot be used."""
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be a float32/bfloat16/float16 tensor, got "
                        f"{getattr(hidden, 'dtype', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [V, D] tensor, got shape {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden's last dim {tuple(hidden.shape)[-1:]} must equal weight's D={weight.shape[1]}")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an int64 tensor, got {getattr(targets, 'dtype', type(targets))}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] "
                         f"{tuple(hidden.shape[:-1])}")
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"targets{idx} = {targets[tuple(idx)].item()} is outside [0, V={weight.shape[0]}) "
                         f"and is not ignore_index={ignore_index}")


class _LinearLogprobs(torch.autograd.Function):
    """logp [N] (and entropy [N]) of rows that all have a target; grads to hidden and weight."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, with_entropy, impl, workspace, filter_eps):
        lse, zy, mean = backend(impl).forward_stats(hidden, weight, targets, inv_temp, with_entropy, workspace)
        ctx.save_for_backward(hidden, weight, targets, lse, mean if with_entropy else lse)
        ctx.inv_temp, ctx.with_entropy, ctx.impl, ctx.workspace = inv_temp, with_entropy, impl, workspace
        ctx.filter_eps = filter_eps
        logp = zy - lse
        entropy = lse - mean if with_entropy else None
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, mean = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad_logp = grad_logp.float().contiguous()
        # An entropy nobody differentiated arrives as zeros: the cheaper log-prob-only backward.
        if ctx.with_entropy and grad_entropy is not None and bool(grad_entropy.any()):
            grad_entropy = grad_entropy.float().contiguous()
        else:
            grad_entropy = None
        dh, dw = backend(ctx.impl).backward(hidden, weight, targets, ctx.inv_temp, lse, mean, grad_logp,
                                            grad_entropy, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                            ctx.workspace, ctx.filter_eps)
        return dh, dw, None, None, None, None, None, None


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    temperature: float = 1.0, ignore_index: int = -100,
                    return_entropy: bool = False, impl: str = "auto", workspace_bytes: int | None = None,
                    grad_filter_eps: float = 0.0):
    """Log-probs of ``targets`` under softmax(hidden @ weight.T / temperature), never forming the logits.

    Args:
        hidden: [..., D] float32, bfloat16 or float16 (e.g. an LLM's last hidden states).
        weight: [V, D], same dtype and device (e.g. the lm_head weight).
        targets: [...] int64 token ids in [0, V), or ``ignore_index``.
        temperature: logits are divided by it (> 0), in the forward and the gradients.
        ignore_index: targets equal to it give log-prob 0 (and entropy 0) and no gradient.
        return_entropy: also return the entropy of each token's distribution, differentiable.
        impl: "auto" (Triton on CUDA, chunked PyTorch elsewhere), "torch" or "triton"
            ("triton" on the CPU needs TRITON_INTERPRET=1).
        workspace_bytes: memory the op may use beyond its inputs, outputs, gradients and O(N)
            per-token statistics (int bytes; None: 2 GiB on CUDA, 64 MiB elsewhere). The env
            variable OAPL_WORKSPACE_MB overrides it (see :mod:`oapl_kernels.tuning`).
        grad_filter_eps: in [0, 1); > 0: the backward skips the vocab blocks whose softmax
            probabilities are all below it for every row (never a block holding a target), an
            approximation of the gradient (:mod:`oapl_kernels.filtering`); 0 (default): exact.

    On the torch path a row's log-prob and entropy are bitwise the same whatever other rows
    share the call (fixed GEMM tiles, see ``tuning.ROW_TILE``), at a fixed torch thread count.

    Returns:
        logp [...] float32, or (logp, entropy) both [...] float32 when ``return_entropy``.
        Differentiable w.r.t. hidden and weight; the gradients have their dtypes.
    """
    check_inputs(hidden, weight, targets, temperature, ignore_index)
    filter_eps = filtering.check_eps(grad_filter_eps)
    impl = resolve_impl(impl, hidden.device)
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1).long()
    keep = y != ignore_index
    if not bool(keep.any()):  # nothing to score: zeros that still connect to the graph
        zero = (hidden.sum() * 0.0 + weight.sum() * 0.0).float().expand(shape).clone()
        return (zero, zero.clone()) if return_entropy else zero
    compact = not bool(keep.all())
    if compact:
        rows = keep.nonzero().squeeze(1)
        h, y = h[rows], y[rows]
    if h.stride(-1) != 1 or h.stride(0) != h.shape[1]:
        h = h.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    workspace = tuning.workspace_bytes(hidden.device, workspace_bytes)
    logp, entropy = _LinearLogprobs.apply(h, w, y, 1.0 / float(temperature), return_entropy, impl, workspace,
                                          filter_eps)
    if compact:
        logp = logp.new_zeros(keep.shape).index_put((rows,), logp)
        if return_entropy:
            entropy = entropy.new_zeros(keep.shape).index_put((rows,), entropy)
    logp = logp.reshape(shape)
    return (logp, entropy.reshape(shape)) if return_entropy else logp
