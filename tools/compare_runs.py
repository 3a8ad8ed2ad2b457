"""Compare run folders side by side:

    python tools/compare_runs.py RUN_DIR RUN_DIR ... [--labels A,B] [--keys reward_mean,loss] [--window 10]
                                 [--out DIR]

Prints, for every metric and run, the mean over the first and last --window steps and the final value, and
writes compare_<metric>.png (a line per run) into --out (default: ./compare)."""

import argparse
import sys

from megatron_sapo.diagnostics.compare import (
    DEFAULT_KEYS,
    check_keys,
    format_table,
    load_runs,
    plot_comparison,
    summary,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run folders holding metrics.jsonl")
    parser.add_argument("--labels", default=None, help="comma-separated names, one per run (default: folder names)")
    keys_help = f"comma-separated metrics.jsonl keys (default: {','.join(DEFAULT_KEYS)})"
    parser.add_argument("--keys", default=None, help=keys_help)
    parser.add_argument("--window", type=int, default=10, help="steps averaged at the start and the end")
    parser.add_argument("--out", default="compare", help="folder for the PNGs")
    args = parser.parse_args(argv)
    keys = [k for k in args.keys.split(",") if k] if args.keys else list(DEFAULT_KEYS)
    try:
        runs = load_runs(args.run_dirs, args.labels.split(",") if args.labels else None)
        if args.keys:  # a key asked for by name must exist (the defaults may be absent, e.g. gate_mean in GRPO runs)
            check_keys(runs, keys)
    except (FileNotFoundError, ValueError) as e:
        print(f"compare_runs: error: {e}", file=sys.stderr)
        return 2
    print(format_table(summary(runs, keys, max(1, args.window)), max(1, args.window)))
    for path in plot_comparison(runs, keys, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
