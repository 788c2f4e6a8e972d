"""The generator: a vLLM engine holding a lagged copy of the policy.

``Generator`` is the interface the loop uses; ``VLLMGenerator`` implements it with an
in-process ``vllm.LLM`` (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core and its worker
live in this process, so weights are pushed as tensors, with no serialization and no disk).
By default the engine returns each sampled token's log-probability *after* temperature
(``generation.logprobs_mode="processed_logprobs"``): the distribution the trainer's loss uses.
vLLM's own default, ``raw_logprobs``, is untempered; it is selectable only to show that pitfall.

Weights reach the engine one of two ways: ``load_weights`` (tensors handed over in this process,
e.g. from shared memory) or, with ``generation.weight_transfer: nccl``, vLLM's NCCL weight
transfer (``init_weight_transfer`` once, then per version ``start_weight_update``,
``update_weights``, ``finish_weight_update``; both sides are in
``oapl.engine.transport.nccl``).
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch
from tqdm import tqdm

from ..batch import Rollout
from ..config import GenerationConfig
from ..prompts import Prompt
from .adapter import AdapterDirs, AdapterWeights, adapter_name, engine_max_rank
from .transport.base import wire_dtype


class Generator(Protocol):
    """What the loop needs from a generator."""

    version: int
    logprobs_mode: str  # vLLM's: processed_logprobs (after temperature) or raw_logprobs

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        prompt_indices: Sequence[int],
        sampling: GenerationConfig,
        seed: int,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Rollout]]:
        """``sampling.n`` rollouts per prompt (token ids), grouped per prompt, in prompt order;
        ``sampling`` gives the sampling fields (n, temperature, top_p, top_k, max_tokens);
        ``seeds``: one seed per prompt instead of ``seed + i * n``."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace the engine's weights (Hugging Face parameter names) in place."""


