"""The one-call GPU suite: correctness of every Triton kernel compiled for real, then benchmarks.

    python3 benchmarks/gpu_suite.py --out results/gpu      # (or: make gpu-suite)

Needs only torch, triton and this repository (not installed: the script puts the repo on
sys.path). Peers (Liger-Kernel, Cut Cross-Entropy) are measured when importable and skipped,
with the reason, when not. Writes <out>/gpu_suite.json and <out>/gpu_suite.md and prints the
markdown. Sized to finish in a few minutes on an H100.

Correctness: Triton vs the chunked PyTorch path (fp32 arithmetic on the same bf16 inputs) for
log-probs, entropy, dH, dW at shapes up to N=32768, D=4096, V=151936, plus a float64 check at
small odd shapes. Benchmarks: fwd and fwd+bwd time, peak memory above the inputs, achieved
TFLOP/s and the ratio to the 4-GEMM floor, measured with a plain bf16 matmul of the same sizes
in the same run.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from oapl_kernels import linear_logprobs, oapl_loss  # noqa: E402
from oapl_kernels.triton import launch  # noqa: E402


def _rel(a, b):
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def _inputs(n, d, v, dtype=torch.bfloat16, seed=0, scale=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(n, d, device="cuda", dtype=dtype, generator=g) * scale
    w = torch.randn(v, d, device="cuda", dtype=dtype, generator=g) * (1.0 / d ** 0.5)
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    return h, w, y


def _grads(impl, h, w, y, temperature, g_lp, g_ent):
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    lp, ent = linear_logprobs(h, w, y, temperature=temperature, return_entropy=True, impl=impl)
    (lp * g_lp + ent * g_ent).sum().backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def correctness(shapes):
    """Triton vs torch path on the GPU; float64 at the small shapes. Returns rows."""
    rows = []
    for n, d, v in shapes:
        t0 = time.time()
        h, w, y = _inputs(n, d, v, seed=n + v)
        y[1::7] = -100
        g = torch.Generator(device="cuda").manual_seed(1)
        g_lp = torch.randn(n, device="cuda", generator=g)
        g_ent = torch.randn(n, device="cuda", generator=g) * 0.1
        tri = _grads("triton", h, w, y, 0.8, g_lp, g_ent)
        if n * v <= 2**26:  # float64 materialized reference
            h64 = h.double().requires_grad_()
            w64 = w.double().requires_grad_()
            z = (h64 @ w64.T) / 0.8
            ls = z.log_softmax(-1)
            keep = y != -100
            lp = torch.where(keep, ls.gather(1, y.clamp(min=0)[:, None])[:, 0], 0.0)
            ent = torch.where(keep, -(ls.exp() * ls).sum(-1), 0.0)
            (lp * g_lp + ent * g_ent).sum().backward()
            ref, ref_name = (lp.detach(), ent.detach(), h64.grad, w64.grad), "float64"
        else:
            ref, ref_name = _grads("torch", h, w, y, 0.8, g_lp, g_ent), "torch path (fp32)"
        errs = [_rel(a, b) for a, b in zip(tri, ref)]
        ok = errs[0] < 1e-4 and errs[1] < 1e-3 and errs[2] < 3e-2 and errs[3] < 3e-2
        rows.append({"N": n, "D": d, "V": v, "reference": ref_name, "logp": errs[0], "entropy": errs[1],
                     "dH": errs[2], "dW": errs[3], "ok": ok, "s": round(time.time() - t0, 1)})
        print(f"  correctness N={n} D={d} V={v}: {rows[-1]}", flush=True)
        del h, w, y, tri, ref
        torch.cuda.empty_cache()
    return rows


def loss_correctness(b=64, t=96, d=1024, v=32003, group=8):
    """oapl_loss: Triton vs torch path (loss, dH, dW)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    h = torch.randn(b, t, d, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(v, d, device="cuda", dtype=torch.bfloat16, generator=g) / d ** 0.5
    y = torch.randint(0, v, (b, t), device="cuda", generator=g)
    inf_lp = -torch.rand(b, t, device="cuda", generator=g) * 3
    rewards = (torch.rand(b, device="cuda", generator=g) > 0.5).float()
    mask = torch.rand(b, t, device="cuda", generator=g) > 0.3
    out = {}
    for impl, fused in (("triton", True), ("triton", False), ("torch", False)):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        res = oapl_loss(hh, ww, y, inf_lp, rewards, mask, group_size=group, beta1=1.0, beta2=0.05,
                        temperature=0.9, impl=impl, fused=fused)
        res.loss.backward()
        out[impl, fused] = (res.loss.detach(), hh.grad, ww.grad)
    rows = []
    for fused in (True, False):
        errs = [_rel(a, b) for a, b in zip(out["triton", fused], out["torch", False])]
        rows.append({"B": b, "T": t, "D": d, "V": v, "fused": fused, "loss": errs[0], "dH": errs[1], "dW": errs[2],
                     "ok": errs[0] < 1e-3 and errs[1] < 3e-2 and errs[2] < 3e-2})
        print(f"  oapl_loss triton vs torch: {rows[-1]}", flush=True)
    return rows


def _time(fn, reps=5, warmup=2):
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


def _peak_above(fn, base_bytes):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base_bytes) / 2**30


