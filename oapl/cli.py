"""The ``oapl`` command.

    oapl train CONFIG [key=value ...]      train (``output_dir=...``, ``resume=true``, any key)
    oapl plot RUN_DIR [RUN_DIR ...]        PNG curves of runs, overlaid (``-o`` for the path)
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .loop import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    print(json.dumps(summary))


def _plot(args: argparse.Namespace) -> None:
    from .plot import plot_runs

    out = args.output or os.path.join(args.runs[0], "curves.png")
    print(plot_runs(args.runs, out, smooth=args.smooth))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="oapl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train with a YAML config and key=value overrides")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=_train)
    p = sub.add_parser("plot", help="plot metrics.jsonl curves of one or more runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--output", help="PNG path (default: RUN_DIR/curves.png of the first)")
    p.add_argument("--smooth", type=int, default=10, help="moving-average window in steps")
    p.set_defaults(fn=_plot)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except ValueError as e:
        print(f"oapl {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