def _reload_weights(worker, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Runs on the vLLM worker: load HF-named tensors into the running model."""
    worker.model_runner.reload_weights(
        weights_iterator=iter(named_tensors), is_checkpoint_format=True
    )


class VLLMGenerator:
    """``vllm.LLM`` in this process, seeded, with log-probs in ``cfg.logprobs_mode``.
    ``cfg`` gives the engine's settings; each ``generate`` call its sampling settings.
    ``lora_rank`` > 0 (``model.lora.rank``): the engine serves LoRA adapters of up to that
    rank on its base weights, and each push is an ``AdapterWeights`` (see ``load_weights``).

    Side effects of building it (vLLM's, undone here where possible): vLLM replaces
    ``torch.set_num_threads`` with a no-op (``torch._C.set_num_threads`` still works) and
    reseeds the global RNGs; the thread count is restored, and callers should seed after
    construction.
    """

    def __init__(self, model_path: str, cfg: GenerationConfig, seed: int = 0,
                 lora_rank: int = 0):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM, SamplingParams

        self._sampling_params_cls = SamplingParams
        self.version = 0
        self.logprobs_mode = cfg.logprobs_mode
        kwargs = dict(
            model=model_path,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            skip_tokenizer_init=cfg.skip_tokenizer_init,
            logprobs_mode=cfg.logprobs_mode,
            seed=seed,
            use_tqdm_on_load=False,  # the loop shows its own progress
        )
        if cfg.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
        if cfg.weight_transfer == "nccl":
            kwargs["weight_transfer_config"] = {"backend": "nccl"}
        if lora_rank:
            kwargs.update(enable_lora=True, max_lora_rank=engine_max_rank(lora_rank), max_loras=1)
        kwargs.update(cfg.engine_kwargs)
        # With LoRA: the adapter of the version held, as vLLM's request, and where it lies.
        self._lora_request = None
        self._adapter_dirs = AdapterDirs() if lora_rank else None
        threads = torch.get_num_threads()
        self.llm = LLM(**kwargs)
        torch._C.set_num_threads(threads)  # the original; vLLM made torch's a no-op
        self._push_dtype = wire_dtype(cfg.dtype)
        # Each push warns that the rotary embedding (a buffer, not a weight) was not loaded.
        reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        reload_log.setLevel(logging.ERROR)

    def _sampling_params(self, c: GenerationConfig, seed: int):
        return self._sampling_params_cls(
            n=c.n,
            temperature=c.temperature,
            top_p=c.top_p,
            top_k=c.top_k,
            max_tokens=c.max_tokens,
            logprobs=0,
            seed=seed,
            detokenize=False,
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        prompt_indices: Sequence[int],
        sampling: GenerationConfig,
        seed: int,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Rollout]]:
        """``sampling.n`` samples per prompt. Prompt ``i`` samples with seed ``seed + i * n``
        (vLLM gives its ``n`` children ``seed + j``), so no two samples share random draws;
        or with ``seeds[i]`` when given (multi-turn: a conversation's seed whatever else
        shares the call)."""
        from vllm.inputs import TokensPrompt

        if len(prompts) != len(prompt_indices):
            raise ValueError(f"{len(prompts)} prompts but {len(prompt_indices)} indices")
        n = sampling.n
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        seeds = seeds if seeds is not None else [seed + i * n for i in range(len(prompts))]
        params = [self._sampling_params(sampling, s) for s in seeds]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False,
            lora_request=self._lora_request,
        )
        groups = []
        for idx, ids, out in zip(prompt_indices, prompts, outs):
            group = []
            for c in out.outputs:
                toks = list(c.token_ids)
                lps = [c.logprobs[j][t].logprob for j, t in enumerate(toks)]
                group.append(Rollout(idx, list(ids), toks, lps, str(c.finish_reason), self.version))
            groups.append(group)
        return groups

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | AdapterWeights,
                     version: int) -> None:
        """Push weights into the running engine (cast to the engine's dtype), then drop the
        prefix cache: its KV entries were computed with the old weights. An ``AdapterWeights``
        (an engine built with ``lora_rank``) becomes the adapter every later request samples
        with (``load_adapter``)."""
        if isinstance(named_tensors, AdapterWeights):
            self.load_adapter(named_tensors, version)
            return
        tensors = [(k, v.detach().to(self._push_dtype or v.dtype)) for k, v in named_tensors]
        self.llm.collective_rpc(_reload_weights, args=(tensors,))
        self.llm.reset_prefix_cache()
        self.version = version

    def load_adapter(self, adapter: AdapterWeights, version: int) -> None:
        """Make ``adapter`` version ``version``'s: written as a PEFT directory, loaded into the
        engine as LoRA id ``version + 1`` (vLLM's prefix cache is keyed by it, so nothing goes
        stale), the previous version's adapter unloaded. The base weights stay as they are."""
        from vllm.lora.request import LoRARequest

        if self._adapter_dirs is None:
            raise ValueError("this engine was built without LoRA (lora_rank=0): it takes full "
                             "weights, not an adapter")
        path = self._adapter_dirs.write(adapter.cpu_copy(self._push_dtype), version)
        request = LoRARequest(adapter_name(version), version + 1, path, load_inplace=True)
        self.llm.llm_engine.add_lora(request)
        previous, self._lora_request = self._lora_request, request
        if previous is not None and previous.lora_int_id != request.lora_int_id:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            self._adapter_dirs.remove(previous.lora_int_id - 1)
        self.version = version

    def init_weight_transfer(self, init_info: dict) -> None:
        """Join the trainer's NCCL group (``generation.weight_transfer: nccl``): ``init_info``
        is vLLM's worker init payload (master address and port, rank offset, world size, wire
        parameters). Blocks until the trainer joins too."""
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        """Begin receiving a version over NCCL (vLLM's layerwise reload starts)."""
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict) -> None:
        """Receive the broadcast described by ``update_info`` (vLLM's dict: ``names``,
        ``dtype_names``, ``shapes``, HF names, the engine's dtype) straight into the model;
        returns when it has arrived."""
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, version: int) -> None:
        """Complete the update begun by ``start_weight_update``: the model now holds version
        ``version``; drop the prefix cache (its KV entries came from the old weights)."""
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()
        self.version = version

    def close(self) -> None:
        """Free the engine (a new one in this process then builds quickly) and its adapters'
        directories."""
        del self.llm
        if self._adapter_dirs is not None:
            self._adapter_dirs.close()
        gc.collect()


def sample_groups(
    generator: Generator, prompts: Sequence[Prompt], sampling: GenerationConfig, seed: int,
    chunk: int, desc: str,
) -> list[Rollout]:
    """``sampling.n`` rollouts of every prompt, in group order, ``chunk`` prompts per engine
    call, with a progress bar. Prompt ``i`` samples with seed ``seed + i * n`` whatever the
    chunking."""
    out: list[Rollout] = []
    for start in tqdm(range(0, len(prompts), chunk), desc=desc, unit="call"):
        part = prompts[start : start + chunk]
        groups = generator.generate([p.token_ids for p in part], [p.index for p in part],
                                    sampling, seed=seed + start * sampling.n)
        out += [r for g in groups for r in g]
    return out
