"""vLLM servers over HTTP: sampling with exact tokens, and the trainer's side of their weight
routes.

Sampling: one ``/v1/completions`` request per sample, with the prompt as token ids, ``n: 1``,
the sample's own ``seed`` (a request's ``n`` samples with one seed come out identical),
``logprobs: 0`` and ``return_tokens_as_token_ids: true``: the reply names each sampled token
as ``token_id:<id>`` with its log-prob in the server's ``--logprobs-mode`` (processed: after
temperature, as the trainer's loss needs). Nothing is re-tokenized from text.

Weights: ``ServersSyncClient`` is vLLM's ``VLLMWeightSyncClient`` over several servers: each
call goes to every server at once (through vLLM's ``HTTPVLLMWeightSyncClient``), and the init
payload's ``rank_offset`` is shifted per server so that all their workers form one group with
the trainer at rank 0. After each update the servers' prefix caches are dropped (their KV
entries came from the old weights).

Every failure is an ``EngineError`` naming the server's URL and what failed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..batch import Rollout
from ..config import GenerationConfig
from ..errors import EngineError

TOKEN_PREFIX = "token_id:"


class ServerError(EngineError):
    """A server failed; ``url`` names it."""

    def __init__(self, url: str, message: str):
        super().__init__(message)
        self.url = url


@dataclass(frozen=True)
class Sample:
    """One sample to draw: the prompt (its index and token ids) and the sample's seed."""

    prompt_index: int
    prompt_ids: tuple[int, ...]
    seed: int


def completion_payload(model: str, sample: Sample, g: GenerationConfig) -> dict:
    """The ``/v1/completions`` request body for one sample."""
    return {"model": model, "prompt": list(sample.prompt_ids), "n": 1, "seed": sample.seed,
            "max_tokens": g.max_tokens, "temperature": g.temperature, "top_p": g.top_p,
            "top_k": g.top_k, "logprobs": 0, "return_tokens_as_token_ids": True}


def parse_completion(body: dict, sample: Sample, version: int) -> Rollout:
    """The ``Rollout`` in a ``/v1/completions`` reply to ``completion_payload``."""
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    ids = [int(t.removeprefix(TOKEN_PREFIX)) for t in lp["tokens"]]
    return Rollout(sample.prompt_index, list(sample.prompt_ids), ids,
                   [float(x) for x in lp["token_logprobs"]], str(choice["finish_reason"]),
                   version)


class ServerClient:
    """One server at ``url``; ``timeout_s``: the longest any request may take."""

    def __init__(self, url: str, timeout_s: float):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.model = ""  # the served model's name, from connect
        self.adapter: str | None = None  # the LoRA adapter requests name instead, if any
        self.workers = 1  # its weight-receiving workers (tensor x pipeline x data parallel)

    def fail(self, what: str, exc: BaseException | None = None) -> ServerError:
        """The error to raise: one line naming the server and what failed."""
        why = "" if exc is None else f": {_describe(exc, self.timeout_s)}"
        return ServerError(self.url, f"server {self.url}: {what}{why}")

    def get(self, path: str, timeout: float | None = None) -> dict:
        """GET ``path`` (blocking), its JSON reply."""
        import requests

        try:
            r = requests.get(f"{self.url}/{path}", timeout=timeout or self.timeout_s)
            r.raise_for_status()
            return r.json()
        except (requests.RequestException, ValueError) as e:
            raise self.fail(f"GET /{path} failed", e) from None

    def post(self, path: str, body: dict | None = None) -> None:
        """POST ``path`` (blocking)."""
        import requests

        try:
            r = requests.post(f"{self.url}/{path}", json=body, timeout=self.timeout_s)
            r.raise_for_status()
        except requests.RequestException as e:
            raise self.fail(f"POST /{path} failed", e) from None

    def connect(self) -> None:
        """Learn the served model's name and the server's worker count (fails if the server
        is not up, or was started without ``VLLM_SERVER_DEV_MODE=1``)."""
        self.model = self.get("v1/models")["data"][0]["id"]
        self.workers = int(self.get("get_world_size")["world_size"])

    async def sample(self, session, samples: Sequence[Sample], g: GenerationConfig,
                     version: int) -> list[Rollout]:
        """All ``samples`` at once (the server batches them), as rollouts in their order,
        tagged ``version``. ``session``: an ``aiohttp.ClientSession``."""
        return list(await asyncio.gather(*(self._one(session, s, g, version) for s in samples)))

    async def _one(self, session, sample: Sample, g: GenerationConfig, version: int) -> Rollout:
        import aiohttp

        try:
            async with session.post(f"{self.url}/v1/completions",
                                    json=completion_payload(self.adapter or self.model, sample, g),
                                    timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as r:
                text = await r.text()
                if r.status != 200:
                    raise self.fail(f"/v1/completions answered {r.status}: {_short(text)}")
                return parse_completion(json.loads(text), sample, version)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError) as e:
            raise self.fail("/v1/completions failed", e) from None


