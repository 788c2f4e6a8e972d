"""toy:ask written as a verifiers environment (a ``verifiers.v1`` taskset package).

oapl runs it with the tiny model, token-exactly, through ``oapl.envs.verifiers_env``::

    oapl train examples/tiny-verifiers.yaml      # data.source: verifiers:examples/vf_ask

The prompt "max a =" hides a digit h: the player may answer at once, or say "ask" and be told
"val h ="; the reward is 1 iff its answer is max(a, h). It is oapl's own ``toy:ask`` task with
the ``ask`` environment (``oapl/envs/toy_ask.py``), written the way a verifiers user writes
it: a ``Taskset`` of typed tasks with an ``@vf.reward``, and an ``Env`` whose ``run`` drives the
conversation through ``interaction.turn``. It imports nothing of oapl.
"""

import verifiers.v1 as vf

ASK = "ask"


class AskData(vf.TaskData):
    hidden: int
    answer: str


class AskTask(vf.Task[AskData, vf.State, vf.TaskConfig]):
    @vf.reward
    async def correct(self, trace: vf.Trace) -> float:
        """1 iff the player's last turn is the answer (a last "ask" scores 0)."""
        return float(trace.last_reply == self.data.answer)


class AskTaskset(vf.Taskset[AskTask, vf.TasksetConfig]):
    def load(self):
        for a in range(10):
            for h in range(10):
                yield AskTask(AskData(prompt=f"max {a} =", hidden=h, answer=str(max(a, h))),
                              self.config.task)


class AskEnvConfig(vf.EnvConfig):
    player: vf.AgentConfig = vf.AgentConfig()


class AskEnv(vf.Env[AskEnvConfig]):
    async def run(self, task, agents):
        async with agents.player.interaction(task) as chat:
            segment = await chat.turn()  # the prompted task: the player speaks first
            while not segment.terminated and segment.last_reply == ASK:
                segment = await chat.turn(f"val {task.data.hidden} =")


__all__ = ["AskTaskset", "AskEnv"]
