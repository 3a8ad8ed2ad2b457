#!/usr/bin/env python
"""Router figures of a run (megatron_sapo/diagnostics/router_plots.py lists them) from its metrics.jsonl.

  python tools/plot_router_diagnostics.py RUN_DIR [--out DIR]     (default DIR: RUN_DIR/plots)

A run with diagnostics.router_every > 0 draws them itself at its end (logging.plots); this redraws them, e.g.
for a run that is still going or was stopped.
"""

from __future__ import annotations

import argparse
import sys

from megatron_sapo.diagnostics.router_plots import plot


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    written = plot(args.run_dir, args.out)
    if not written:
        print(f"no router/... metrics in {args.run_dir}/metrics.jsonl (diagnostics.router_every > 0?)")
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
