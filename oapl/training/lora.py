"""LoRA on the policy (``model.lora``) through PEFT: the input checks, wrapping a Hugging Face
model, the adapter as a push payload, the merged weights, a frozen copy of the adapter for
log pi_lag.

Only the adapter trains. The output head stays the base model's: the fused loss reads
``lm_head.weight`` itself, and never the model's logits, so an adapter on it would be ignored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from ..config import LoraConfig
from ..engine.adapter import AdapterWeights, engine_max_rank

ALL_LINEAR = "all-linear"
ADAPTER = "default"  # PEFT's name of the one trained adapter


def _module_names(model: torch.nn.Module) -> tuple[dict[str, list[tuple[str, torch.nn.Linear]]], set[str]]:
    """The model's linear layers by short name (the last part of the module path), and the
    short names of its input and output embeddings."""
    emb = {model.get_input_embeddings(), model.get_output_embeddings()}
    linear: dict[str, list[tuple[str, torch.nn.Linear]]] = {}
    embeddings = set()
    for path, module in model.named_modules():
        short = path.rsplit(".", 1)[-1]
        if module in emb:
            embeddings.add(short)
        elif isinstance(module, torch.nn.Linear):
            linear.setdefault(short, []).append((path, module))
    return linear, embeddings


def check_lora(model: torch.nn.Module, lora: LoraConfig) -> None:
    """Raise ``ValueError`` (one line) unless ``lora`` fits ``model``: every target is a linear
    layer of the model other than its embeddings and output head, there is one at all, and the
    rank is at most every targeted layer's smaller dimension and what vLLM serves."""
    linear, embeddings = _module_names(model)
    name = type(model).__name__
    targets = list(lora.target_modules)
    if ALL_LINEAR in targets:
        if targets != [ALL_LINEAR]:
            raise ValueError(f"model.lora.target_modules: {ALL_LINEAR!r} stands alone, got {targets}")
        chosen = [m for layers in linear.values() for m in layers]
        if not chosen:
            raise ValueError(f"model.lora: {name} has no linear layers besides its embeddings "
                             "and output head to put adapters on")
    else:
        refused = sorted(set(targets) & embeddings)
        if refused:
            raise ValueError(f"model.lora.target_modules: {refused} are the embeddings or the "
                             "output head, which stay the base model's (the fused loss reads the "
                             "lm_head weight itself); target the decoder's linear layers")
        unknown = sorted(set(targets) - set(linear))
        if unknown:
            raise ValueError(f"model.lora.target_modules: {name} has no linear modules named "
                             f"{unknown}; its linear modules: {sorted(linear)}")
        chosen = [m for t in targets for m in linear[t]]
    for path, module in chosen:
        fits = min(module.in_features, module.out_features)
        if lora.rank > fits:
            raise ValueError(f"model.lora.rank {lora.rank} does not fit {path} ({module.in_features}"
                             f" -> {module.out_features}): at most {fits}")
    engine_max_rank(lora.rank)


def wrap(model: torch.nn.Module, lora: LoraConfig, base_path: str | None) -> PeftModel:
    """``model`` with a trainable LoRA adapter (``check_lora`` first), its own weights frozen.
    PEFT's initialization: lora_A random (from torch's global RNG), lora_B zero, so the
    wrapped model starts equal to ``model``. ``base_path``: recorded in the adapter's config."""
    check_lora(model, lora)
    targets = list(lora.target_modules)
    config = PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
        base_model_name_or_path=base_path,
    )
    return get_peft_model(model, config)


def adapter_config(model: PeftModel) -> dict:
    """The trained adapter's ``adapter_config.json`` mapping (JSON types only)."""
    out = model.peft_config[ADAPTER].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in out.items()}


def adapter_weights(model: PeftModel) -> AdapterWeights:
    """The trained adapter (its live tensors, detached: copy them before the next step)."""
    tensors = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return AdapterWeights({k: t.detach() for k, t in tensors.items()}, adapter_config(model))


