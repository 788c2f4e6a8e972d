"""Shared pieces of the benchmark suites: shapes, inputs, the naive baselines, the cases, checks
and peak-memory measurement.

Shape sets: ``pytest --benchmark-disable`` (what ``make test`` runs) and ``OAPL_BENCH_FAST=1``
use tiny shapes so every case runs in well under a second and still checks its result against
a float64 reference; ``make bench`` (``--benchmark-only``) uses the real shapes of the device.
"""
from __future__ import annotations

import ctypes
import gc
import itertools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

from oapl_kernels import linear_logprobs, oapl_loss, tuning

from . import naive

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GROUP_SIZE, BETA1, BETA2 = 4, 1.0, 0.05  # groups of GROUP_SIZE rows, fewer when B is smaller
OPS = ("logprobs_fwd", "logprobs_fwdbwd", "oapl_fwdbwd")


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: N = batch * seq tokens of hidden size D over a vocabulary V; in the
    loss cases each row's first ``prompt`` tokens are off the mask (None: seq // 4)."""

    batch: int
    seq: int
    d: int
    v: int
    dtype: str = "fp32"
    prompt: int | None = None

    @property
    def n(self) -> int:
        return self.batch * self.seq

    @property
    def prompt_len(self) -> int:
        return self.seq // 4 if self.prompt is None else self.prompt

    @property
    def id(self) -> str:
        base = f"N{self.n}-D{self.d}-V{self.v}-{self.dtype}"
        return base if self.prompt is None else f"B{self.batch}xT{self.seq}-P{self.prompt}-D{self.d}-V{self.v}-{self.dtype}"


# Tiny shapes: V not a multiple of any chunk or block, groups of GROUP_SIZE rows.
FAST_SHAPES = [Shape(8, 8, 32, 1000)]
CPU_SHAPES = [Shape(4, 512, 128, 32000), Shape(8, 512, 64, 65536)]
# Long completions (the loss suite only): one sequence of 8,192 tokens, all on the mask, and the
# same tokens as 64 sequences of 128.
CPU_LONG_SHAPES = [Shape(1, 8192, 64, 32768, prompt=0), Shape(64, 128, 64, 32768, prompt=0)]
CUDA_SHAPES = [Shape(8, 1024, 4096, 32000, "bf16"), Shape(8, 1024, 4096, 151936, "bf16"),
               Shape(32, 1024, 4096, 151936, "bf16")]


def fast_mode(config: pytest.Config) -> bool:
    """True under --benchmark-disable (make test) or OAPL_BENCH_FAST=1: tiny shapes only."""
    return bool(config.getoption("benchmark_disable")) or os.environ.get("OAPL_BENCH_FAST") == "1"


def device() -> torch.device:
    """The device the suites run on: CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    """The GPU's name on CUDA (e.g. for the reports), else "cpu"."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def impls(op: str, dev: torch.device) -> list[str]:
    """Implementations benchmarked for ``op`` on ``dev``; the Triton interpreter is never used."""
    ours = ["triton", "torch"] if dev.type == "cuda" else ["torch"]
    if op == "oapl_fwdbwd":  # the fused loss (default) and forward + recomputing backward
        ours += [f"{impl}-unfused" for impl in ours]
    peers = ["liger", "cce"] if dev.type == "cuda" and op.startswith("logprobs") else []
    return ours + ["naive", "naive-compile"] + peers


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``shape`` and ``impl`` from the mode and the device (imported by the suites)."""
    if "shape" not in metafunc.fixturenames:
        return
    dev = device()
    shapes = FAST_SHAPES if fast_mode(metafunc.config) else (CUDA_SHAPES if dev.type == "cuda" else CPU_SHAPES)
    if metafunc.function.__name__ == "test_oapl_fwdbwd" and dev.type == "cpu" and not fast_mode(metafunc.config):
        shapes = shapes + CPU_LONG_SHAPES
    metafunc.parametrize("shape", shapes, ids=[s.id for s in shapes])
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize("impl", impls(metafunc.function.__name__.removeprefix("test_"), dev))


def make_inputs(shape: Shape, dev: torch.device, seed: int = 0) -> dict:
    """Random inputs with logits ~ N(0, 1): hidden [B, T, D], weight [V, D], targets, OAPL extras."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[shape.dtype]
    b, t = shape.batch, shape.seq
    hidden = torch.randn(b, t, shape.d, generator=g).to(dev, dt)
    weight = (torch.randn(shape.v, shape.d, generator=g) / math.sqrt(shape.d)).to(dev, dt)
    targets = torch.randint(0, shape.v, (b, t), generator=g).to(dev)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[:, : shape.prompt_len] = False  # a prompt prefix outside the completion
    return {
        "hidden": hidden, "weight": weight, "targets": targets,
        "grad": torch.randn(b, t, generator=g).to(dev),  # upstream gradient of the log-probs
        "inference_logprobs": (-torch.rand(b, t, generator=g) * 5).to(dev),
        "rewards": torch.randint(0, 2, (b,), generator=g).float().to(dev),
        "mask": mask.to(dev),
    }


