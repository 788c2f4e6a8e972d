"""Every Triton kernel at every GPU block config, with and without gradient filtering, compiles
for the H100 (sm_90) on this CPU, fits Hopper's shared memory, uses tensor cores (wgmma) and
async copies for its loads; the filtering variant has its atomic max."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


H100_SHARED_PER_BLOCK = 232448
SCRIPT = Path(__file__).with_name("aot_sm90.py")
sys.path.insert(0, str(SCRIPT.parent))
from aot_sm90 import filters, variants  # noqa: E402
from oapl_kernels.triton.kernels import dlogits_kernel, fwd_stats_kernel  # noqa: E402


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                         timeout=600, cwd=SCRIPT.parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_and_config_compiles(compiled):
    seen = {(r["kernel"], r["dtype"], r["from_logits"], tuple(r["config"]), r["filter"]) for r in compiled}
    expected = {(k.__name__, dt, f, tuple(c), filt) for k in (fwd_stats_kernel, dlogits_kernel)
                for dt in ("bf16", "fp16") for f, c in variants() for filt in filters(k)}
    assert seen == expected and len(compiled) == len(expected)


def test_fits_shared_memory(compiled):
    for r in compiled:
        assert r["shared"] <= H100_SHARED_PER_BLOCK, r
        assert r["shared"] > 0 or r["from_logits"], r  # tl.dot tiles are staged in shared memory


def test_uses_hopper_tensor_cores_and_async_copies(compiled):
    tiles = [r for r in compiled if not r["from_logits"]]
    assert tiles
    for r in tiles:
        assert r["wgmma"] > 0, r
        assert r["cp_async"] > 0, r


def test_filtering_variant_has_its_atomic_max(compiled):
    for r in compiled:
        if r["kernel"] == "dlogits_kernel":
            assert (r["atomic_max"] > 0) == r["filter"], r