def _short(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit] + "..."


def _describe(exc: BaseException, timeout_s: float) -> str:
    """A short reason: unreachable, too slow, or the exception's own message."""
    import aiohttp
    import requests

    if isinstance(exc, (asyncio.TimeoutError, requests.Timeout)):
        return f"no answer within {timeout_s:g} s (generation.timeout_s)"
    if isinstance(exc, (aiohttp.ClientConnectorError, requests.ConnectionError,
                        ConnectionError)):
        return f"unreachable ({_short(str(exc), 120)})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "it closed the connection (did it die?)"
    return _short(f"{type(exc).__name__}: {exc}", 200)


class ServersSyncClient:
    """vLLM's ``VLLMWeightSyncClient`` over ``servers`` (connected ``ServerClient``s): each
    call runs on all of them concurrently. ``version``: set before each update; it is the
    weight version ``finish_weight_update`` gives the servers (``/weight_info``)."""

    def __init__(self, servers: Sequence[ServerClient]):
        from vllm.distributed.weight_transfer import HTTPVLLMWeightSyncClient

        self.servers = list(servers)
        self.http = [HTTPVLLMWeightSyncClient(s.url, timeout=s.timeout_s) for s in servers]
        self.pool = ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="oapl-sync")
        self.version: int | None = None

    @property
    def workers(self) -> int:
        """Every server's workers together (the group is these plus the trainer)."""
        return sum(s.workers for s in self.servers)

    def _all(self, what: str, call: Callable[[int], None]) -> None:
        """``call(i)`` for every server at once; the first failure, naming its server."""
        futures = [self.pool.submit(call, i) for i in range(len(self.servers))]
        for server, f in zip(self.servers, futures):
            try:
                f.result()
            except EngineError:
                raise
            except Exception as e:  # noqa: BLE001 - requests' errors, with the server named
                raise server.fail(f"{what} failed", e) from None

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        offsets = [sum(s.workers for s in self.servers[:i]) for i in range(len(self.servers))]
        self._all("/init_weight_transfer_engine", lambda i: self.http[i].init_weight_transfer_engine(
            {**init_info, "rank_offset": init_info["rank_offset"] + offsets[i]}))

    def start_weight_update(self) -> None:
        self._all("/start_weight_update", self._start_one)

    def _start_one(self, i: int) -> None:
        """``/start_weight_update`` on server ``i``. A trainer killed during an update leaves
        the server's session open (vLLM then refuses a new one and has no route to abort it):
        close it with ``/finish_weight_update`` and start again. The update that follows
        sends every weight, so the half-received one is overwritten."""
        try:
            self.http[i].start_weight_update()
        except Exception:  # noqa: BLE001 - retried once; the second failure is reported
            try:
                self.http[i].finish_weight_update(str(self.version))
            except Exception:  # noqa: BLE001 - no session was open: the start failed otherwise
                pass
            self.http[i].start_weight_update()

    def update_weights(self, update_info: dict) -> None:
        self._all("/update_weights", lambda i: self.http[i].update_weights(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = weight_version if weight_version is not None else str(self.version)
        self._all("/finish_weight_update", lambda i: self.http[i].finish_weight_update(version))
        self._all("/reset_prefix_cache", lambda i: self.servers[i].post("reset_prefix_cache"))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
