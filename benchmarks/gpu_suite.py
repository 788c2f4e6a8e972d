"""The one-call GPU suite: correctness of every Triton kernel compiled for real, then benchmarks.

    python3 benchmarks/gpu_suite.py --out results/gpu      # (or: make gpu-suite)

Needs only torch, triton, pytest and this repository (not installed: the script puts the repo
on sys.path). Peers (Liger-Kernel, Cut Cross-Entropy) are measured when importable and skipped,
with the reason, when not. Writes <out>/gpu_suite.json and <out>/gpu_suite.md and prints the
markdown. Sized to finish in a few minutes on an H100.

Correctness (the checks of ``benchmarks.common``, also run by ``pytest -m cuda``): Triton vs
float64 at small odd shapes (bf16, fp16, fp32) and vs the chunked PyTorch path (fp32
arithmetic on the same bf16 inputs) for log-probs, entropy, dH, dW at shapes up to N=32768,
D=4096, V=151936; oapl_loss fused and unfused, also with sequences split across chunks.
Benchmarks: fwd and fwd+bwd time, peak memory above the inputs, achieved TFLOP/s and the ratio
to the 4-GEMM floor, measured with a plain bf16 matmul of the same sizes in the same run; the
loss at B x T = 64 x 512 and 4 x 16,384 (long completions); gradient filtering on and off
(``grad_filter_eps`` 0, 1e-4, 1e-3) for the fused loss at N = 32,768 on peaked logits (hidden
states scaled by 4), with the share of vocab blocks skipped and the gradient's error against
the unfiltered one. Sized to finish in under 8 minutes on an H100/H200.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import naive  # noqa: E402
from benchmarks.common import (cuda_inputs, logprobs_check, loss_check, peak_allocated,  # noqa: E402
                               time_cuda_ms, with_logits_mode)
from oapl_kernels import filtering, linear_logprobs, oapl_loss, optimal_values  # noqa: E402
from oapl_kernels.objective import OAPLObjective  # noqa: E402
from oapl_kernels.triton import launch  # noqa: E402


def correctness(shapes):
    """Every kernel compiled for real: linear_logprobs in the current logits mode vs float64
    (small shapes) or the torch path (large ones); shapes are (N, D, V, dtype). Returns rows."""
    rows = []
    for n, d, v, dtype in shapes:
        rows.append(logprobs_check(n, d, v, dtype))
        print(f"  correctness N={n} D={d} V={v}: {rows[-1]}", flush=True)
        torch.cuda.empty_cache()
    return rows


def _naive(h, w, y):
    return naive.logprobs(h, w, y)


def _methods():
    """name -> fn(h, w, y) returning per-token log-probs [N] (differentiable), or a skip reason."""
    methods = {"oapl triton (gemm)": with_logits_mode("gemm", lambda h, w, y: linear_logprobs(h, w, y, impl="triton")),
               "oapl triton (tile)": with_logits_mode("tile", lambda h, w, y: linear_logprobs(h, w, y, impl="triton")),
               "naive torch": _naive}
    try:
        methods["naive torch.compile"] = torch.compile(_naive)
    except Exception as exc:  # noqa: BLE001 - report why and go on
        methods["naive torch.compile"] = f"torch.compile unavailable: {exc}"
    try:
        from benchmarks import peers

        tiny = cuda_inputs(8, 64, 128)
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

        def fwd():
            with torch.no_grad():
                fn(hh, ww, *extra)

        def fwd_bwd():
            hh.grad = ww.grad = None
            fn(hh, ww, *extra).sum().backward()

        if with_fwd:
            row["fwd_ms"] = time_cuda_ms(fwd, reps=reps)
        row["fwd_bwd_ms"] = time_cuda_ms(fwd_bwd, reps=reps)
        hh.grad = ww.grad = None
        torch.cuda.empty_cache()
        row["peak_gib_above_inputs"] = peak_allocated(fwd_bwd)[1] / 2**30
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
        h, w, y = cuda_inputs(n, d, v, seed=5)
        a, b = torch.randn(n, d, device="cuda", dtype=torch.bfloat16), torch.randn(d, v, device="cuda", dtype=torch.bfloat16)
        gemm_ms = time_cuda_ms(lambda: a @ b, reps=reps)
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
    """The OAPL loss (oapl_kernels.objective) from token log-probs [B, T] (all tokens on the mask)."""
    values = optimal_values(rewards, group_size=group, beta1=beta1).repeat_interleave(group)
    objective = OAPLObjective(inf_lp.sum(1), rewards - values, beta2)
    return objective.loss(objective.residuals(logp.sum(1)))


def _loss_methods():
    """name -> fn(h [B, T, D], w, y [B, T], inf_lp, rewards) returning the OAPL loss, or a skip reason."""
    def ours(fused, mode, workspace_gib=None):
        def run(h, w, y, inf_lp, rewards):
            workspace = int(workspace_gib * 2**30) if workspace_gib else None
            return oapl_loss(h, w, y, inf_lp, rewards, torch.ones_like(y, dtype=torch.bool),
                             group_size=math.gcd(8, len(rewards)), beta1=1.0, beta2=0.05, fused=fused,
                             impl="triton", workspace_bytes=workspace).loss
        return with_logits_mode(mode, run)

    def via_token_logprobs(fn):
        def run(h, w, y, inf_lp, rewards):
            logp = fn(h.reshape(-1, h.shape[-1]), w, y.reshape(-1)).view(y.shape)
            return _oapl_from_token_logprobs(logp, inf_lp, rewards, math.gcd(8, len(rewards)))
        return run

    methods = {"oapl_loss fused (gemm)": ours(True, "gemm"),
               "oapl_loss fused (gemm, 8 GiB workspace)": ours(True, "gemm", 8),
               "oapl_loss unfused (gemm)": ours(False, "gemm"),
               "oapl_loss unfused (tile)": ours(False, "tile"),
               "naive torch": via_token_logprobs(_naive)}
    try:
        from benchmarks import peers

        tiny = cuda_inputs(8, 64, 128)
        peers.liger_logprobs(*tiny)
        methods["liger logprobs + torch loss"] = via_token_logprobs(peers.liger_logprobs)
    except ImportError as exc:
        methods["liger logprobs + torch loss"] = f"not installed: {exc}"
    return methods


def _loss_inputs(b, t, d, v, *, seed, batch_seed, scale=1.0):
    """The OAPL loss's CUDA inputs for B x T tokens: hidden states [B, T, D] (bf16, times
    ``scale``), head [V, D], targets [B, T], sampler log-probs [B, T] (fp32, near -10) and
    binary rewards [B]."""
    h, w, y = cuda_inputs(b * t, d, v, seed=seed, scale=scale)
    g = torch.Generator(device="cuda").manual_seed(batch_seed)
    inf_lp = -torch.rand(b, t, device="cuda", generator=g) * 0.01 - 10
    rewards = (torch.rand(b, device="cuda", generator=g) > 0.5).float()
    return h.view(b, t, d), w, y.view(b, t), inf_lp, rewards


def bench_loss(shapes, reps):
    """oapl_loss fwd+bwd at B x T tokens: fused vs unfused vs token log-probs from others."""
    rows = []
    methods = _loss_methods()
    for b, t, d, v in shapes:
        h, w, y, inf_lp, rewards = _loss_inputs(b, t, d, v, seed=6, batch_seed=2)
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


def bench_filter(b, t, d, v, eps_list, reps):
    """The fused oapl_loss at B x T tokens with grad_filter_eps in ``eps_list`` (0 first): time,
    blocks skipped, and dH / dW max relative error against eps = 0, on hidden states scaled by 4."""
    h, w, y, inf_lp, rewards = _loss_inputs(b, t, d, v, seed=7, batch_seed=4, scale=4.0)
    mask = torch.ones_like(y, dtype=torch.bool)
    rows, exact = [], None
    for eps in eps_list:
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()

        def run():
            hh.grad = ww.grad = None
            oapl_loss(hh, ww, y, inf_lp, rewards, mask, group_size=8, beta1=1.0, beta2=0.05, impl="triton",
                      grad_filter_eps=eps).loss.backward()

        row = {"B": b, "T": t, "D": d, "V": v, "eps": eps}
        try:
            row["fwd_bwd_ms"] = with_logits_mode("gemm", lambda: time_cuda_ms(run, reps=reps))()
            with filtering.count() as counts:
                with_logits_mode("gemm", run)()
            row["skipped"] = counts.skipped_fraction
            grads = (hh.grad.float(), ww.grad.float())
            exact = exact or grads
            row["dH_err"], row["dW_err"] = (naive.rel_err(a, e) for a, e in zip(grads, exact))
        except torch.OutOfMemoryError:
            row["skipped_run"] = "out of memory"
        rows.append(row)
        print(f"    {row}", flush=True)
    del h, w, y, exact
    torch.cuda.empty_cache()
    return rows


def _table(keys, measured, rows, cells, skip_key="skipped"):
    """A markdown table's lines: per row its values of ``keys`` (column titles, or "title=key"),
    then ``cells(row)`` (the ``measured`` columns joined by " | "), or the reason in
    ``row[skip_key]`` where the case did not run."""
    titles = [k.split("=")[0] for k in keys]
    keys = [k.split("=")[-1] for k in keys]
    out = ["| " + " | ".join(titles + measured) + " |", "|" + "---|" * (len(keys) + len(measured))]
    for r in rows:
        lead = " | ".join(f"{r[k]:g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
        rest = f"skipped: {r[skip_key]}" + " |" * (len(measured) - 1) if skip_key in r else cells(r)
        out.append(f"| {lead} | {rest} |")
    return out


def _markdown(env, corr, loss_rows, rows, loss_bench, filter_rows=()):
    out = [f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}; "
           f"autotuned configs: {env.get('configs')}", "",
           "### Correctness (max abs error / max abs reference)", "",
           "| logits | N | D | V | dtype | reference | logp | entropy | dH | dW | ok |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in corr:
        out.append(f"| {r['mode']} | {r['N']} | {r['D']} | {r['V']} | {r['dtype']} | {r['reference']} | {r['logp']:.1e} "
                   f"| {r['entropy']:.1e} | {r['dH']:.1e} | {r['dW']:.1e} | {r['ok']} |")
    out += [""] + [f"oapl_loss {r['impl']} (fused={r['fused']}, workspace_bytes={r['workspace_bytes']}) vs "
                   f"{r['reference']} (B={r['B']}, T={r['T']}, D={r['D']}, V={r['V']}): loss {r['loss']:.1e}, "
                   f"dH {r['dH']:.1e}, dW {r['dW']:.1e}, ok={r['ok']}" for r in loss_rows] + ["",
            "### Speed and memory (bf16, fwd+bwd of per-token log-probs)", ""]
    out += _table(["N", "D", "V", "method"], ["fwd ms", "fwd+bwd ms", "TFLOP/s", "x 4-GEMM floor",
                                              "peak GiB above inputs"], rows,
                  lambda r: f"{r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {r['tflops']:.0f} | {r['x_floor']:.2f} "
                            f"| {r['peak_gib_above_inputs']:.2f}")
    out += ["", "### oapl_loss fwd+bwd (bf16; B sequences x T tokens, all on the mask, groups of gcd(8, B))", ""]
    out += _table(["B", "T", "D", "V", "method"], ["fwd+bwd ms", "4-GEMM-equivalent TFLOP/s",
                                                   "peak GiB above inputs"], loss_bench,
                  lambda r: f"{r['fwd_bwd_ms']:.1f} | {r['tflops_4gemm']:.0f} | {r['peak_gib_above_inputs']:.2f}")
    out += ["", "### Gradient filtering: oapl_loss fused (gemm) fwd+bwd, hidden states x 4 (peaked logits)", ""]
    out += _table(["B", "T", "D", "V", "grad_filter_eps=eps"], ["fwd+bwd ms", "blocks skipped", "dH err vs eps=0",
                                                            "dW err vs eps=0"], filter_rows,
                  lambda r: f"{r['fwd_bwd_ms']:.1f} | {100 * r['skipped']:.1f}% | {r['dH_err']:.1e} "
                            f"| {r['dW_err']:.1e}", skip_key="skipped_run")
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
    bf16 = torch.bfloat16
    small = [(1, 64, 1000, bf16), (257, 128, 5003, bf16), (1000, 96, 32771, bf16),
             (257, 128, 5003, torch.float16), (257, 128, 5003, torch.float32)]
    big = [(4096, 4096, 151936, bf16), (32768, 4096, 151936, bf16)]
    bench_shapes = [(4096, 4096, 32000), (8192, 4096, 151936), (32768, 4096, 151936)]
    # The last: long completions, each split across chunks of the 2 GiB workspace (~2,300 rows).
    loss_shapes = [(16, 512, 4096, 151936), (64, 512, 4096, 151936), (4, 16384, 4096, 151936)]
    filter_shape = (64, 512, 4096, 151936)  # N = 32,768
    if args.quick:
        big, bench_shapes, loss_shapes = [], [(4096, 2048, 32000)], [(8, 512, 2048, 32000), (2, 4096, 2048, 32000)]
        filter_shape = (8, 512, 2048, 32000)
    t0 = time.time()
    result = {"env": env}
    try:
        result["correctness"] = [dict(r, mode="gemm") for r in with_logits_mode("gemm", correctness)(small + big)]
        result["correctness"] += [dict(r, mode="tile") for r in with_logits_mode("tile", correctness)(small + big[:1])]
        # The loss with whole sequences per chunk, then with every sequence split across chunks.
        result["loss"] = loss_check(64, 96, 1024, 32003) + loss_check(8, 2048, 512, 32003, workspace_bytes=2**27)
        for r in result["loss"]:
            print(f"  oapl_loss: {r}", flush=True)
        result["bench"] = bench(bench_shapes, args.reps)
        result["loss_bench"] = bench_loss(loss_shapes, args.reps)
        result["filter_bench"] = bench_filter(*filter_shape, [0.0, 1e-4, 1e-3], args.reps)
        env["configs"] = launch.best_configs()
    except Exception:  # noqa: BLE001 - keep what was measured
        result["error"] = traceback.format_exc()
        print(result["error"], flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    (out / "gpu_suite.json").write_text(json.dumps(result, indent=1))
    if "bench" in result:
        md = _markdown(env, result["correctness"], result["loss"], result["bench"], result.get("loss_bench", []),
                       result.get("filter_bench", []))
        (out / "gpu_suite.md").write_text(md)
        print(md)
    print(f"gpu suite: {result['seconds']} s", flush=True)
    ok = all(r["ok"] for r in result.get("correctness", []) + result.get("loss", []))
    sys.exit(1 if "error" in result or not ok else 0)


if __name__ == "__main__":
    main()
