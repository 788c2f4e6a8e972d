"""``env.name=verifiers``: a ``verifiers`` environment (``verifiers.v1``) played by oapl's
engine, token-exactly.

A verifiers environment is a taskset package: its ``Taskset`` (the tasks, with their
``@vf.reward``s, ``@vf.stop``s and judges) and, for a multi-turn one, an ``Env`` whose
``run(task, agents)`` drives the conversation through ``agents.<seat>.interaction(task)`` and
``turn(message)`` (a plain taskset is verifiers' one-turn ``SingleAgentEnv``). verifiers' own
rollouts run an agent program behind an interception server that renders every turn from
text; here the seat is played by the driver (``oapl.rollout.multiturn``) instead. ``Env.run``
runs as a coroutine on one background event loop; each ``turn(message)`` hands ``message`` to
the driver as this environment's reply, which is tokenized once and appended to the exact ids
(``oapl.rollout.turns``), and waits for the model's next turn. When ``run`` returns, each
seat's trace is scored by its task (``Task.score``, without a runtime: signals that need one
are skipped) and the episode by ``Env.finalize``; the seat's ``trace.reward`` is the rollout's.
A rollout that a limit of oapl's cuts keeps reward 0 (its episode is cancelled unscored).

The records come from ``data.source=verifiers:<taskset>`` (``oapl.tasks.verifiers_taskset``:
each carries its taskset config and task data); ``env.kwargs`` is the verifiers env config
(``--env.*`` there, e.g. a seat's ``max_turns``). Played: one seat (the policy), prompted
tasks, the seat's ``max_turns`` and the task's ``@vf.stop`` hooks on the trace. Refused with
an error naming what: several seats, a seat the env makes untrainable, tool servers
(``toolsets``: MCP tools run inside verifiers' agent programs), ``@vf.stop`` hooks on model
requests or responses, a second interaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref

from ..tasks.verifiers_taskset import load_environment
from .base import Message, Step

_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _loop() -> asyncio.AbstractEventLoop:
    """The event loop every episode's coroutine runs on (a daemon thread's)."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="oapl-verifiers",
                             daemon=True).start()
    return _LOOP


class _Channel:
    """Between the driver's step thread and the episode's coroutine: the coroutine posts
    ``("turn", reply or None)``, ``("done", reward)`` or ``("error", exception)`` on
    ``events``; the driver answers a turn with the model's text (``answer``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: queue.Queue = queue.Queue()
        self._said: asyncio.Future | None = None

    async def model_turn(self, reply: str | None) -> str:
        self._said = self.loop.create_future()
        self.events.put(("turn", reply))
        return await self._said

    def answer(self, text: str) -> None:
        self.loop.call_soon_threadsafe(self._said.set_result, text)


def _reply_text(message) -> str:
    """A ``turn`` argument (text, or one user message: a dict or a verifiers message) as the
    text of the driver's reply."""
    if isinstance(message, list) and len(message) == 1:
        m = message[0]
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (
            getattr(m, "role", None), getattr(m, "content", None))
        if role == "user":
            message = content
    if isinstance(message, str):
        return message
    raise TypeError(f"turn({message!r}): oapl plays turns of text or one user message")


class _Interaction:
    """The seat's side of ``agent.interaction(task)``: ``turn`` and ``trace``, as in
    ``verifiers.v1.Interaction``."""

    def __init__(self, seat: _Seat, task):
        import verifiers.v1 as vf
        from verifiers.v1.session import hook_boundary

        self.seat, self.task = seat, task
        self.trace = vf.Trace(
            task=vf.TraceTask(type=type(task).__name__, data=task.data, key=task.key,
                              hash=task.hash),
            agent=vf.AgentInfo(config=seat.spec, name=seat.name))
        self._stops = task.hooks("stop")
        for fn in self._stops:
            if hook_boundary(fn, allow_trace=True) is not vf.Trace:
                raise RuntimeError(f"@vf.stop {fn.__name__} reads a model request or response, "
                                   "which oapl's engine does not make (a stop on the trace "
                                   "works)")
        self._started = self._over = False
        data = task.data
        if data.system_prompt is not None:
            self._add(vf.SystemMessage(content=data.system_prompt))
        if data.prompt is not None:
            self._add(vf.UserMessage(content=data.prompt_text))

    def _add(self, message, sampled: bool = False) -> None:
        import verifiers.v1 as vf

        parent = len(self.trace.nodes) - 1 if self.trace.nodes else None
        self.trace.nodes.append(vf.MessageNode(parent=parent, message=message,
                                               sampled=sampled))

    async def _stopped(self) -> bool:
        """Whether the seat's turn limit or a ``@vf.stop`` ends the exchange before a turn
        (checked, as verifiers does, before each turn after the first)."""
        import verifiers.v1 as vf
        from verifiers.v1.session import call_hook

        limit = self.seat.spec.max_turns
        if limit is not None and self.trace.num_turns >= limit:
            self.trace.stop("max_turns")
            return True
        for stop in self._stops:
            fired = await call_hook(stop, {vf.Trace: self.trace})
            if not isinstance(fired, bool):
                raise TypeError(f"@stop {stop.__name__} returned {fired!r}, not a bool")
            if fired:
                self.trace.stop(stop.__name__)
                return True
        return False

    async def turn(self, message=None):
        import verifiers.v1 as vf

        if self._over:
            raise RuntimeError("the exchange is over (the run ended); read interaction.trace")
        if not self._started and (message is None) != (self.task.data.prompt is not None):
            raise ValueError("a prompted task's first turn is a bare turn() (oapl plays "
                             "prompted tasks only)")
        if self._started and await self._stopped():
            self._over = True
            return vf.Segment(messages=[], terminated=True)
        reply = None
        if message is not None:
            reply = _reply_text(message)
            self._add(vf.UserMessage(content=reply))
        self._started = True
        said = await self.seat.channel.model_turn(reply)
        answer = vf.AssistantMessage(content=said)
        self._add(answer, sampled=True)
        return vf.Segment(messages=[answer])


