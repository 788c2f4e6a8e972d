"""A weight-transfer backend for vLLM on the CPU: ``torch.distributed`` gloo over TCP.

vLLM's own backends (nccl, ipc, ...) need CUDA. This one has the same shape as vLLM's dense
NCCL backend (``vllm.distributed.weight_transfer.nccl_engine``) so that a trainer drives a
vLLM server through the very protocol a GPU run uses: ``/init_weight_transfer_engine`` once
(every server's workers join one group with the trainer at rank 0), then per version
``/start_weight_update``, ``/update_weights`` (the workers receive while the trainer
broadcasts), ``/finish_weight_update``. Weights travel in checkpoint format (Hugging Face names,
the dtype the trainer chose), packed into uint8 buckets of at most ``buffer_size_bytes`` (a
bucket closes once it exceeds that size, as vLLM's packed NCCL transfer cuts them), and are
loaded through vLLM's layerwise reload.

Registered into vLLM's factories as backend ``gloo`` by ``register``, which vLLM calls in every
one of its processes through the ``vllm.general_plugins`` entry point in setup.py; a server
selects it with ``--weight-transfer-config '{"backend": "gloo"}'``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
)
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

BACKEND = "gloo"
DEFAULT_BUFFER_BYTES = 64 * 2**20
DEFAULT_TIMEOUT_S = 600.0


def buckets(sizes: Sequence[int], limit: int) -> list[range]:
    """Consecutive index ranges of ``sizes`` (bytes per tensor): each bucket takes tensors
    until its total exceeds ``limit`` (vLLM's packing rule), the last takes what is left.
    Both sides cut the stream with this, from the same metadata."""
    out, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total > limit:
            out.append(range(start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def _open_group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A gloo process group outside torch.distributed's global state (vLLM's helper: a
    TCPStore at ``address:port``, hosted by rank 0)."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(
        address, port, rank, world_size, "gloo", timeout=timedelta(seconds=timeout_s))


def _broadcast_from_0(group, tensor: torch.Tensor) -> None:
    """Broadcast ``tensor`` from rank 0 of ``group`` (group ranks, not global ones)."""
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


@dataclass(kw_only=True)
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    """What a server's workers need to join the group: the trainer's TCPStore address, the
    rank of this server's first worker (``rank_offset``), the group size, the bucket size."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    buffer_size_bytes: int = DEFAULT_BUFFER_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo,
                                                    NCCLWeightTransferUpdateInfo]):
    """The worker's side (in each vLLM worker process). Update info is vLLM's dense one:
    ``names``, ``dtype_names``, ``shapes``, in the order the trainer sends them."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = NCCLWeightTransferUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.buffer_size_bytes = DEFAULT_BUFFER_BYTES

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        p = self.parallel_config
        rank = p.data_parallel_index * p.world_size + p.rank + init_info.rank_offset
        self.buffer_size_bytes = init_info.buffer_size_bytes
        self.group = _open_group(init_info.master_address, init_info.master_port, rank,
                                 init_info.world_size, init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        """Receive and load one version (the base class would also synchronize an
        accelerator, and there is none)."""
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, info: NCCLWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialized: call "
                               "init_weight_transfer_engine first")
        from vllm.distributed.weight_transfer.packed_tensor import unpack_tensor
        from vllm.model_executor.model_loader.mtp_validation import (
            disable_mtp_completeness_check,
        )

        dtypes = [getattr(torch, d) for d in info.dtype_names]
        sizes = [_nbytes(s, d) for s, d in zip(info.shapes, dtypes)]
        with disable_mtp_completeness_check():
            for r in buckets(sizes, self.buffer_size_bytes):
                packed = torch.empty(sum(sizes[i] for i in r), dtype=torch.uint8)
                _broadcast_from_0(self.group, packed)
                self.model.load_weights(unpack_tensor(
                    packed, [info.names[i] for i in r], [info.shapes[i] for i in r],
                    [dtypes[i] for i in r], [sizes[i] for i in r]))

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """The trainer's side of the group: it hosts the TCPStore at ``master_address:
    master_port`` (an address every server can reach), ``world_size`` = 1 + all workers."""

    backend: ClassVar[str] = BACKEND

    master_address: str
    master_port: int
    world_size: int
    buffer_size_bytes: int = DEFAULT_BUFFER_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """The trainer's side: rank 0 of the group; ``send_weights`` drives one update round
    through the client (start, update concurrently with the broadcast, finish), as vLLM's
    ``NCCLTrainerWeightTransferEngine`` does. The source's tensors must be CPU tensors."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource,
                 buffer_size_bytes: int = DEFAULT_BUFFER_BYTES) -> None:
        super().__init__(client=client, source=source, is_sender=True)
        self.buffer_size_bytes = buffer_size_bytes
        self.group = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: VLLMWeightSyncClient,
                     source: WeightSource | None = None) -> GlooTrainerWeightTransferEngine:
        if source is None:
            raise ValueError("the gloo trainer weight transfer needs a WeightSource")
        if not init_info.is_sender:
            raise ValueError("the gloo weight transfer has one trainer rank, rank 0")
        engine = cls(client=client, source=source,
                     buffer_size_bytes=init_info.buffer_size_bytes)
        worker = GlooWeightTransferInitInfo(
            master_address=init_info.master_address, master_port=init_info.master_port,
            rank_offset=1, world_size=init_info.world_size,
            buffer_size_bytes=init_info.buffer_size_bytes, timeout_s=init_info.timeout_s)
        # The workers block in init until every rank has joined: ask them from a thread.
        with ThreadPoolExecutor(max_workers=1) as exe:
            future = exe.submit(client.init_weight_transfer_engine, asdict(worker))
            engine.group = _open_group(init_info.master_address, init_info.master_port, 0,
                                       init_info.world_size, init_info.timeout_s)
            future.result()
        return engine

    def send_weights(self) -> None:
        meta = self.source.metadata()
        info = NCCLWeightTransferUpdateInfo(
            names=[m.name for m in meta],
            dtype_names=[str(m.dtype).split(".")[-1] for m in meta],
            shapes=[list(m.shape) for m in meta])
        self.client.start_weight_update()
        exe = ThreadPoolExecutor(max_workers=1)
        try:
            future = exe.submit(self.client.update_weights, asdict(info))
            self._send_buckets(meta)
            future.result()
        finally:
            # A failed broadcast leaves the thread waiting on a server that never answers.
            exe.shutdown(wait=False)
        self.client.finish_weight_update()

    def _send_buckets(self, meta: list[ParamMeta]) -> None:
        pairs = _checked(iter(self.source), meta)
        sizes = [_nbytes(m.shape, m.dtype) for m in meta]
        for r in buckets(sizes, self.buffer_size_bytes):
            parts = [next(pairs)[1].contiguous().view(-1).view(torch.uint8) for _ in r]
            _broadcast_from_0(self.group, torch.cat(parts))

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None


def _checked(pairs: Iterator[tuple[str, torch.Tensor]],
             meta: list[ParamMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    """The source's pairs, each checked against the metadata the workers were sent."""
    for m in meta:
        name, t = next(pairs)
        if name != m.name or t.dtype != m.dtype or tuple(t.shape) != m.shape:
            raise ValueError(f"weight source yielded {name!r} {t.dtype} {tuple(t.shape)}, "
                             f"expected {m.name!r} {m.dtype} {m.shape}")
        yield name, t


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register backend ``gloo`` in vLLM's
    worker and trainer factories (lazily: this module is imported only when used)."""
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )

    for factory, cls in [(WeightTransferEngineFactory, "GlooWeightTransferEngine"),
                         (WeightTransferTrainerFactory, "GlooTrainerWeightTransferEngine")]:
        try:
            factory.register_engine(BACKEND, __name__, cls)
        except ValueError:  # already registered in this process
            pass
