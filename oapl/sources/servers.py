"""Batches sampled by vLLM servers (``generation.servers`` or ``generation.replicas``), on the
fixed schedule of ``generation.ahead`` (``oapl.sources.schedule``), scored in this process.

Each batch's groups are routed by a fixed rule: with S servers, server ``s`` samples the
``s``-th of S contiguous, near-equal slices of the batch's groups, one request per sample, all
at once, and each server takes its shares in batch order. Sample ``j`` of group ``i`` of batch
``b`` has seed ``sampling_seed(seed, b * P * n) + i * n + j`` (P prompts of n samples per
batch): the seeds the in-process engine gives the same samples, whatever the number of servers.
So the rows, hence every metric but timings, depend on the config, seed and server count only.
With ``env.name`` a server's share is a batch of multi-turn rollouts (``oapl.rollout.
multiturn.run_episodes``, in a thread): every later turn of its conversations goes to the same
server, and sample seeds are those of the in-process engine's run (turn ``t`` of the
batch's conversation ``k``: ``sampling_seed(seed, b * P * n) + t * 2**32 + k``).

The schedule holds on every server: batch ``b`` is sampled by ``sampling_version(b)``, so the
lag bound of ``generation.ahead`` holds too. Updates happen between batches, exactly when the
schedule requires: before a server starts batch ``b`` it must hold ``sampling_version(b)``, and
all servers take a version together, as one round of vLLM's weight protocol over one group
(``oapl.engine.transport.http``), once every server has finished its shares of the batches
before ``b`` and the trainer has pushed that version. The servers are not paused and no version
is staged on them: they sample the batches due for the old version until the update, and
nothing else is due (``push`` stages the trainer's copy and returns). A server starts batch
``b`` once the trainer has taken batch ``b - max(K, 1)`` (at most ``max(K, 1)`` finished
batches wait). With ``model.lora.push: adapter`` an update is each server loading the
version's adapter through vLLM's adapter routes instead (``oapl.engine.transport.
adapter_routes``): the base weights stay, and completions name the adapter.

Per step: ``wait_s`` (the trainer waiting for the batch), ``queue`` (finished batches waiting
when it asked), the batch's ``generate_s`` / ``score_s`` (off the trainer's path), and per
server ``i``: ``server<i>_sync_stall_s`` (seconds it could not sample because of the update
before this batch: from when it was free, or the version was pushed if later, to the update's
end), ``server<i>_busy_frac`` (its share of the wall time since its previous share spent
sampling); ``sync_stall_s``: their largest; ``update_s`` (the update before this batch, one
round of the weight protocol on every server); ``rerouted_groups`` (reroute).

Faults: a server unreachable at start, dying, answering an error or slower than
``generation.timeout_s`` raises ``EngineError`` naming its URL and what failed (the run stops,
exit 1; the last checkpoint stays good). With ``on_server_failure: reroute`` a server failing
while sampling is dropped: its groups are sampled on the others under the same seeds (counted in
``rerouted_groups``; multi-turn: its later turns too, a conversation counting as a group)
and the next update forms the group again without it; a failure during an
update still stops the run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..batch import Rollout, ScoredBatch, score_rollouts
from ..config import Config
from ..engine.adapter import AdapterWeights
from ..engine.server_client import Sample, ServerClient, ServerError, ServersSyncClient
from ..engine.servers import LocalServers
from ..engine.transport.base import Weights, wire_dtype
from ..envs import env_class
from ..errors import EngineError
from ..prompts import PromptSampler, load_prompts, sampling_seed
from ..rollout.multiturn import merge_episodes, run_episodes
from ..rollout.turns import TurnFormat
from ..tasks import load_reward
from .schedule import Scheduled, sampling_version

log = logging.getLogger(__name__)


def route(groups: int, servers: int) -> list[range]:
    """Server ``s``'s groups: the ``s``-th of ``servers`` contiguous slices of ``range(groups)``,
    the first ``groups % servers`` one longer."""
    q, r = divmod(groups, servers)
    starts = [s * q + min(s, r) for s in range(servers + 1)]
    return [range(starts[s], starts[s + 1]) for s in range(servers)]


def seeded_groups(prompts, prompt_indices, n: int, seed: int,
                  seeds=None) -> list[list[Sample]]:
    """The samples the in-process engine's ``generate(prompts, prompt_indices, sampling,
    seed, seeds)`` draws, one ``Sample`` each: prompt ``i``'s ``n`` samples seeded ``seed +
    i * n + j``, or ``seeds[i] + j`` when given. ``prompts``: token ids."""
    firsts = seeds if seeds is not None else [seed + i * n for i in range(len(prompts))]
    return [[Sample(index, tuple(ids), first + j) for j in range(n)]
            for ids, index, first in zip(prompts, prompt_indices, firsts)]


@dataclasses.dataclass
class _Done:
    """One batch, sampled and scored, with the prompt sampler's position after it."""

    batch: int
    scored: ScoredBatch
    sampler_state: dict


