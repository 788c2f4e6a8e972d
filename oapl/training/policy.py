"""A Hugging Face causal LM seen as a policy for ``oapl_kernels``.

The loss needs the final hidden states (after the model's last norm) and the lm_head weight,
never the full logits: ``Policy.hidden_states`` runs the decoder stack only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import torch
from transformers import AutoModelForCausalLM


def attention_implementation(dtype: torch.dtype, device: torch.device) -> str:
    """"flash_attention_2" on CUDA with 16-bit weights when the flash-attn package is
    installed (the GPU extra), else "sdpa"."""
    usable = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    return "flash_attention_2" if usable and importlib.util.find_spec("flash_attn") else "sdpa"


class Policy(torch.nn.Module):
    """``model``: an ``AutoModelForCausalLM`` whose logits are ``hidden @ lm_head.weight.T``
    (Llama, Qwen2, Mistral, ...; not models with logit soft-capping or scaling)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        decoder = model.get_decoder()
        if decoder is None or decoder is model:
            raise ValueError(f"{type(model).__name__} exposes no separate decoder stack")
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(model.config, attr, None):
                raise ValueError(f"{type(model).__name__} uses {attr}, which the loss ignores")

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype, device: torch.device) -> "Policy":
        """Load ``path`` in ``dtype`` onto ``device``, with flash-attn where it is installed
        and usable (CUDA, 16-bit weights), PyTorch's sdpa otherwise."""
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attention_implementation(dtype, device)
        )
        return cls(model.to(device))

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, D], the output projection (tied to the embeddings in some models)."""
        return self.model.get_output_embeddings().weight

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, L] (right padding) -> last hidden states [B, L, D],
        final norm applied; position t predicts token t + 1."""
        out = self.model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        )
        return out.last_hidden_state

    def packed_hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                             **attn_kwargs) -> torch.Tensor:
        """Packed rows (``oapl.training.packing``): input_ids, position_ids [R, W] int64, the
        positions restarting at 0 at each sequence -> last hidden states [R, W, D]. No
        attention mask and no cache, so attention stays within each sequence (transformers'
        packed-sequence detection); ``attn_kwargs``: flash-attn's varlen arguments."""
        out = self.model.get_decoder()(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, **attn_kwargs
        )
        return out.last_hidden_state

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF checkpoint name, detached tensor) of every parameter, for the generator; a
        tied lm_head appears once, under the embedding's name."""
        for name, p in self.model.named_parameters():
            yield name, p.detach()
