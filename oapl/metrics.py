"""``metrics.jsonl``: one JSON object per optimizer step, appended and flushed as it goes."""

from __future__ import annotations

import json
import os


def read_metrics(path: str) -> list[dict]:
    """All complete records of a metrics file (a torn last line, from a kill, is skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


class MetricsLog:
    """Appends records to ``path``. ``truncate_after(step)`` first drops records of steps
    after ``step`` (those a resumed run will redo), so no step is repeated or lost."""

    def __init__(self, path: str):
        self.path = path

    def truncate_after(self, step: int) -> None:
        records = read_metrics(self.path) if os.path.exists(self.path) else []
        kept = [r for r in records if r["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
