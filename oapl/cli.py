"""The ``oapl`` command.

    oapl train CONFIG [key=value ...]      train (``output_dir=...``, ``resume=true``, any key)
    oapl plot RUN_DIR [RUN_DIR ...]        PNG curves of runs, overlaid (``-o`` for the path)
    oapl generate CONFIG [key=value ...]   a rollout file for offline training (``-o`` for the path)
    oapl rounds CONFIG rounds=N [...]      N offline rounds: generate, train on the file, repeat
    oapl eval CONFIG [key=value ...]       pass@k of ``--model`` PATH (repeatable) or model.path
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def _train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .distributed import launched

    cfg = load_config(args.config, args.overrides)
    if launched():  # under torchrun: FSDP2 on every rank, the loop on rank 0
        from .distributed import train
    else:
        from .loop import train
    t = time.perf_counter()
    summary = train(cfg)
    if summary is None:  # a follower rank under torchrun
        return
    if "reward_last10" in summary:
        print(f"oapl train: reward {summary['reward_first10']:.3f} -> "
              f"{summary['reward_last10']:.3f} (mean of the first and last 10 steps run), "
              f"{time.perf_counter() - t:.0f} s; model in {summary['final_model']}"
              + (f", curves in {summary['plot']}" if "plot" in summary else ""), file=sys.stderr)
    print(json.dumps(summary))


def _generate(args: argparse.Namespace) -> None:
    from .config import load_config
    from .offline import generate_rollouts

    cfg = load_config(args.config, args.overrides)
    out = args.output or os.path.join(cfg.output_dir, "rollouts.parquet")
    print(json.dumps(generate_rollouts(cfg, out)))


def _rounds(args: argparse.Namespace) -> None:
    from .config import load_config
    from .offline import run_rounds

    given = [o for o in args.overrides if o.startswith("rounds=")]
    if len(given) != 1:
        raise ValueError("oapl rounds needs one rounds=N")
    cfg = load_config(args.config, [o for o in args.overrides if o not in given])
    for line in run_rounds(cfg, int(given[0].partition("=")[2])):
        print(json.dumps(line))


def _eval(args: argparse.Namespace) -> None:
    from .config import load_config
    from .evaluate import evaluate

    result = evaluate(load_config(args.config, args.overrides), args.model or ())
    print(result["table"])
    print(json.dumps({"outputs": result["outputs"], "plot": result["plot"],
                      "multi_turn_frac": result["multi_turn_frac"]}))


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
    p = sub.add_parser("generate", help="sample a rollout file (parquet or jsonl) for offline "
                       "training: n completions of every prompt, rewards, V* per group")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("-o", "--output", help="rollout file, .parquet or .jsonl "
                   "(default: OUTPUT_DIR/rollouts.parquet)")
    p.set_defaults(fn=_generate)
    p = sub.add_parser("rounds", help="offline rounds (rounds=N): generate with the latest "
                       "model, train on the file, repeat")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(fn=_rounds)
    p = sub.add_parser("eval", help="pass@k of one or more models (overlaid in one plot)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--model", action="append", metavar="PATH", help="a HF directory, "
                   "final_model, checkpoint or `tiny` (repeat to compare; default: model.path)")
    p.set_defaults(fn=_eval)
    # key=value overrides may follow options (`eval CONFIG --model A k=v`), which argparse
    # leaves unparsed: they join the command's overrides.
    args, extra = parser.parse_known_args(argv)
    if extra and not (hasattr(args, "overrides") and all("=" in x[1:] for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    from .console import quiet
    from .errors import EngineError
    from .sandbox import SandboxUnavailable

    quiet()
    # SIGTERM ends the command like Ctrl-C: cleanup runs (engine processes are stopped).
    signal.signal(signal.SIGTERM, _terminate)
    try:
        args.fn(args)
    except (ValueError, SandboxUnavailable) as e:
        print(f"oapl {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except EngineError as e:
        print(f"oapl {args.command}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"oapl {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