def group_size(batch: int) -> int:
    """Completions per prompt in the loss cases: GROUP_SIZE, or a divisor of a smaller batch."""
    return math.gcd(GROUP_SIZE, batch)


def naive_logprobs(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The baseline: materialized logits, fp32 log_softmax, gather."""
    return naive.logprobs(h, w, y)


def naive_oapl(h, w, y, inference_logprobs, rewards, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """OAPL loss with materialized logits; also the mean entropy, as ``oapl_loss`` reports it."""
    out = naive.oapl(h, w, y, inference_logprobs, rewards, mask, group_size=group_size(len(rewards)),
                     beta1=BETA1, beta2=BETA2)
    return out["loss"], out["entropy_mean"]


_COMPILED: dict = {}


def _compiled(fn):
    """torch.compile(fn, dynamic=False), built once per process (it compiles on first call)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def _logprobs_fn(impl: str):
    if impl in ("torch", "triton"):
        return lambda h, w, y: linear_logprobs(h, w, y, impl=impl)
    if impl == "naive":
        return naive_logprobs
    if impl == "naive-compile":
        return _compiled(naive_logprobs)
    from . import peers  # CUDA only; raises ImportError when the package is absent

    return {"liger": peers.liger_logprobs, "cce": peers.cce_logprobs}[impl]


def _loss_fn(impl: str):
    if impl.removesuffix("-unfused") in ("torch", "triton"):
        kernel, fused = impl.removesuffix("-unfused"), not impl.endswith("-unfused")

        def ours(h, w, y, ref, r, m):
            out = oapl_loss(h, w, y, ref, r, m, group_size=group_size(len(r)), beta1=BETA1, beta2=BETA2,
                            impl=kernel, fused=fused)
            return out.loss, out.entropy_mean
        return ours
    return naive_oapl if impl == "naive" else _compiled(naive_oapl)


def make_case(op: str, impl: str, inputs: dict):
    """A zero-argument callable running ``op`` once with ``impl`` on ``inputs``.

    It returns what the check compares: (logp,) for the forward, (logp, dH, dW) for
    log-probs fwd+bwd (upstream gradient ``inputs["grad"]``), (loss, dH, dW) for the OAPL loss.
    """
    h, w, y = inputs["hidden"], inputs["weight"], inputs["targets"]
    sync = torch.cuda.synchronize if h.is_cuda else (lambda: None)
    if op == "logprobs_fwd":
        fn = _logprobs_fn(impl)
        h2, y2 = h.reshape(-1, h.shape[-1]), y.reshape(-1)

        def run():
            with torch.no_grad():
                out = fn(h2, w, y2)
            sync()
            return (out,)
        return run
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    if op == "logprobs_fwdbwd":
        fn = _logprobs_fn(impl)
        h2, y2, g = h.view(-1, h.shape[-1]), y.reshape(-1), inputs["grad"].reshape(-1)

        def forward():
            logp = fn(h2, w, y2)
            return (logp * g).sum(), logp
    elif op == "oapl_fwdbwd":
        fn = _loss_fn(impl)
        extra = (inputs["inference_logprobs"], inputs["rewards"], inputs["mask"])

        def forward():
            loss, _entropy = fn(h, w, y, *extra)
            return loss, loss
    else:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")

    def run():
        loss, value = forward()
        loss.backward()
        sync()
        grads = (h.grad, w.grad)
        h.grad = w.grad = None  # the caller owns the gradients: they die with the result
        return (value.detach(),) + grads
    return run


def _tolerance(dtype: str) -> dict:
    return {"atol": 2e-4, "rtol": 1e-4} if dtype == "fp32" else {"atol": 0.1, "rtol": 0.05}


def check(op: str, impl: str, shape: Shape, inputs: dict, result: tuple, rows: int = 256) -> None:
    """Assert that ``result`` (of ``make_case(op, impl, inputs)()``) matches a float64 naive run.

    When the float64 logits of the whole batch fit in 256 MB everything is compared (values or
    loss, dH, dW); otherwise the log-probs and dH of the first sequences (>= ``rows`` tokens;
    each row's dH depends on that row only) and, for the loss, only that it is finite. Peers'
    gradients are not compared (CCE filters small gradient tiles by design).
    """
    if impl in ("liger", "cce"):
        result = result[:1]
    whole = shape.n * shape.v * 8 <= 2**28
    if not whole and op == "oapl_fwdbwd":
        assert all(bool(torch.isfinite(x).all()) for x in result), f"{impl} {op}: non-finite result"
        return
    ref = {k: (v.detach().double() if v.is_floating_point() else v) for k, v in inputs.items()}
    if not whole:
        n_seq = -(-rows // shape.seq)
        ref = {k: (v if k == "weight" else v[:n_seq]) for k, v in ref.items()}
        result = tuple(x.reshape(shape.batch, shape.seq, -1)[:n_seq] for x in result[:2])
    expected = make_case(op, "naive", ref)()
    names = ("loss", "dH", "dW") if op == "oapl_fwdbwd" else ("values", "dH", "dW")
    for name, exp, got in zip(names, expected, result):
        torch.testing.assert_close(got.double().reshape(exp.shape), exp, **_tolerance(shape.dtype),
                                   msg=lambda m, n=name: f"{impl} {op} {n}: {m}")


def run_or_skip(run, impl: str):
    """Call ``run()``; for the compiled baseline, skip the test (with the reason) if compiling fails."""
    if impl != "naive-compile":
        return run()
    try:
        return run()
    except Exception as exc:  # inductor raises many types (no compiler, unsupported op, ...)
        pytest.skip(f"torch.compile of the naive baseline fails on this machine: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}")


# ---- peak memory ---------------------------------------------------------------------------
# CUDA: torch.cuda.max_memory_allocated around one call, minus what was allocated before it.
# CPU: there is no allocator counter, so each case runs in a fresh subprocess (no heap state
# left over from other cases). After building the inputs and a warm-up call, the process hands
# free heap pages back to the OS (glibc malloc_trim), resets its resident-set high-water mark
# (VmHWM, via /proc/self/clear_refs; ru_maxrss cannot be reset), runs the case once and reports
# VmHWM - VmRSS at the reset: the peak memory the call adds on top of its inputs, outputs and
# gradients included. Tensors of >= 32 MB are mmapped by glibc and unmapped when freed; smaller
# freed blocks may stay resident, so the number can come out slightly high, never low.


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> int:
    """Return free heap pages to the OS, reset VmHWM to the current RSS; return that RSS in bytes."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kb("VmRSS") * 1024


def peak_rss(fn) -> tuple[object, int]:
    """Run ``fn()``; return its result and the process's resident-set high-water mark during the
    call above the resident set before it (bytes; every allocation, torch's or not; see above)."""
    base = _reset_peak_rss()
    out = fn()
    return out, _proc_status_kb("VmHWM") * 1024 - base


def peak_allocated(fn) -> tuple[object, int]:
    """Run ``fn()``; return its result and the peak bytes that torch's allocator held during the
    call above what it held before (tensors alive at the end, the result's included, count).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocation and free events that
    ``torch.profiler`` records with ``profile_memory=True``, summed in time order. In-process
    and exact to the byte, but blind to memory not allocated through torch (the Triton
    interpreter's numpy arrays, Python objects); :func:`measure` sees the whole process.
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return out, max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def time_interleaved(calls: list, rows: list[dict], rounds: int) -> None:
    """Time each zero-argument call of ``calls`` ``rounds`` times, rounds interleaved (A B C A B C
    ...) so a drifting machine load hits every case alike; fill its row of ``rows`` with
    ``cpu_s`` / ``wall_s`` (lists: CPU seconds, user + system of this process, the figure to
    compare on a shared machine; wall seconds) and their medians ``cpu_median_s`` /
    ``wall_median_s``."""
    for row in rows:
        row["cpu_s"], row["wall_s"] = [], []
    for _ in range(rounds):
        for call, row in zip(calls, rows):
            c0, w0 = time.process_time(), time.perf_counter()
            call()
            row["cpu_s"].append(time.process_time() - c0)
            row["wall_s"].append(time.perf_counter() - w0)
    for row in rows:
        row["cpu_median_s"] = sorted(row["cpu_s"])[len(row["cpu_s"]) // 2]
        row["wall_median_s"] = sorted(row["wall_s"])[len(row["wall_s"]) // 2]


def measure_cases(calls: list, rows: list[dict], rounds: int) -> None:
    """Per zero-argument call of ``calls``: one warm-up call, then the peak bytes of one more
    (:func:`peak_allocated`) as ``peak_bytes`` in its row of ``rows``; then every call timed
    ``rounds`` times by :func:`time_interleaved`."""
    for call, row in zip(calls, rows):
        call()  # warm-up
        row["peak_bytes"] = peak_allocated(call)[1]
    time_interleaved(calls, rows, rounds)


def timing_table(lead: list[str], align: list[str], base_name: str, lines: list[tuple]) -> str:
    """A markdown table of :func:`measure_cases` rows: the ``lead`` columns (alignment cells
    ``align``, e.g. "---:"), then CPU and wall medians, peak MiB, and the CPU and peak ratios to a
    base row named ``base_name`` in the titles; ``lines`` holds per table row (its lead cells
    joined by " | ", its measured row, its base row)."""
    out = ["| " + " | ".join(lead) + " | CPU s (median) | wall s (median) | peak MiB | "
           f"CPU vs {base_name} | peak vs {base_name} |", "|" + "|".join(align) + "|---:|---:|---:|---:|---:|"]
    for cells, row, base in lines:
        out.append(f"| {cells} | {row['cpu_median_s']:.2f} | {row['wall_median_s']:.2f} | "
                   f"{row['peak_bytes'] / 2**20:,.1f} | {row['cpu_median_s'] / base['cpu_median_s']:.2f}x | "
                   f"{row['peak_bytes'] / base['peak_bytes']:.2f}x |")
    return "\n".join(out)


def emit(rows: list[dict], table: str, json_path: str | None) -> None:
    """Print a benchmark's markdown ``table``; write its ``rows`` as JSON to ``json_path`` if given."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rows, indent=1))
    print(table)


def measure(op: str, impl: str, shape: Shape, *, repeat: int = 1, warmup: int = 1) -> dict:
    """Run one case in this process: peak extra memory of one call and the best of ``repeat`` times.

    On the CPU call it in a fresh process (see :func:`measure_subprocess`) for a clean peak.
    """
    dev = device()
    inputs = make_inputs(shape, dev)
    run = make_case(op, impl, inputs)
    for _ in range(warmup):
        run()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        if i == 0:
            peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
                    else _proc_status_kb("VmHWM") * 1024) - base
    return {"op": op, "impl": impl, "shape": asdict(shape), "device": dev.type,
            "peak_bytes": peak, "seconds": min(times), "times": times}


def measure_subprocess(op: str, impl: str, shape: Shape, *, repeat: int = 1, warmup: int = 1,
                       timeout: float = 900) -> dict:
    """:func:`measure` in a fresh Python process (``python -m benchmarks.probe``); returns its dict."""
    cmd = [sys.executable, "-m", "benchmarks.probe", op, impl, json.dumps(asdict(shape)),
           "--repeat", str(repeat), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_memory(op: str, impl: str, shape: Shape) -> int:
    """Peak bytes one call of the case adds: in-process on CUDA, in a fresh process on the CPU."""
    if device().type == "cuda":
        return measure(op, impl, shape)["peak_bytes"]
    return measure_subprocess(op, impl, shape)["peak_bytes"]


# ---- the benchmark body shared by the suites -------------------------------------------------
_ROUNDS = {"cpu": 3, "cuda": 10}


def bench_case(benchmark, request, op: str, impl: str, shape: Shape) -> None:
    """Benchmark one case, check its result, record peak memory in extra_info (timed runs only)."""
    dev = device()
    inputs = make_inputs(shape, dev)
    run = make_case(op, impl, inputs)
    check(op, impl, shape, inputs, run_or_skip(run, impl))  # also the warm-up / compile
    benchmark.group = f"{op} {shape.id}"
    benchmark.extra_info.update(op=op, impl=impl, shape=shape.id, device=dev.type,
                                device_name=device_name(), torch=torch.__version__)
    benchmark.pedantic(run, rounds=_ROUNDS[dev.type], warmup_rounds=1 if dev.type == "cuda" else 0)
    if not fast_mode(request.config):
        del inputs, run
        benchmark.extra_info["peak_bytes"] = peak_memory(op, impl, shape)


# ---- CUDA: inputs, timing and the correctness checks of the compiled kernels ---------------
# Shared by benchmarks/gpu_suite.py (the one-call GPU suite) and tests/test_cuda.py (pytest -m cuda).


def cuda_inputs(n: int, d: int, v: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0, scale: float = 1.0):
    """hidden [n, d] (N(0, scale^2)), weight [v, d] (N(0, 1/d)) and targets [n] on CUDA."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(n, d, device="cuda", dtype=dtype, generator=g) * scale
    w = torch.randn(v, d, device="cuda", dtype=dtype, generator=g) * (1.0 / d ** 0.5)
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    return h, w, y


def with_logits_mode(mode: str, fn):
    """fn run with OAPL_LOGITS=mode ('gemm': cuBLAS logits into the workspace; 'tile': in-kernel)."""
    def run(*args, **kwargs):
        os.environ["OAPL_LOGITS"] = mode
        try:
            return fn(*args, **kwargs)
        finally:
            os.environ.pop("OAPL_LOGITS")
    return run


def time_cuda_ms(fn, reps: int = 5, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _leaf_grads(impl, h, w, y, temperature, g_lp, g_ent, dtype=None):
    h = (h if dtype is None else h.to(dtype)).detach().requires_grad_()
    w = (w if dtype is None else w.to(dtype)).detach().requires_grad_()
    if impl == "float64":
        lp, ent = naive.logprobs(h, w, y, temperature=temperature, return_entropy=True)
    else:
        lp, ent = linear_logprobs(h, w, y, temperature=temperature, return_entropy=True, impl=impl)
    (lp * g_lp + ent * g_ent).sum().backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def logprobs_check(n: int, d: int, v: int, dtype: torch.dtype = torch.bfloat16, temperature: float = 0.8) -> dict:
    """linear_logprobs through the compiled Triton kernels (in the current OAPL_LOGITS mode) vs
    float64 with materialized logits when n * v <= 2**26, else vs the torch path (fp32
    arithmetic on the same inputs): relative errors of logp, entropy, dH, dW and ``ok``."""
    t0 = time.time()
    h, w, y = cuda_inputs(n, d, v, dtype, seed=n + v)
    y[1::7] = -100
    g = torch.Generator(device="cuda").manual_seed(1)
    g_lp = torch.randn(n, device="cuda", generator=g)
    g_ent = torch.randn(n, device="cuda", generator=g) * 0.1
    ours = _leaf_grads("triton", h, w, y, temperature, g_lp, g_ent)
    small = n * v <= 2**26
    ref = _leaf_grads("float64" if small else "torch", h, w, y, temperature, g_lp, g_ent,
                      torch.float64 if small else None)
    errs = [naive.rel_err(a, b) for a, b in zip(ours, ref)]
    # fp32 tiles computed in-kernel go through tl.dot's default TF32 tensor-core precision.
    tf32 = dtype == torch.float32 and tuning.logits_mode_requested() == "tile"
    grad_tol = 1e-2 if tf32 else 1e-5 if dtype == torch.float32 else 3e-2
    lp_tol = 1e-2 if tf32 else 1e-4
    return {"N": n, "D": d, "V": v, "dtype": str(dtype).removeprefix("torch."),
            "reference": "float64" if small else "torch path (fp32)",
            "logp": errs[0], "entropy": errs[1], "dH": errs[2], "dW": errs[3],
            "ok": errs[0] < lp_tol and errs[1] < max(lp_tol, 1e-3) and errs[2] < grad_tol and errs[3] < grad_tol,
            "s": round(time.time() - t0, 1)}


def loss_check(b: int, t: int, d: int, v: int, group: int = 8, workspace_bytes: int | None = None) -> list[dict]:
    """oapl_loss through the Triton kernels, fused and unfused, vs float64 with materialized
    logits (vs the torch path when the float64 logits would pass 4 GiB): relative errors of
    loss, dH, dW and ``ok`` per row. A small ``workspace_bytes`` splits sequences across chunks."""
    g = torch.Generator(device="cuda").manual_seed(3)
    h = torch.randn(b, t, d, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(v, d, device="cuda", dtype=torch.bfloat16, generator=g) / d ** 0.5
    y = torch.randint(0, v, (b, t), device="cuda", generator=g)
    inf_lp = -torch.rand(b, t, device="cuda", generator=g) * 3
    rewards = (torch.rand(b, device="cuda", generator=g) > 0.5).float()
    mask = torch.rand(b, t, device="cuda", generator=g) > 0.3
    kw = {"group_size": group, "beta1": 1.0, "beta2": 0.05, "temperature": 0.9}
    small = b * t * v * 8 <= 4 * 2**30
    if small:
        h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
        loss64 = naive.oapl(h64, w64, y, inf_lp, rewards, mask, **kw)["loss"]
        loss64.backward()
        ref = (loss64.detach(), h64.grad, w64.grad)
    rows = []
    for impl, fused in (("torch", False), ("triton", True), ("triton", False)):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = oapl_loss(hh, ww, y, inf_lp, rewards, mask, impl=impl, fused=fused, workspace_bytes=workspace_bytes, **kw)
        out.loss.backward()
        got = (out.loss.detach(), hh.grad, ww.grad)
        if not small and impl == "torch":
            ref = got
            continue
        errs = [naive.rel_err(a, e) for a, e in zip(got, ref)]
        rows.append({"B": b, "T": t, "D": d, "V": v, "impl": impl, "fused": fused, "workspace_bytes": workspace_bytes,
                     "reference": "float64" if small else "torch path (fp32)", "loss": errs[0], "dH": errs[1],
                     "dW": errs[2], "ok": errs[0] < 1e-3 and errs[1] < 3e-2 and errs[2] < 3e-2})
    return rows