class _Seat:
    """The one seat, played by oapl's engine: ``interaction(task)`` and ``run(task)`` as on a
    ``verifiers.v1.Agent``."""

    def __init__(self, name: str, spec, channel: _Channel):
        self.name, self.spec, self.channel = name, spec, channel
        self.trainable = True
        self.played = None  # (task, trace) of its interaction, once opened

    @contextlib.asynccontextmanager
    async def interaction(self, task, **_):
        if self.played is not None:
            raise RuntimeError(f"seat {self.name!r}: a second interaction in one episode "
                               "(oapl plays one conversation per rollout)")
        if type(task).toolsets(task.config):
            raise RuntimeError(f"task {type(task).__name__} has tool servers (toolsets), "
                               "which oapl does not run")
        chat = _Interaction(self, task)
        self.played = (task, chat.trace)
        yield chat
        chat.trace.stop("user_closed")

    async def run(self, task, **_):
        """One model turn on the task's prompt (a tool-less agent program's whole run)."""
        async with self.interaction(task) as chat:
            await chat.turn()
            chat.trace.stop("agent_completed")
        return chat.trace


async def _episode(env, task, channel: _Channel) -> None:
    """``env``'s episode of ``task`` with the seat played through ``channel``: posts the
    seat's reward (``done``) or what went wrong (``error``)."""
    import verifiers.v1 as vf

    try:
        seats: dict[str, _Seat] = {}

        def make(name, spec):
            seats[name] = _Seat(name, spec, channel)
            return seats[name]

        agents = vf.Agents(env.config, make)
        if len(seats) != 1:
            raise RuntimeError(f"{type(env).__name__} has seats {sorted(seats)}; oapl plays "
                               "an environment of one seat (the policy)")
        (seat,) = seats.values()
        await env.setup(agents)
        if not seat.trainable:
            raise RuntimeError(f"{type(env).__name__}.setup() made seat {seat.name!r} "
                               "untrainable")
        await env.run(task, agents)
        if seat.played is None:
            raise RuntimeError(f"{type(env).__name__}.run() ran no turn of seat "
                               f"{seat.name!r}")
        played, trace = seat.played
        await played.score(trace)
        trace.is_completed = trace.ok = True
        episode = vf.Episode(env=vf.EnvInfo(id=env.config.env_id), task=trace.task,
                             traces=[trace], ok=True)
        await env.finalize(task, episode)
        channel.events.put(("done", float(trace.reward)))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the environment's failure is its rollout's
        channel.events.put(("error", exc))


class VerifiersEnv:
    """oapl's environment protocol over one verifiers episode (one object per rollout;
    ``env_kwargs``: the verifiers env config)."""

    def __init__(self, **env_kwargs):
        self.env_kwargs = env_kwargs
        self._channel: _Channel | None = None

    def reset(self, record: dict) -> list[Message]:
        vf_record = record.get("verifiers")
        if not isinstance(vf_record, dict):
            raise ValueError("env.name=verifiers plays the tasks of data.source=verifiers:...")
        env = load_environment(vf_record["taskset"], self.env_kwargs)
        task_cls = type(env.taskset).task_type()
        task = task_cls(task_cls.data_type().model_validate(vf_record["task"]),
                        env.taskset.config.task)
        loop = _loop()
        self._channel = _Channel(loop)
        episode = asyncio.run_coroutine_threadsafe(_episode(env, task, self._channel), loop)
        # A rollout that oapl cuts (a turn or token limit) leaves its episode waiting for a
        # turn that never comes: cancel it once this environment is dropped.
        weakref.finalize(self, episode.cancel)
        kind, _ = self._next()
        if kind == "done":
            raise RuntimeError("the verifiers episode ended before the model's first turn")
        messages = [{"role": "system", "content": task.data.system_prompt}] if (
            task.data.system_prompt is not None) else []
        return messages + [{"role": "user", "content": task.data.prompt_text}]

    def _next(self):
        kind, value = self._channel.events.get()
        if kind == "error":
            raise value
        return kind, value

    def step(self, messages: list[Message]) -> Step:
        self._channel.answer(messages[-1]["content"])
        kind, value = self._next()
        if kind == "done":
            return Step(None, value, True)
        return Step(value, 0.0, False)
