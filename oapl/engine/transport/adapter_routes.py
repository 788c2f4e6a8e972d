"""The transport of LoRA adapters (``model.lora.push: adapter``) to vLLM servers: vLLM's adapter
routes instead of its weight routes.

``AdapterSender`` is, like ``HTTPSender``, a ``StagedSender`` (``oapl.sources.servers`` drives
either). ``send`` writes the version's adapter as a PEFT directory under a root the servers read (a
local directory for local replicas, a shared filesystem for servers elsewhere) and returns;
``deliver(version)``, when the schedule says the servers are due to take it (they are between
batches), has every server load it (``/v1/load_lora_adapter``, as ``adapter_name(version)``),
unload the version before (``/v1/unload_lora_adapter``), and makes that name the model every
later completion request names. No weight group is formed; the base weights never change. The
servers run with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``
(``oapl.engine.servers.server_command`` / ``server_env``).
"""

from __future__ import annotations

import os
import shutil

import torch

from ..adapter import AdapterWeights, adapter_name
from ..server_client import ServersSyncClient
from .base import StagedSender


class AdapterSender(StagedSender):
    """The trainer's side of the adapter transport to ``client``'s servers. ``root``: where the
    adapters' directories go (the servers must read it at the same path); ``dtype``: the
    adapters' dtype there (None: each tensor's own)."""

    def __init__(self, client: ServersSyncClient, root: str, dtype: torch.dtype | None):
        super().__init__()
        self.client, self.root, self.dtype = client, os.path.abspath(root), dtype
        self.held: int | None = None  # the version every server holds

    def init(self) -> None:
        os.makedirs(self.root, exist_ok=True)

    def reform(self, client: ServersSyncClient) -> None:
        """Deliver to ``client``'s servers from now on (after one was dropped)."""
        self.client = client

    def send(self, version: int, weights: AdapterWeights) -> None:
        """Write ``version``'s adapter (a copy: the trainer may change its tensors on return)."""
        if not isinstance(weights, AdapterWeights):
            raise TypeError("servers without weight routes in use take LoRA adapters only "
                            f"(model.lora.push=adapter), got {type(weights).__name__}")
        self.stage(version, weights.cpu_copy(self.dtype).save(self._dir(version)))

    def deliver(self, version: int) -> None:
        """Every server loads staged ``version`` and drops the one before (blocking: the
        servers must be between batches); later completions name it."""
        path = self.take(version)
        name = adapter_name(version)
        for server in self.client.servers:
            server.post("v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        previous, self.held = self.held, version
        stale = previous is not None and previous != version
        for server in self.client.servers:
            server.adapter = name
            if stale:
                server.post("v1/unload_lora_adapter", {"lora_name": adapter_name(previous)})
        if stale:
            shutil.rmtree(self._dir(previous), ignore_errors=True)

    def close(self) -> None:
        """Drop the staged versions' directories (the held one's stays, the servers' own)."""
        for version in self.drop_staged():
            shutil.rmtree(self._dir(version), ignore_errors=True)

    def _dir(self, version: int) -> str:
        return os.path.join(self.root, f"v{version}")