class ServerSource(Scheduled):
    """The servers of ``cfg.generation`` (local ones are started now, so that they build
    while the trainer loads its model)."""

    def __init__(self, cfg: Config, model_path: str, tokenizer):
        g = cfg.generation
        self.cfg, self.tokenizer = cfg, tokenizer
        self.prompts = load_prompts(cfg.data, tokenizer)
        self.reward_fn, self.reward_workers = load_reward(cfg.data)
        # env.name: each share is a batch of multi-turn rollouts on its server (run_episodes).
        self.env_cls = env_class(cfg.env.name) if cfg.env.name else None
        self.turns = TurnFormat(tokenizer) if self.env_cls else None
        self.lora_rank = cfg.model.lora.engine_rank  # > 0: adapters through the adapter routes
        self.local = (LocalServers(model_path, g, cfg.seed, os.path.join(cfg.output_dir, "servers"),
                                   self.lora_rank) if g.replicas else None)
        urls = self.local.urls if self.local is not None else g.servers
        self.servers = [ServerClient(url, g.timeout_s) for url in urls]
        self.next = 0  # the next batch to train
        self.sampler_state = {"epoch": 0, "cursor": 0}  # after the last batch taken or drained
        self.pending: list[_Done] = []  # batches restored from a checkpoint, or drained
        self.first = 0
        self.sender = None
        self.done: dict[int, _Done] = {}
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.changed: asyncio.Event | None = None
        self.pushed_at: dict[int, float] = {}

    # -- the trainer's side ------------------------------------------------------------------

    def start(self, step: int) -> None:
        """Wait for local servers, connect to every server, form the weight group, and start
        sampling from the first batch not restored."""
        from ..engine.transport.http import HTTPSender

        g = self.cfg.generation
        if self.local is not None:
            self.local.wait(g.timeout_s)
        for s in self.servers:
            s.connect()
        client = ServersSyncClient(self.servers)
        if self.lora_rank:
            from ..engine.transport.adapter_routes import AdapterSender

            root = os.path.join(self.cfg.output_dir, "servers", "adapters")
            self.sender = AdapterSender(client, root, wire_dtype(g.dtype))
        else:
            device = (torch.device("cpu") if g.weight_transfer == "gloo"
                      else torch.device(self.cfg.trainer.device))
            self.sender = HTTPSender(client, g.weight_transfer, g.transfer_address,
                                     wire_dtype(g.dtype), device, g.timeout_s)
        self.sender.init()
        self.first = self.next + len(self.pending)
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_quiet_cancelled)
        self.changed = asyncio.Event()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), name="oapl-servers",
                                       daemon=True)
        self.thread.start()
        ready.wait()

    def push(self, weights: Weights | AdapterWeights, version: int) -> None:
        """Stage a copy of the weights (with ``model.lora.push: adapter`` the adapter) as
        ``version``; the servers take it when due."""
        self._raise_failure()
        self.sender.send(version, weights)
        self.pushed_at[version] = time.perf_counter()
        self._notify()

    def next_batch(self) -> ScoredBatch:
        t = time.perf_counter()
        with self.cond:
            waiting = len(self.pending) + len(self.done)
        d = self.pending.pop(0) if self.pending else self._take(self.next)
        wait_s = time.perf_counter() - t
        self.next += 1
        self._notify()
        if not self.pending:
            self.sampler_state = d.sampler_state
        return dataclasses.replace(d.scored, timings={"wait_s": wait_s},
                                   metrics={**d.scored.metrics, "queue": waiting})

    def _take(self, b: int) -> _Done:
        with self.cond:
            while b not in self.done and self.error is None:
                self.cond.wait()
            self._raise_failure()
            return self.done.pop(b)

    def _raise_failure(self) -> None:
        if self.error is not None:
            raise self.error

    def _notify(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.changed.set)

    def take_due(self) -> _Done:
        return self._take(self.next + len(self.pending))

    def close(self) -> None:
        """Stop sampling, drop the weight group, stop the local servers."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._cancel_all)
            self.thread.join(timeout=10)
        if self.sender is not None:
            self.sender.close()
        if self.local is not None:
            self.local.close()

    # -- the driver, in the thread's event loop ---------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.main = self._task(self._drive())
        ready.set()
        try:
            self.loop.run_until_complete(self.main)
        except asyncio.CancelledError:
            pass
        except BaseException:  # noqa: BLE001 - handed to the trainer's thread by _on_done
            pass
        finally:
            self.loop.close()

    def _cancel_all(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            task.cancel()

    async def _until(self, predicate) -> None:
        while not predicate():
            self.changed.clear()
            await self.changed.wait()

    async def _drive(self) -> None:
        import aiohttp

        cfg, g = self.cfg, self.cfg.generation
        k, sync_every = cfg.trainer.minibatches, cfg.algorithm.sync_every
        total = cfg.trainer.steps // k
        sampler = PromptSampler(len(self.prompts), cfg.data.prompts_per_step, cfg.seed)
        sampler.load_state_dict(self.sampler_state)
        loop = asyncio.get_running_loop()
        self.sync_pool = ThreadPoolExecutor(1, thread_name_prefix="oapl-push")
        self.score_pool = ThreadPoolExecutor(1, thread_name_prefix="oapl-score")
        self.episode_pool = ThreadPoolExecutor(len(self.servers), thread_name_prefix="oapl-turns")
        self.alive = list(range(len(self.servers)))
        self.free_at = [time.perf_counter()] * len(self.servers)  # its last share's end
        self.tails: dict[int, asyncio.Future] = {}  # each server's last share
        held, collected = None, None
        # One connection per request: a server closes a connection idle for its keep-alive
        # (vLLM: VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s), and a pooled connection reused just then
        # fails as if the server had died (seen between batches on a loaded machine).
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            self.session = session
            for b in range(self.first, total):
                await self._until(lambda: b <= self.next + max(g.ahead, 1))
                need = sampling_version(b, g.ahead, k, sync_every)
                stall = [0.0] * len(self.servers)
                update_s = 0.0
                if held != need:
                    await self._until(lambda: self.sender.has(need))
                    await asyncio.gather(*self.tails.values())
                    self._reform_if_needed()
                    t = time.perf_counter()
                    await loop.run_in_executor(self.sync_pool, self.sender.deliver, need)
                    end = time.perf_counter()
                    update_s = end - t
                    for s in self.alive:
                        stall[s] = end - max(self.free_at[s], self.pushed_at.get(need, end))
                        self.free_at[s] = end
                    held = need
                idx = sampler.next_batch()
                base = sampling_seed(cfg.seed, b * len(idx) * g.n)
                shares = []
                for s, r in zip(list(self.alive), route(len(idx), len(self.alive))):
                    task = self._task(self._share(s, idx[r.start:r.stop], base + r.start * g.n,
                                                  held, self.tails.get(s)))
                    self.tails[s] = task
                    shares.append(task)
                collected = self._task(self._collect(b, shares, sampler.state_dict(), stall,
                                                     update_s, collected))
            if collected is not None:
                await collected
        for pool in (self.sync_pool, self.score_pool, self.episode_pool):
            pool.shutdown(wait=False)

    def _task(self, coro) -> asyncio.Task:
        """``coro`` as a task whose failure, if any, goes to the trainer's thread at once."""
        task = self.loop.create_task(coro)
        task.add_done_callback(self._on_done)
        return task

    def _on_done(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        e = task.exception()
        if not isinstance(e, EngineError):
            e = EngineError(f"sampling on the servers failed: {type(e).__name__}: {e}")
        with self.cond:
            if self.error is None:
                self.error = e
            self.cond.notify_all()

    async def _share(self, s: int, idx: list[int], seed: int, version: int, prev):
        """Server ``s`` samples the groups of prompts ``idx`` after ``prev`` (its previous
        share), with seeds from ``seed`` as the in-process engine's ``generate(..., seed)``
        (and ``run_episodes``) would: (rollouts, or the share's ``Episodes`` with
        ``env.name``; {s: busy_frac}, or {} if it failed; rerouted groups)."""
        if prev is not None:
            await asyncio.shield(prev)
        g = self.cfg.generation
        start = time.perf_counter()
        if self.env_cls is None:
            groups = seeded_groups([self.prompts[i].token_ids for i in idx], idx, g.n, seed)
            out, rerouted = await self._sample(s, groups, g, version)
        else:
            engine = _ShareEngine(self, s, version)
            out = await asyncio.get_running_loop().run_in_executor(
                self.episode_pool, run_episodes, engine, self.env_cls, self.cfg.env,
                [self.prompts[i] for i in idx], g, seed, self.turns, g.max_model_len)
            rerouted = engine.rerouted
        if s not in self.alive:
            return out, {}, rerouted
        end = time.perf_counter()
        busy = (end - start) / max(end - self.free_at[s], 1e-9)
        self.free_at[s] = end
        return out, {s: busy}, rerouted

    async def _sample(self, s: int, groups: list[list[Sample]], sampling, version: int):
        """``groups`` sampled on server ``s`` (``sampling``: a ``GenerationConfig``'s sampling
        fields), or, with ``on_server_failure: reroute`` once it has failed, on the others
        under the same seeds: (the rollouts in order, how many groups were rerouted)."""
        flat = [x for group in groups for x in group]
        if s in self.alive:
            try:
                return await self.servers[s].sample(self.session, flat, sampling, version), 0
            except ServerError as e:
                # Not "len(alive) < 2": a share already in flight to a server dropped
                # meanwhile (its failure found by another share) still reroutes to the one left.
                others = [t for t in self.alive if t != s]
                if self.cfg.generation.on_server_failure != "reroute" or not others:
                    raise
                self.alive.remove(s)
                log.warning("%s; sampling its groups on the other servers", e)
        alive = list(self.alive)
        parts = await asyncio.gather(*(
            self.servers[t].sample(self.session, [x for gr in groups[r.start:r.stop] for x in gr],
                                   sampling, version)
            for t, r in zip(alive, route(len(groups), len(alive)))))
        return [x for p in parts for x in p], len(groups)

    def _reform_if_needed(self) -> None:
        """After a server was dropped: the weight group again, of the servers left."""
        if len(self.alive) < len(self.sender.client.servers):
            self.sender.reform(ServersSyncClient([self.servers[s] for s in self.alive]))

    async def _collect(self, b: int, shares, sampler_state: dict, stall: list[float],
                       update_s: float, prev):
        """Batch ``b``'s rollouts in group order, scored (after batch ``b - 1``)."""
        t = time.perf_counter()
        parts = await asyncio.gather(*shares)
        generate_s = time.perf_counter() - t
        if prev is not None:
            await prev
        kk = self.cfg.trainer.minibatches
        if self.env_cls is None:
            rollouts: list[Rollout] = [r for part, _, _ in parts for r in part]
            t = time.perf_counter()
            records = [self.prompts[r.prompt_index].record for r in rollouts]
            _, rewards, failed = await asyncio.get_running_loop().run_in_executor(
                self.score_pool, score_rollouts, self.reward_fn, self.tokenizer, rollouts,
                records, self.reward_workers)
            score_s = time.perf_counter() - t
            metrics = {}
        else:  # scored by the environments as they went
            ep = merge_episodes([part for part, _, _ in parts])
            rollouts, rewards, failed, metrics = ep.rollouts, ep.rewards, ep.failed, ep.metrics
            generate_s, score_s = metrics.pop("generate_s"), metrics.pop("env_s")
        metrics = {**metrics, "generate_s": generate_s / kk, "score_s": score_s / kk,
                   "sync_stall_s": max(stall) / kk, "update_s": update_s / kk,
                   "rerouted_groups": float(sum(n for _, _, n in parts))}
        for s in range(len(self.servers)):
            metrics[f"server{s}_sync_stall_s"] = stall[s] / kk
            busy = [f[s] for _, f, _ in parts if s in f]
            metrics[f"server{s}_busy_frac"] = busy[0] if busy else 0.0
        scored = ScoredBatch(rollouts, rewards, failed, metrics=metrics)
        with self.cond:
            self.done[b] = _Done(b, scored, sampler_state)
            self.cond.notify_all()


class _ShareEngine:
    """The ``generate`` that ``run_episodes`` calls for a multi-turn share, from a worker
    thread: every turn of the share's conversations on server ``s`` (or, once it has failed,
    rerouted as ``ServerSource._sample`` does), each sample with the seed the in-process
    engine gives it. ``rerouted``: groups (later turns: conversations) sampled elsewhere."""

    def __init__(self, source: ServerSource, s: int, version: int):
        self.source, self.s, self.version = source, s, version
        self.rerouted = 0

    def generate(self, prompts, prompt_indices, sampling, seed: int, seeds=None):
        n = sampling.n
        groups = seeded_groups(prompts, prompt_indices, n, seed, seeds)
        loop = self.source.loop
        future = asyncio.run_coroutine_threadsafe(
            self.source._sample(self.s, groups, sampling, self.version), loop)
        while True:  # the loop may close (the run stopping) before it runs the request
            try:
                flat, rerouted = future.result(timeout=1.0)
                break
            except TimeoutError:
                if loop.is_closed():
                    raise EngineError("sampling stopped") from None
        self.rerouted += rerouted
        return [flat[k * n:(k + 1) * n] for k in range(len(groups))]


def _quiet_cancelled(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The loop's exception handler: nothing for a gather's ``CancelledError`` that no one
    retrieved (the tasks cancelled by ``close`` after a failure, which already went to the
    trainer in one line); asyncio's default for everything else."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)
