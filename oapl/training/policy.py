"""A Hugging Face causal LM seen as a policy for ``oapl_kernels``.

The loss needs the final hidden states (after the model's last norm) and the lm_head weight,
never the full logits: ``Policy.hidden_states`` runs the decoder stack only. With
``model.lora`` the model is wrapped with a PEFT adapter (``oapl.training.lora``): only the
adapter trains, pushes hand over the adapter, and checkpoints hold it instead of the model.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from ..config import LoraConfig
from ..engine.adapter import ADAPTER_FILE, AdapterWeights


def attention_implementation(dtype: torch.dtype, device: torch.device) -> str:
    """"flash_attention_2" on CUDA with 16-bit weights when the flash-attn package is
    installed (the GPU extra), else "sdpa"."""
    usable = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    return "flash_attention_2" if usable and importlib.util.find_spec("flash_attn") else "sdpa"


class Policy(torch.nn.Module):
    """``model``: an ``AutoModelForCausalLM`` whose logits are ``hidden @ lm_head.weight.T``
    (Llama, Qwen2, Mistral, ...; not models with logit soft-capping or scaling). ``lora``
    with a rank > 0: train a LoRA adapter on it instead (``oapl.training.lora.wrap``; PEFT
    draws the adapter's initial values from torch's global RNG); ``base_path``: the base
    model's directory, which the adapter's config names."""

    def __init__(self, model: torch.nn.Module, lora: LoraConfig | None = None,
                 base_path: str | None = None):
        super().__init__()
        decoder = model.get_decoder()
        if decoder is None or decoder is model:
            raise ValueError(f"{type(model).__name__} exposes no separate decoder stack")
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(model.config, attr, None):
                raise ValueError(f"{type(model).__name__} uses {attr}, which the loss ignores")
        self.lora = lora if lora is not None and lora.rank else None
        if self.lora is not None:
            from . import lora as lora_mod

            model = lora_mod.wrap(model, self.lora, base_path)
        self.model = model

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype, device: torch.device,
                        lora: LoraConfig | None = None) -> "Policy":
        """Load ``path`` in ``dtype`` onto ``device``, with flash-attn where it is installed
        and usable (CUDA, 16-bit weights), PyTorch's sdpa otherwise; with ``lora`` (rank > 0)
        a LoRA adapter on it."""
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attention_implementation(dtype, device)
        )
        return cls(model.to(device), lora, os.path.abspath(path))

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
        tied lm_head appears once, under the embedding's name. With LoRA: the base weights with
        the adapter merged in (new tensors)."""
        if self.lora is not None:
            from .lora import merged_weights

            yield from merged_weights(self.model)
            return
        for name, p in self.model.named_parameters():
            yield name, p.detach()

    @property
    def pushes_adapter(self) -> bool:
        """Whether a push hands the engine the adapter alone (LoRA with ``push: adapter``)."""
        return self.lora is not None and self.lora.push == "adapter"

    def push_weights(self) -> Iterator[tuple[str, torch.Tensor]] | AdapterWeights:
        """What the engine takes: the adapter (``AdapterWeights``, live tensors) when
        ``pushes_adapter``, else ``named_weights``."""
        if self.pushes_adapter:
            from .lora import adapter_weights

            return adapter_weights(self.model)
        return self.named_weights()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer steps: all of them, or the adapter's with LoRA."""
        return [p for p in self.parameters() if p.requires_grad]

    def frozen_copy(self, weights=None):
        """With LoRA: the same base with a frozen copy of the adapter (``weights``, or the
        current adapter), for log pi_lag (``oapl.training.lora.frozen_adapter``)."""
        from .lora import frozen_adapter

        return frozen_adapter(self, weights)

    def save_weights(self, directory: str) -> None:
        """The trained weights into ``directory``: ``model.safetensors`` (tied weights once),
        or with LoRA the adapter as a PEFT directory (``adapter_model.safetensors``,
        ``adapter_config.json`` naming the base model)."""
        if self.lora is not None:
            from .lora import adapter_weights

            adapter_weights(self.model).save(directory)
            return
        safetensors.torch.save_model(self.model, os.path.join(directory, "model.safetensors"))

    def load_weights(self, directory: str) -> None:
        """Restore what ``save_weights`` wrote."""
        device = str(next(self.parameters()).device)
        if self.lora is not None:
            from .lora import load_adapter_tensors

            path = os.path.join(directory, ADAPTER_FILE)
            if not os.path.isfile(path):
                raise ValueError(f"{directory} holds no adapter ({ADAPTER_FILE}): it was not "
                                 "written by a model.lora run")
            load_adapter_tensors(self.model, safetensors.torch.load_file(path, device=device))
            return
        safetensors.torch.load_model(self.model, os.path.join(directory, "model.safetensors"),
                                     device=device)

    def save_pretrained(self, directory: str, merge_lora: bool = False) -> None:
        """The model as a HF directory; with LoRA the adapter as a PEFT directory naming its
        base, or with ``merge_lora`` the base with the adapter merged in (a plain model)."""
        if self.lora is None:
            self.model.save_pretrained(directory)
        elif merge_lora:
            state = {name: t.cpu() for name, t in self.named_weights()}
            self.model.get_base_model().save_pretrained(directory, state_dict=state)
        else:
            from .lora import adapter_weights

            adapter_weights(self.model).save(directory)
