"""Measure one benchmark case in this process and print one JSON line (peak memory, time).

    python -m benchmarks.probe OP IMPL SHAPE_JSON [--repeat K] [--warmup W]

e.g. ``python -m benchmarks.probe logprobs_fwdbwd torch '{"batch": 1, "seq": 8192, "d": 64,
"v": 131072}'``. The suites call it through ``common.measure_subprocess`` so each CPU case gets
a fresh process (see the peak-memory notes in ``common``).
"""
from __future__ import annotations

import argparse
import json

from .common import OPS, Shape, measure


def main(argv: list[str] | None = None) -> None:
    """Parse the case, run :func:`benchmarks.common.measure`, print its result as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("op", choices=OPS)
    ap.add_argument("impl")
    ap.add_argument("shape", help='JSON of benchmarks.common.Shape, e.g. {"batch": 1, "seq": 64, "d": 32, "v": 1000}')
    ap.add_argument("--repeat", type=int, default=1, help="timed calls; the first also gives the peak")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls before the reset of the peak")
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.op, args.impl, Shape(**json.loads(args.shape)),
                             repeat=args.repeat, warmup=args.warmup)))


if __name__ == "__main__":
    main()
