"""A forward hook for Hugging Face causal LMs: hand the last hidden states and the lm_head to a
loss instead of computing the [B, S, V] logits.

``add_hidden_head(model)`` patches ``model.forward`` in place (like Liger's
``apply_liger_kernel_to_*`` or TRL's ``add_fused_lm_head``, which it wraps rather than replaces):
``model(input_ids=..., attention_mask=..., hidden_head=fn)`` runs the backbone only and returns
``fn(hidden, lm_head)``, with ``hidden`` [B, S, D] (after the final norm) and ``lm_head`` the
output-embedding module; without ``hidden_head`` the previous forward runs unchanged, so
generation and TRL's own fused log-probs keep working. Calling through the model (rather than
its backbone directly) keeps the wrappers around it in the loop: DDP's gradient hooks,
accelerate's autocast, PEFT's adapters.
"""
from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch

# Config attributes that change the logits after the lm_head matmul; the fused loss computes
# plain hidden @ weight.T / temperature, so a model with any of them set is refused.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def add_hidden_head(model: torch.nn.Module) -> None:
    """Patch ``model.forward`` (a transformers causal LM) to accept ``hidden_head=fn``.

    Raises ValueError for a model whose logits are not ``hidden @ lm_head.weight.T``: an lm_head
    with a bias, or a config that scales or soft-caps the logits.
    """
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) weight")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}'s lm_head has a bias; the fused OAPL loss supports none")
    text_config = model.config.get_text_config()
    for name in _LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value not in (None, 1.0):
            raise ValueError(f"{type(model).__name__} sets config.{name}={value}: the fused OAPL loss computes "
                             "plain hidden @ lm_head.weight.T logits")
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, hidden_head: Callable[[torch.Tensor, torch.nn.Module], Any] | None = None, **kwargs):
        if hidden_head is None:
            return previous(*args, **kwargs)
        if kwargs.pop("labels", None) is not None:
            raise ValueError("hidden_head= computes its own loss; pass no labels")
        kwargs["use_cache"] = False
        # Looked up on every call: PEFT and FSDP replace the backbone's modules after patching.
        out = self.base_model(*args, **kwargs)
        return hidden_head(out.last_hidden_state, self.get_output_embeddings())

    model.forward = types.MethodType(forward, model)