def _naive(h, w, y):
    return torch.log_softmax((h @ w.T).float(), dim=-1).gather(1, y[:, None])[:, 0]


def _with_mode(mode, fn):
    """fn run with OAPL_LOGITS=mode ('gemm': cuBLAS logits into a workspace; 'tile': in-kernel)."""
    def run(*args, **kwargs):
        os.environ["OAPL_LOGITS"] = mode
        try:
            return fn(*args, **kwargs)
        finally:
            os.environ.pop("OAPL_LOGITS")
    return run


def _methods():
    """name -> fn(h, w, y) returning per-token log-probs [N] (differentiable), or a skip reason."""
    methods = {"oapl triton (gemm)": _with_mode("gemm", lambda h, w, y: linear_logprobs(h, w, y, impl="triton")),
               "oapl triton (tile)": _with_mode("tile", lambda h, w, y: linear_logprobs(h, w, y, impl="triton")),
               "naive torch": _naive}
    try:
        methods["naive torch.compile"] = torch.compile(_naive)
    except Exception as exc:  # noqa: BLE001 - report why and go on
        methods["naive torch.compile"] = f"torch.compile unavailable: {exc}"
    try:
        import peers

        tiny = _inputs(8, 64, 128)
        exact_cce = functools.partial(peers.cce_logprobs, filter_eps=None)
        for name, fn in (("liger", peers.liger_logprobs), ("cce (default gradient filter)", peers.cce_logprobs),
                         ("cce (exact, no filter)", exact_cce)):
            try:
                fn(*tiny)
                methods[name] = fn
            except ImportError as exc:
                methods[name] = f"not installed: {exc}"
    except ImportError as exc:
        methods["peers"] = f"benchmarks/peers.py unavailable: {exc}"
    return methods


