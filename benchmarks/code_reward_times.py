"""How long the code reward takes to score a batch, as the loop scores one (``score_all`` on a
pool of ``data.reward_workers`` threads, each program in its own sandbox):

    python -m benchmarks.code_reward_times [--workers 64] [--cpu 10] [--timeout 30]

prints the wall-clock seconds for the 164 HumanEval canonical solutions and for a batch of 64
infinite loops (each killed at its CPU budget or the wall-clock backstop, whichever comes
first), with the load average, since the CPUs are shared.
"""

from __future__ import annotations

import argparse
import os
import time

from oapl.batch import score_all
from oapl.rewards import get_reward_fn
from oapl.tasks.humaneval import humaneval_records


def timed_batch(records: list[dict], completions: list[str], workers: int, cpu_s: float,
                timeout_s: float) -> tuple[float, list[float]]:
    """Seconds to score the batch, and its rewards."""
    fn = get_reward_fn("code", cpu_s=cpu_s, timeout_s=timeout_s)
    start = time.perf_counter()
    rewards, failed = score_all(fn, records, completions, workers)
    if any(failed):
        raise RuntimeError(f"{sum(failed)} reward calls failed")
    return time.perf_counter() - start, rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=64, help="data.reward_workers")
    parser.add_argument("--cpu", type=float, default=10.0, help="reward_kwargs.cpu_s")
    parser.add_argument("--timeout", type=float, default=30.0, help="reward_kwargs.timeout_s")
    args = parser.parse_args()
    records = humaneval_records()
    seconds, rewards = timed_batch(records, [r["canonical_solution"] for r in records],
                                   args.workers, args.cpu, args.timeout)
    print(f"164 HumanEval canonical solutions: {seconds:.1f} s, mean reward "
          f"{sum(rewards) / len(rewards):.3f} (workers {args.workers}, load {os.getloadavg()})")
    loop = "    while True:\n        pass\n"
    seconds, rewards = timed_batch(records[:64], [loop] * 64, args.workers, args.cpu,
                                   args.timeout)
    print(f"64 infinite loops: {seconds:.1f} s (cpu_s {args.cpu:g}, timeout_s "
          f"{args.timeout:g}), mean reward "
          f"{sum(rewards) / len(rewards):.3f} (workers {args.workers}, load {os.getloadavg()})")


if __name__ == "__main__":
    main()
