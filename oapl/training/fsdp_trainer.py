"""A sharded trainer: the policy under torch FSDP2, data parallel over whole groups.

Under ``torchrun``, every rank builds the same ``FSDPTrainer``: each decoder layer is a
``fully_shard`` unit, then the root, on a device mesh of all ranks (1-D: FSDP; 2-D with
``trainer.fsdp_shard_size`` ranks per shard group: HSDP, replicated across groups). Rank 0 runs
the loop (generator, rewards, metrics, checkpoints) and drives the others: each of its trainer
calls first sends a command to all ranks (one ``scatter_object_list``), then does its own share
of the collective work; ranks 1..N-1 sit in ``follow`` and execute the same commands.

Commands: ``train`` (each rank gets its own whole groups of the batch), ``gather`` (full
weights to rank 0, one parameter at a time: weight sync and HF export), ``save`` / ``load``
(torch.distributed.checkpoint, every rank writes its shards) and ``stop``.

The loss runs *inside* the FSDP root's forward (``_Root``), so the root's parameters (embeddings,
final norm, lm_head) are all-gathered while ``oapl_kernels`` uses them: each rank sees the full
lm_head weight [V, D] and its own micro-batch's hidden states, and no rank forms [N, V] logits.
Each micro-batch's loss is weighted by its share of the *global* batch and FSDP sums (does not
average) the gradients, so one step equals the single-process step on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from ..batch import TrainBatch
from ..config import Config
from .policy import Policy
from .trainer import LocalTrainer


class _Root(torch.nn.Module):
    """The FSDP root around the policy: its forward runs a loss closure, so that the root's
    parameters are gathered while the loss uses them. Returns ``(loss, output)``: FSDP hooks
    the backward on the loss tensor (it does not look inside the ``LossOutput`` dataclass)."""

    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy

    def forward(self, loss_fn: Callable, mb: TrainBatch):
        out = loss_fn(mb)
        return out.loss, out


def device_mesh(cfg: Config, device: torch.device):
    """All ranks as one FSDP mesh, or (replicas, shard) for HSDP when
    ``trainer.fsdp_shard_size`` is smaller than the world."""
    world = dist.get_world_size()
    shard = cfg.trainer.fsdp_shard_size or world
    if world % shard:
        raise ValueError(f"trainer.fsdp_shard_size ({shard}) must divide the world size ({world})")
    if shard == world:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (world // shard, shard),
                            mesh_dim_names=("replicate", "shard"))


def stop_followers() -> None:
    """Rank 0: release the ranks waiting in ``FSDPTrainer.follow``."""
    dist.scatter_object_list([None], [("stop", None)] * dist.get_world_size(), src=0)


class FSDPTrainer(LocalTrainer):
    """``LocalTrainer``'s step (same loss, AdamW, clipping) on an FSDP2-sharded policy, data
    parallel over the groups of each batch. Rank 0 calls the ``Trainer`` methods; the other
    ranks call ``follow``."""

    def __init__(self, policy: Policy, cfg: Config):
        if cfg.model.lora.rank:
            raise ValueError("model.lora is not supported under torchrun (FSDP2) yet: train "
                             "LoRA adapters in one process")
        self.world = dist.get_world_size()
        groups = cfg.data.prompts_per_step // cfg.trainer.minibatches
        if groups % self.world:
            raise ValueError(
                f"{groups} groups per optimizer step (data.prompts_per_step / "
                f"trainer.minibatches) must divide evenly over {self.world} ranks"
            )
        per_rank = groups // self.world * cfg.generation.n
        micro = cfg.trainer.micro_batch_size
        if micro is not None and per_rank % micro:
            raise ValueError(
                f"trainer.micro_batch_size ({micro}) must divide each rank's {per_rank} "
                "sequences per step"
            )
        device = next(policy.parameters()).device
        mesh = device_mesh(cfg, device)
        for layer in policy.model.get_decoder().layers:
            fully_shard(layer, mesh=mesh)
        self.root = _Root(policy)
        fully_shard(self.root, mesh=mesh)
        for unit in self.root.modules():  # sum, not average: each rank's loss is weighted
            if isinstance(unit, FSDPModule):  # already (gloo has no pre-multiplied sum)
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)
        super().__init__(policy, cfg)

    # -- commands: rank 0 sends, every rank executes -----------------------------------------

    def _command(self, name: str, payloads: list) -> object:
        """Rank 0: send command ``name`` with ``payloads[r]`` to rank r; return rank 0's own."""
        out = [None]
        dist.scatter_object_list(out, [(name, p) for p in payloads], src=0)
        return out[0][1]

    def follow(self) -> None:
        """Ranks 1..N-1: execute rank 0's commands until ``stop``."""
        handlers = {
            "train": lambda p: self._step(*p),
            "gather": lambda p: [None for _ in self._full_weights()],
            "save": self._save_shards,
            "load": self._load_shards,
        }
        while True:
            out = [None]
            dist.scatter_object_list(out, None, src=0)
            name, payload = out[0]
            if name == "stop":
                return
            handlers[name](payload)

    # -- training -----------------------------------------------------------------------------

    def _loss(self, mb: TrainBatch):
        """``LocalTrainer``'s loss on ``mb``, run inside the FSDP root's forward."""
        _, out = self.root(super()._loss, mb)
        return out

    def _share(self, batch: TrainBatch) -> tuple[TrainBatch, int, int]:
        """Rank 0: send each rank its equal run of whole groups (with the global counts)."""
        per = len(batch) // self.world
        shares = [(batch.rows(r * per, (r + 1) * per), len(batch), batch.num_completion_tokens)
                  for r in range(self.world)]
        return self._command("train", shares)

    def _agree_count(self, count: int) -> int:
        """The most micro-batches any rank's token budget needs: every rank runs that many
        (FSDP's collectives pair up forward by forward)."""
        return int(self._all_reduce(torch.tensor([count]), dist.ReduceOp.MAX))

    def _before_micro_batch(self, i: int, count: int) -> None:
        self.root.set_requires_gradient_sync(i == count - 1)  # reduce once per step

    def _reduce(self, sums: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._all_reduce(sums, dist.ReduceOp.SUM), self._all_reduce(top, dist.ReduceOp.MAX)

    def _full_norm(self, norm: torch.Tensor) -> torch.Tensor:
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        """``op`` (sum, max) of ``t`` over ranks, on the CPU."""
        t = t.to(self.device)
        dist.all_reduce(t, op=op)
        return t.cpu()

    # -- weights and checkpoints --------------------------------------------------------------

    def _full_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every rank: the full parameters with HF names, gathered one at a time (memory
        bounded by the largest parameter); a tied lm_head appears once."""
        for name, p in self.policy.model.named_parameters():
            full = p.full_tensor() if isinstance(p, DTensor) else p
            yield name, full.detach()

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Rank 0: the full weights, for the generator (the other ranks take part)."""
        self._command("gather", [None] * self.world)
        yield from self._full_weights()

    def save_pretrained(self, directory: str) -> None:
        """Rank 0: the full model as a HF directory (safetensors), loadable by transformers
        and vLLM (the other ranks take part in the gather)."""
        state = {name: t.cpu() for name, t in self.named_weights()}
        self.policy.model.save_pretrained(directory, state_dict=state)

    def _state(self) -> dict:
        return {
            "model": get_model_state_dict(self.root),
            "optimizer": get_optimizer_state_dict(self.root, self.optimizer),
        }

    def _save_shards(self, directory: str) -> None:
        dcp.save(self._state(), checkpoint_id=directory)

    def _load_shards(self, directory: str) -> None:
        state = self._state()
        dcp.load(state, checkpoint_id=directory)
        set_model_state_dict(self.root, state["model"])
        set_optimizer_state_dict(self.root, self.optimizer, state["optimizer"])

    def save(self, directory: str) -> None:
        """Rank 0: every rank writes its shards of the model and optimizer into
        ``directory`` (torch.distributed.checkpoint; a shared filesystem across nodes)."""
        self._save_shards(self._command("save", [directory] * self.world))
        self.save_lag_policies(directory)  # rank 0 holds them whole

    def load(self, directory: str) -> None:
        """Rank 0: every rank restores its shards from ``directory`` (DCP reshards, so the
        world size may differ from the one that saved)."""
        self._load_shards(self._command("load", [directory] * self.world))
        self.load_lag_policies(directory)
