"""`oapl train` on fixed rollouts, for tests/test_fsdp.py: under torchrun (FSDP2 on every
rank, the loop on rank 0) or as one plain process, with the same data in both.

    [torchrun --nproc_per_node=N] tests/fsdp_worker.py CONFIG [key=value ...]

``FixedGenerator`` stands in for the engine: its rollouts depend only on the batch seed and the
prompt, so every run sees identical data whatever its world size. Each rank writes
``<output_dir>/rank<R>.json`` with its peak resident memory.
"""

import json
import os
import resource
import sys

import torch

from oapl.config import load_config
from oapl.distributed import launched
from oapl.batch import Rollout

EOS, DIGITS = 2, range(4, 14)  # the tiny tokenizer's ids


class FixedGenerator:
    """Seeded pseudo-rollouts (a digit or two, then EOS, with made-up log-probs); records the
    weight pushes it gets."""

    def __init__(self):
        self.version = 0
        self.pushes = 0

    def generate(self, prompts, prompt_indices, sampling, seed):
        groups = []
        for i, (idx, ids) in enumerate(zip(prompt_indices, prompts)):
            g = torch.Generator().manual_seed(seed + i)
            group = []
            for _ in range(sampling.n):
                k = int(torch.randint(1, 3, (1,), generator=g))
                comp = [DIGITS[int(j)] for j in torch.randint(0, 10, (k,), generator=g)] + [EOS]
                lps = (-torch.rand(len(comp), generator=g) * 2 - 0.1).tolist()
                group.append(Rollout(idx, list(ids), comp, lps, "stop", self.version))
            groups.append(group)
        return groups

    def load_weights(self, named_tensors, version):
        for _, t in named_tensors:
            assert torch.isfinite(t).all()
        self.version = version
        self.pushes += 1


def main(argv):
    cfg = load_config(argv[0], argv[1:])
    if launched():
        from oapl.distributed import train
    else:
        from oapl.loop import train
    rank = int(os.environ.get("RANK", "0"))
    train(cfg, generator=FixedGenerator() if rank == 0 else None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(os.path.join(cfg.output_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"peak_rss_bytes": peak}, f)


if __name__ == "__main__":
    main(sys.argv[1:])
