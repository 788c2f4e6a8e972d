"""Compile every Triton kernel, at every GPU block config, for the H100 (sm_90) on this CPU.

Run as a script with TRITON_INTERPRET=0 (the interpreter replaces kernels with Python
functions). Prints one JSON object per compile: kernel, dtype, config, shared bytes, and the
count of Hopper tensor-core (wgmma) and async-copy instructions in the PTX.
"""
import itertools
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from oapl_kernels.triton.kernels import dlogits_kernel, fwd_stats_kernel
from oapl_kernels.triton.launch import interpreting
from oapl_kernels.tuning import GPU_CONFIGS, GPU_FILTER_COLS, GROUP_N

# Argument types; pointers and these ints are 16-divisible at run time on real shapes, which is
# what the JIT specializes on (and what lets loads become async copies).
POINTER_DTYPE = {"H": "{dt}", "W": "{dt}", "DZ": "{dt}", "Y": "i64", "Z": "fp32"}
INTS = {"N", "V", "D", "v_lo", "v_hi", "stride_h", "stride_w", "stride_z", "stride_dz", "n_splits", "split_cols"}
ALIGNED = {"D", "stride_h", "stride_w", "stride_z", "stride_dz", "split_cols"}
CONSTEXPRS = {"BLOCK_N", "BLOCK_V", "BLOCK_D", "GROUP_N", "WITH_ENTROPY", "FROM_LOGITS", "UPCAST", "FILTER",
              "FILTER_COLS"}


def _signature(kernel, dtype):
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in CONSTEXPRS:
            sig[name] = "constexpr"
        elif name in INTS:
            sig[name] = "i32"
        elif name == "inv_temp":
            sig[name] = "fp32"
        else:
            sig[name] = "*" + POINTER_DTYPE.get(name, "fp32").format(dt=dtype)
        if sig[name].startswith("*") or name in ALIGNED:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def variants():
    """(from_logits, config) pairs that launch.py can run: every config for in-kernel tiles,
    the first for reading stored logits."""
    return [(False, c) for c in GPU_CONFIGS] + [(True, GPU_CONFIGS[0])]


def filters(kernel):
    """The gradient-filtering variants a kernel has: dlogits_kernel with and without, fwd one."""
    return (False, True) if kernel is dlogits_kernel else (False,)


def compile_all(dtypes=("bf16", "fp16")):
    """Yield a result dict per (kernel, dtype, from_logits, config, filter)."""
    for kernel in (fwd_stats_kernel, dlogits_kernel):
        for dtype in dtypes:
            sig, attrs = _signature(kernel, dtype)
            for (from_logits, (bn, bv, bd, warps, stages)), filt in itertools.product(variants(), filters(kernel)):
                constexprs = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd, "GROUP_N": GROUP_N,
                              "WITH_ENTROPY": True, "FROM_LOGITS": from_logits, "UPCAST": False}
                if kernel is dlogits_kernel:
                    constexprs.update(FILTER=filt, FILTER_COLS=GPU_FILTER_COLS)
                src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
                compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": warps, "num_stages": stages})
                ptx = compiled.asm["ptx"]
                yield {"kernel": kernel.__name__, "dtype": dtype, "from_logits": from_logits,
                       "config": [bn, bv, bd, warps, stages], "filter": filt,
                       "shared": compiled.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"),
                       "cp_async": ptx.count("cp.async"), "atomic_max": ptx.count(".max.")}


if __name__ == "__main__":
    if interpreting():
        sys.exit("run with TRITON_INTERPRET=0: the interpreter cannot compile kernels")
    for result in compile_all(sys.argv[1:] or ("bf16", "fp16")):
        print(json.dumps(result), flush=True)