def _measure(row, fn, h, w, extra, reps, with_fwd):
    """Fill ``row`` with the median time of fn's forward (when ``with_fwd``) and forward +
    backward on leaf copies of h and w, and its peak memory above the inputs. fn(h, w, *extra)
    returns a tensor to sum for the backward. A failure (out of memory, a peer's error) goes
    into row["skipped"] instead of stopping the suite."""
    try:
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
        base = torch.cuda.memory_allocated()

        def fwd():
            with torch.no_grad():
                fn(hh, ww, *extra)

        def fwd_bwd():
            hh.grad = ww.grad = None
            fn(hh, ww, *extra).sum().backward()

        if with_fwd:
            row["fwd_ms"] = _time(fwd, reps=reps)
        row["fwd_bwd_ms"] = _time(fwd_bwd, reps=reps)
        hh.grad = ww.grad = None
        torch.cuda.empty_cache()
        row["peak_gib_above_inputs"] = _peak_above(fwd_bwd, base)
    except torch.OutOfMemoryError:
        row["skipped"] = "out of memory"
    except Exception as exc:  # noqa: BLE001 - a peer's failure must not stop the suite
        row["skipped"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    hh = ww = None
    torch.cuda.empty_cache()
    print(f"    {row}", flush=True)


def bench(shapes, reps):
    rows = []
    methods = _methods()
    for n, d, v in shapes:
        h, w, y = _inputs(n, d, v, seed=5)
        a, b = torch.randn(n, d, device="cuda", dtype=torch.bfloat16), torch.randn(d, v, device="cuda", dtype=torch.bfloat16)
        gemm_ms = _time(lambda: a @ b, reps=reps)
        del a, b
        torch.cuda.empty_cache()
        floor_ms = 4 * gemm_ms
        flop = 8.0 * n * d * v
        print(f"  shape N={n} D={d} V={v}: bf16 GEMM {gemm_ms:.2f} ms "
              f"({2 * n * d * v / gemm_ms / 1e9:.0f} TFLOP/s), 4-GEMM floor {floor_ms:.1f} ms", flush=True)
        for name, fn in methods.items():
            row = {"N": n, "D": d, "V": v, "method": name, "gemm_ms": gemm_ms, "floor_ms": floor_ms}
            if isinstance(fn, str):
                rows.append({**row, "skipped": fn})
                continue
            _measure(row, fn, h, w, (y,), reps, with_fwd=True)
            if "skipped" not in row:
                row["tflops"] = flop / row["fwd_bwd_ms"] / 1e9
                row["x_floor"] = row["fwd_bwd_ms"] / floor_ms
            rows.append(row)
        del h, w, y
        torch.cuda.empty_cache()
    return rows


def _oapl_from_token_logprobs(logp, inf_lp, rewards, group, beta1=1.0, beta2=0.05):
    """The OAPL loss in plain torch from token log-probs [B, T] (all tokens on the mask)."""
    r = rewards.view(-1, group)
    v = beta1 * (torch.logsumexp(r / beta1, 1) - math.log(group))
    res = beta2 * (logp.sum(1) - inf_lp.sum(1)) - (rewards - v.repeat_interleave(group))
    return res.square().mean()


def _loss_methods():
    """name -> fn(h [B, T, D], w, y [B, T], inf_lp, rewards) returning the OAPL loss, or a skip reason."""
    def ours(fused, mode, workspace_mb=None):
        def run(h, w, y, inf_lp, rewards):
            if workspace_mb:
                os.environ["OAPL_WORKSPACE_MB"] = str(workspace_mb)
            try:
                return oapl_loss(h, w, y, inf_lp, rewards, torch.ones_like(y, dtype=torch.bool), group_size=8,
                                 beta1=1.0, beta2=0.05, fused=fused, impl="triton").loss
            finally:
                os.environ.pop("OAPL_WORKSPACE_MB", None)
        return _with_mode(mode, run)

    def via_token_logprobs(fn):
        def run(h, w, y, inf_lp, rewards):
            logp = fn(h.reshape(-1, h.shape[-1]), w, y.reshape(-1)).view(y.shape)
            return _oapl_from_token_logprobs(logp, inf_lp, rewards, 8)
        return run

    methods = {"oapl_loss fused (gemm)": ours(True, "gemm"),
               "oapl_loss fused (gemm, 8 GiB workspace)": ours(True, "gemm", 8192),
               "oapl_loss unfused (gemm)": ours(False, "gemm"),
               "oapl_loss unfused (tile)": ours(False, "tile"),
               "naive torch": via_token_logprobs(_naive)}
    try:
        import peers

        tiny = _inputs(8, 64, 128)
        peers.liger_logprobs(*tiny)
        methods["liger logprobs + torch loss"] = via_token_logprobs(peers.liger_logprobs)
    except ImportError as exc:
        methods["liger logprobs + torch loss"] = f"not installed: {exc}"
    return methods


def bench_loss(shapes, reps):
    """oapl_loss fwd+bwd at B x T tokens: fused vs unfused vs token log-probs from others."""
    rows = []
    methods = _loss_methods()
    for b, t, d, v in shapes:
        h, w, y = _inputs(b * t, d, v, seed=6)
        h, y = h.view(b, t, d), y.view(b, t)
        g = torch.Generator(device="cuda").manual_seed(2)
        inf_lp = -torch.rand(b, t, device="cuda", generator=g) * 0.01 - 10
        rewards = (torch.rand(b, device="cuda", generator=g) > 0.5).float()
        for name, fn in methods.items():
            row = {"B": b, "T": t, "D": d, "V": v, "method": name}
            if isinstance(fn, str):
                rows.append({**row, "skipped": fn})
                continue
            _measure(row, fn, h, w, (y, inf_lp, rewards), reps, with_fwd=False)
            if "skipped" not in row:
                row["tflops_4gemm"] = 8.0 * b * t * d * v / row["fwd_bwd_ms"] / 1e9
            rows.append(row)
        del h, w, y
        torch.cuda.empty_cache()
    return rows


def _markdown(env, corr, loss_rows, rows, loss_bench):
    out = [f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}; "
           f"autotuned configs: {env.get('configs')}", "",
           "### Correctness (max abs error / max abs reference)", "",
           "| logits | N | D | V | reference | logp | entropy | dH | dW | ok |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in corr:
        out.append(f"| {r['mode']} | {r['N']} | {r['D']} | {r['V']} | {r['reference']} | {r['logp']:.1e} | {r['entropy']:.1e} "
                   f"| {r['dH']:.1e} | {r['dW']:.1e} | {r['ok']} |")
    out += [""] + [f"oapl_loss Triton (fused={r['fused']}) vs torch path (B={r['B']}, T={r['T']}, D={r['D']}, "
                   f"V={r['V']}): loss {r['loss']:.1e}, dH {r['dH']:.1e}, dW {r['dW']:.1e}, ok={r['ok']}"
                   for r in loss_rows] + ["",
            "### Speed and memory (bf16, fwd+bwd of per-token log-probs)", "",
            "| N | D | V | method | fwd ms | fwd+bwd ms | TFLOP/s | x 4-GEMM floor | peak GiB above inputs |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['N']} | {r['D']} | {r['V']} | {r['method']} | skipped: {r['skipped']} | | | | |")
        else:
            out.append(f"| {r['N']} | {r['D']} | {r['V']} | {r['method']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} "
                       f"| {r['tflops']:.0f} | {r['x_floor']:.2f} | {r['peak_gib_above_inputs']:.2f} |")
    out += ["", "### oapl_loss fwd+bwd (bf16; B sequences x T tokens, all on the mask, group 8)", "",
            "| B | T | D | V | method | fwd+bwd ms | 4-GEMM-equivalent TFLOP/s | peak GiB above inputs |",
            "|---|---|---|---|---|---|---|---|"]
    for r in loss_bench:
        if "skipped" in r:
            out.append(f"| {r['B']} | {r['T']} | {r['D']} | {r['V']} | {r['method']} | skipped: {r['skipped']} | | |")
        else:
            out.append(f"| {r['B']} | {r['T']} | {r['D']} | {r['V']} | {r['method']} | {r['fwd_bwd_ms']:.1f} "
                       f"| {r['tflops_4gemm']:.0f} | {r['peak_gib_above_inputs']:.2f} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/gpu")
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_suite needs a CUDA device")
    import triton

    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(env, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    small = [(1, 64, 1000), (257, 128, 5003), (1000, 96, 32771)]
    big = [(4096, 4096, 151936), (32768, 4096, 151936)]
    bench_shapes = [(4096, 4096, 32000), (8192, 4096, 151936), (32768, 4096, 151936)]
    loss_shapes = [(16, 512, 4096, 151936), (64, 512, 4096, 151936)]
    if args.quick:
        big, bench_shapes, loss_shapes = [], [(4096, 2048, 32000)], [(8, 512, 2048, 32000)]
    t0 = time.time()
    result = {"env": env}
    try:
        result["correctness"] = [dict(r, mode="gemm") for r in _with_mode("gemm", correctness)(small + big)]
        result["correctness"] += [dict(r, mode="tile") for r in _with_mode("tile", correctness)(small + big[:1])]
        result["loss"] = loss_correctness()
        result["bench"] = bench(bench_shapes, args.reps)
        result["loss_bench"] = bench_loss(loss_shapes, args.reps)
        env["configs"] = {k: str(getattr(launch._autotuned(k, False), "best_config", None)) for k in ("fwd", "dz")}
    except Exception:  # noqa: BLE001 - keep what was measured
        result["error"] = traceback.format_exc()
        print(result["error"], flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    (out / "gpu_suite.json").write_text(json.dumps(result, indent=1))
    if "bench" in result:
        md = _markdown(env, result["correctness"], result["loss"], result["bench"], result.get("loss_bench", []))
        (out / "gpu_suite.md").write_text(md)
        print(md)
    print(f"gpu suite: {result['seconds']} s", flush=True)
    ok = all(r["ok"] for r in result.get("correctness", []) + result.get("loss", []))
    sys.exit(1 if "error" in result or not ok else 0)


if __name__ == "__main__":
    main()
