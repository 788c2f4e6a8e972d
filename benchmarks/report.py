"""Print pytest-benchmark JSON (``--benchmark-json``) as markdown tables.

    python -m benchmarks.report results/bench-cpu.json [more.json ...]

One table per (op, shape): each impl's median and min time, peak memory (``extra_info``) and
both as ratios to the naive baseline; then the issue-2 CPU targets, if that benchmark ran.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

MB = 2**20


def _ratio(x: float | None, base: float | None) -> str:
    return f"{x / base:.2f}x" if x is not None and base else "-"


def _mb(x: float | None) -> str:
    return f"{x / MB:,.0f}" if x is not None else "-"


def suite_tables(benchmarks: list[dict]) -> list[str]:
    """Markdown lines: a table per (op, shape) over impls, ratios against impl 'naive'."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for b in benchmarks:
        info = b.get("extra_info", {})
        if "op" in info and "impl" in info:
            groups[(info["op"], info["shape"], info.get("device", "?"))].append(b)
    lines = []
    for (op, shape, dev), rows in sorted(groups.items()):
        naive = next((r for r in rows if r["extra_info"]["impl"] == "naive"), None)
        t0 = naive["stats"]["median"] if naive else None
        m0 = naive["extra_info"].get("peak_bytes") if naive else None
        lines += [f"### {op}, {shape} ({dev})", "",
                  "| impl | median ms | min ms | rounds | time vs naive | peak MiB | memory vs naive |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            st, peak = r["stats"], r["extra_info"].get("peak_bytes")
            lines.append(f"| {r['extra_info']['impl']} | {st['median'] * 1e3:,.1f} | {st['min'] * 1e3:,.1f} | "
                         f"{st['rounds']} | {_ratio(st['median'], t0)} | {_mb(peak)} | {_ratio(peak, m0)} |")
        lines.append("")
    return lines


def target_tables(benchmarks: list[dict]) -> list[str]:
    """Markdown lines for the issue-2 comparison (extra_info of test_cpu_targets)."""
    lines = []
    for b in benchmarks:
        i = b.get("extra_info", {})
        if "memory_ratio" not in i:
            continue
        ok = lambda x, target: "met" if x <= target else "MISSED"  # noqa: E731
        lines += [f"### Issue-2 CPU targets, torch path vs naive, fwd+bwd, {i['shape']}", "",
                  "| | naive | torch path | ratio | target |", "|---|---:|---:|---:|---|",
                  f"| peak MiB (logits alone: {_mb(i['logits_bytes'])}) | {_mb(i['naive_peak_bytes'])} | "
                  f"{_mb(i['torch_peak_bytes'])} | {i['memory_ratio']:.3f} | <= {i['target_memory_ratio']} "
                  f"({ok(i['memory_ratio'], i['target_memory_ratio'])}) |",
                  f"| best time s | {i['naive_s']:.2f} | {i['torch_s']:.2f} | {i['time_ratio']:.2f} | "
                  f"<= {i['target_time_ratio']} ({ok(i['time_ratio'], i['target_time_ratio'])}) |", ""]
    return lines


def render(paths: list[str]) -> str:
    """The markdown for the given benchmark JSON files."""
    lines = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        m = data.get("machine_info", {})
        cpu = m.get("cpu", {})
        info = next((b["extra_info"] for b in data["benchmarks"] if "torch" in b.get("extra_info", {})), {})
        lines += [f"## {path}", "",
                  f"{cpu.get('brand_raw', m.get('processor', '?'))}, {cpu.get('count', '?')} cores, "
                  f"device {info.get('device_name', '?')}, torch {info.get('torch', '?')}, "
                  f"Python {m.get('python_version', '?')}, {data.get('datetime', '')}", ""]
        lines += suite_tables(data["benchmarks"]) + target_tables(data["benchmarks"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: print the markdown for one or more JSON files."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="files written by pytest --benchmark-json")
    print(render(ap.parse_args(argv).json))


if __name__ == "__main__":
    main()
