"""Plot a run's training curves: python tools/plot_metrics.py RUN_DIR [--out DIR]."""

import argparse

from megatron_sapo.diagnostics.plots import plot_run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", help="a run folder holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")
    args = parser.parse_args()
    for path in plot_run(args.run_dir, args.out):
        print(path)
