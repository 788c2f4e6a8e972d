"""Peer libraries computing the same per-token log-probs as ``linear_logprobs``.

Both peers return a cross-entropy; per-token log-probs are ``-CE`` with ``reduction="none"``.
They are imported lazily (each function raises ImportError when its package is absent), so
nothing in ``oapl_kernels`` or the CPU suites depends on them. Both are Triton code for CUDA:
call them with CUDA tensors. Wheels (pure Python) can be installed offline with
``pip install --no-deps --no-index .whl/*.whl`` (see docs/PERF.md).
"""
from __future__ import annotations

import torch


def liger_logprobs(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs [N] from Liger-Kernel's fused linear cross-entropy (liger-kernel 0.8.5).

    Calls ``liger_kernel.transformers.functional.liger_fused_linear_cross_entropy(h, w, y,
    reduction="none")`` (= ``LigerFusedLinearCrossEntropyFunction.apply``; note the module form
    ``LigerFusedLinearCrossEntropyLoss.forward(lin_weight, _input, target)`` takes the weight
    first). Semantics: with ``reduction="none"`` Liger 0.8.5 does not compute the gradient in the
    forward (its fast path for mean/sum); it saves h, w, y and recomputes the chunked logits in
    the backward, folding in the per-token upstream gradient. So fwd+bwd here measures Liger's
    recompute path, the one that computes the same quantity as ours. Liger's dW accumulator has
    the parameter dtype (bf16 for bf16 weights) unless ``accum_dtype`` is given; it also needs
    the ``packaging`` module, which its wheel does not declare.

    Args:
        h: [N, D] hidden states (CUDA, fp32/bf16/fp16). w: [V, D], same dtype. y: [N] int64.
    Returns:
        [N] fp32 log-probs, differentiable w.r.t. h and w.
    """
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return -liger_fused_linear_cross_entropy(h, w, y, reduction="none")


def cce_logprobs(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, *,
                 filter_eps: float | str | None = "high") -> torch.Tensor:
    """Per-token log-probs [N] from Cut Cross-Entropy's ``linear_cross_entropy`` (cut-cross-entropy 25.1.1).

    Calls ``cut_cross_entropy.linear_cross_entropy(h, w, y, reduction="none", impl="cce",
    filter_eps=filter_eps)`` (argument names there: e=embeddings, c=classifier). Semantics:
    ``reduction="none"`` is supported with a backward that takes the per-token gradient. The
    default ``filter_eps="high"`` (eps(dtype) / 32) skips gradient tiles whose softmax values
    fall below it, so its gradients are approximate by design (that is CCE's speed trick);
    pass ``filter_eps=None`` for exact gradients. CCE's backward asserts bf16/fp16 ``h`` (fp32
    hidden works in the forward only). The other impl, ``"torch_compile"``, is a compiled
    materializing baseline, not the CCE kernel.

    Args:
        h: [N, D] hidden states (CUDA, bf16/fp16 for a backward). w: [V, D]. y: [N] int64.
        filter_eps: CCE's gradient filter threshold ("high", "auto", a float, or None).
    Returns:
        [N] fp32 log-probs, differentiable w.r.t. h and w.
    """
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(h, w, y, reduction="none", impl="cce", filter_eps=filter_eps).float()