def _adapter_params(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The trained adapter's parameters under the names ``adapter_weights`` gives them."""
    names = set(get_peft_model_state_dict(model, adapter_name=ADAPTER))
    params = {n.replace(f".{ADAPTER}", ""): p for n, p in model.named_parameters()
              if ".lora_" in n and f".{ADAPTER}." in n}
    if set(params) != names:
        raise RuntimeError("the adapter's parameters do not match PEFT's state dict")
    return params


def load_adapter_tensors(model: PeftModel, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (``adapter_weights``' names, all of them) into the trained adapter."""
    params = _adapter_params(model)
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"the adapter does not match the model's: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])


def merged_weights(model: PeftModel) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every weight of the base with the adapter merged in
    (W + (alpha / r) B A on each adapted layer), without changing the model; a tied lm_head
    appears once, under the embedding's name."""
    base = model.get_base_model()
    deltas = {}
    with torch.no_grad():
        for path, module in base.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                deltas[f"{path}.base_layer.weight"] = module.get_delta_weight(ADAPTER)
        for name, p in base.named_parameters():
            if ".lora_" in name:
                continue
            w = p.detach() + deltas[name].to(p.dtype) if name in deltas else p.detach()
            yield name.replace(".base_layer.", "."), w


class FrozenAdapter:
    """The policy's base with a frozen copy of its adapter (``tensors``; None: no adapter, the
    base model itself), for log pi_lag: the same interface as ``Policy`` for forwards
    (``hidden_states``, ``packed_hidden_states``, ``lm_head_weight``, ``model``), one more copy
    of the adapter in memory instead of a second model. Each forward swaps the frozen tensors
    into the trained adapter's parameters, in eval mode, and swaps the trained ones back; call
    it under ``torch.no_grad`` outside any forward whose backward is pending."""

    def __init__(self, policy, tensors: dict[str, torch.Tensor] | None):
        self.policy = policy
        self.model = policy.model
        self.tensors = tensors

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.policy.lm_head_weight

    @contextlib.contextmanager
    def _applied(self):
        model = self.model
        training = model.training
        model.eval()
        try:
            if self.tensors is None:
                with model.disable_adapter():
                    yield
                return
            params = _adapter_params(model)
            trained = {k: p.detach().clone() for k, p in params.items()}
            load_adapter_tensors(model, self.tensors)
            try:
                yield
            finally:
                load_adapter_tensors(model, trained)
        finally:
            model.train(training)

    def hidden_states(self, *args, **kwargs) -> torch.Tensor:
        with torch.no_grad(), self._applied():
            return self.policy.hidden_states(*args, **kwargs)

    def packed_hidden_states(self, *args, **kwargs) -> torch.Tensor:
        with torch.no_grad(), self._applied():
            return self.policy.packed_hidden_states(*args, **kwargs)


def frozen_adapter(policy, weights=None) -> FrozenAdapter:
    """``FrozenAdapter`` of ``policy``'s current adapter, or of ``weights``: an
    ``AdapterWeights``, or full (HF name, tensor) pairs, which must be the base model's own
    (e.g. the model that sampled a rollout file): the base with no adapter."""
    model = policy.model
    if weights is None:
        return FrozenAdapter(policy, {k: t.clone() for k, t in adapter_weights(model).tensors.items()})
    if isinstance(weights, AdapterWeights):
        return FrozenAdapter(policy, {k: t.detach().clone() for k, t in weights.tensors.items()})
    base = {name.replace(".base_layer.", "."): p for name, p in
            model.get_base_model().named_parameters() if ".lora_" not in name}
    for name, t in weights:
        if name not in base or not torch.equal(base[name], t.to(base[name])):
            raise ValueError("with model.lora the frozen lag policy is the base plus an adapter: "
                             f"weights that differ from the base model's ({name}) cannot be frozen")
    return FrozenAdapter(policy, None)


BASE_KEY = "base"  # frozen_state's one (empty) tensor of a copy that is the base itself


def frozen_state(lag: FrozenAdapter) -> dict[str, torch.Tensor]:
    """``lag``'s frozen adapter as CPU tensors (``adapter_weights``' names) for a checkpoint;
    the base itself (no adapter): one empty tensor under ``BASE_KEY``."""
    if lag.tensors is None:
        return {BASE_KEY: torch.zeros(0)}
    return {k: t.detach().cpu().contiguous() for k, t in lag.tensors.items()}


def frozen_from_state(policy, tensors: dict[str, torch.Tensor]) -> FrozenAdapter:
    """The ``FrozenAdapter`` of ``policy`` that ``frozen_state`` wrote (tensors moved to the
    policy's device; every adapter tensor the model has must be there)."""
    if set(tensors) == {BASE_KEY}:
        return FrozenAdapter(policy, None)
    names = set(_adapter_params(policy.model))
    if set(tensors) != names:
        raise ValueError("a saved frozen adapter does not match the model's adapter: missing "
                         f"{sorted(names - set(tensors))[:3]}, unexpected "
                         f"{sorted(set(tensors) - names)[:3]}")
    device = policy.lm_head_weight.device
    return FrozenAdapter(policy, {k: t.to(device) for k, t in tensors.items()})
