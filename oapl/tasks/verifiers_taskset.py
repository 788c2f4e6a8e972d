"""``data.source=verifiers:<taskset>``: the tasks of a ``verifiers`` taskset (``verifiers.v1``)
as records, for the ``verifiers`` environment (``oapl.envs.verifiers_env``) that plays and
scores them.

``<taskset>`` is a verifiers taskset id (an installed package, or one of verifiers' own) or a
package directory (``examples/vf_ask``: its parent goes on ``sys.path``, its name is the id).
``data.task_kwargs`` is the taskset's config (verifiers' ``--env.taskset.*``). A record is
``{"prompt": the task's prompt text, "system_prompt": its system prompt (when it has one),
"verifiers": {"taskset": the taskset config, "task": the task's data}}``, so a rollout file
carries all that its environment needs to rebuild the task.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading

from ..config import DataConfig

PREFIX = "verifiers:"


def taskset_id(ident: str) -> str:
    """The importable taskset id of ``ident`` (an id, or a package directory, whose parent is
    then put on ``sys.path``)."""
    if os.sep in ident or os.path.isdir(ident):
        path = os.path.abspath(ident.rstrip(os.sep))
        if not os.path.isfile(os.path.join(path, "__init__.py")):
            raise ValueError(f"data.source {PREFIX}{ident}: {path} is not a package directory "
                             "(no __init__.py)")
        if os.path.dirname(path) not in sys.path:
            sys.path.insert(0, os.path.dirname(path))
        return os.path.basename(path)
    return ident


_LOCK = threading.Lock()  # rollouts' first steps load their environment from several threads


@functools.lru_cache(maxsize=16)
def _environment(env_json: str):
    from verifiers.v1.utils.loaders import load_environment, resolve_env_config

    return load_environment(resolve_env_config(json.loads(env_json)))


def load_environment(taskset: dict, env_kwargs: dict):
    """The verifiers ``Env`` of the taskset config ``taskset`` ({"id", ...}) with the env
    config ``env_kwargs`` (one object per distinct pair: its taskset loads once)."""
    if "taskset" in env_kwargs:
        raise ValueError("env.kwargs.taskset: the taskset's config is data.task_kwargs")
    try:
        import verifiers.v1  # noqa: F401
    except ImportError:
        raise ValueError("data.source verifiers:... needs the verifiers package "
                         "(pip install verifiers==0.4.0)") from None
    with _LOCK:
        ident = taskset_id(taskset["id"])
        try:
            return _environment(json.dumps({**env_kwargs, "taskset": {**taskset, "id": ident}},
                                           sort_keys=True))
        except (ImportError, TypeError, AttributeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"verifiers taskset {taskset['id']!r}: {first}") from exc


def load(cfg: DataConfig) -> list[dict]:
    """The first ``cfg.limit`` tasks of the taskset ``cfg.source`` names, as records."""
    taskset = {**cfg.task_kwargs, "id": cfg.source[len(PREFIX):]}
    tasks = load_environment(taskset, {}).taskset
    if not tasks.bounded and cfg.limit is None:
        raise ValueError(f"data.source {cfg.source!r}: the taskset is infinite; set data.limit")
    if cfg.limit is not None:
        tasks = tasks.take(cfg.limit)
    records = []
    for task in tasks:
        data = task.data
        if data.prompt is None:
            raise ValueError(f"data.source {cfg.source!r}: task {data.idx} has no prompt (its "
                             "environment opens the conversation), which oapl cannot train on")
        if not isinstance(data.prompt, str) and [m.role for m in data.prompt] != ["user"]:
            raise ValueError(f"data.source {cfg.source!r}: task {data.idx}'s prompt is several "
                             "messages; oapl takes a prompt of one user turn")
        rec = {"prompt": data.prompt_text,
               "verifiers": {"taskset": taskset,
                             "task": data.model_dump(mode="json", exclude_defaults=True)}}
        if data.system_prompt is not None:
            rec["system_prompt"] = data.system_prompt
        records.append(rec)
    return records
