"""The weight transport to vLLM servers: vLLM's HTTP weight routes, with the tensors broadcast
by vLLM's nccl backend (servers on GPUs) or oapl's gloo backend (servers on CPUs,
``oapl.engine.vllm_gloo``).

``HTTPSender.send`` stages a copy of the weights (on the trainer's device for nccl, in CPU memory
for gloo, in the wire dtype) and returns; ``deliver(version)`` sends a staged version to every
server at once, when the caller's schedule says the servers are due to take it (they are then
between batches: ``oapl.sources.servers``). All servers' workers form one group with the trainer
at rank 0 (``init``), and each version is one round of vLLM's protocol, driven by vLLM's trainer
engine through ``ServersSyncClient``: ``/start_weight_update``, ``/update_weights`` on every
server while the trainer broadcasts (in buckets, as vLLM packs them), ``/finish_weight_update``
with the version (``/weight_info`` names it), then ``/reset_prefix_cache``.
"""

from __future__ import annotations

import torch

from ...errors import EngineError
from ..server_client import ServersSyncClient
from .base import StagedSender, Weights
from .nccl import StagedWeights


class HTTPSender(StagedSender):
    """The trainer's side of the transport to ``client``'s servers. ``backend``: ``gloo`` or
    ``nccl``; ``address``: where the servers reach the trainer's group (a TCPStore on a free
    port); ``dtype``: the wire dtype (None: each tensor's own); ``device``: where staged copies
    live (``cpu`` for gloo, the trainer's CUDA device for nccl)."""

    def __init__(self, client: ServersSyncClient, backend: str, address: str,
                 dtype: torch.dtype | None, device: torch.device, timeout_s: float):
        super().__init__()
        self.client, self.backend, self.address = client, backend, address
        self.dtype, self.device, self.timeout_s = dtype, device, timeout_s
        self.source = StagedWeights()
        self.engine = None

    def init(self) -> None:
        """Form the group: the trainer at rank 0, every server's workers after it (blocks
        until all have joined)."""
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

        from ..servers import free_port

        port = free_port(self.address)
        world = 1 + self.client.workers
        if self.backend == "gloo":
            from ..vllm_gloo import GlooTrainerInitInfo, register

            register()
            info = GlooTrainerInitInfo(master_address=self.address, master_port=port,
                                       world_size=world, timeout_s=self.timeout_s, rank=0)
        else:
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            torch.cuda.set_device(self.device)
            info = NCCLTrainerInitInfo(master_address=self.address, master_port=port,
                                       world_size=world, rank=0)
        self.engine = WeightTransferTrainerFactory.trainer_init(info, client=self.client,
                                                                source=self.source)

    def reform(self, client: ServersSyncClient) -> None:
        """The group again, of ``client``'s servers (after one was dropped): the old group is
        closed on the trainer's side and on the servers that remain."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        for server in client.servers:
            server.post("shutdown_weight_transfer_engine")
        self.client.close()
        self.client = client
        self.init()

    def send(self, version: int, weights: Weights) -> None:
        """Stage copies of ``weights`` as ``version``; the trainer may change its tensors on
        return."""
        staged = [(name, t.detach().to(self.device, self.dtype or t.dtype, copy=True))
                  for name, t in weights]
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.stage(version, staged)

    def deliver(self, version: int) -> None:
        """Send staged ``version`` to every server (blocking; the servers must be between
        batches), then free its copy."""
        self.source.tensors = self.take(version)
        self.client.version = version
        try:
            if self.device.type == "cuda":
                with torch.cuda.device(self.device):
                    self.engine.send_weights()
            else:
                self.engine.send_weights()
        except EngineError:
            raise
        except Exception as e:  # noqa: BLE001 - the broadcast's own error, in one line
            dead = [s.url for s in self.client.servers if not _answers(s.url)]
            who = f"server {dead[0]} (it does not answer /health): " if dead else ""
            raise EngineError(f"{who}the {self.backend} weight broadcast of version {version} "
                              f"to the servers failed: {type(e).__name__}: {e}") from None
        finally:
            self.source.tensors = []

    def close(self) -> None:
        """Drop staged copies and the group (the servers keep serving)."""
        self.drop_staged()
        if self.engine is not None:
            try:
                self.engine.shutdown()
            except Exception:  # noqa: BLE001 - closing after a failure: nothing to report
                pass
            self.engine = None


def _answers(url: str) -> bool:
    """Whether the server at ``url`` answers ``/health`` within 2 s."""
    import requests

    try:
        return requests.get(f"{url}/health", timeout=2).ok
    except requests.RequestException:
        return False
