"""``python -m benchmarks [--quick | --full | --tiny] [--only NAME ...] [--out DIR]``.

Prints a table per case and the acceptance numbers, and writes ``<timestamp>.json``,
``<timestamp>.md`` and ``<timestamp>_*.png`` into ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import benchmarks  # noqa: F401  (snapshots numpyro's KL table before vi_engine is imported)


def parse_args(argv=None):
    from benchmarks.cases import CASES

    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="default: small sizes, 6-9 minutes on 2 CPU cores")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="bigger sizes, longer runs, larger BlackJAX grid, B up to 10^4")
    mode.add_argument("--tiny", dest="mode", action="store_const", const="tiny",
                      help="tiny sizes for the smoke test (checks results are well-formed)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help=f"run only these cases (repeatable or comma list): {', '.join(CASES)}")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                    help="output directory (default: benchmarks/results)")
    args = ap.parse_args(argv)
    args.mode = args.mode or "quick"
    only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = [n for n in only if n not in CASES]
    if unknown:
        ap.error(f"--only: unknown case(s) {unknown}; known: {', '.join(CASES)}")
    args.only = only or list(CASES)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from benchmarks import config, report
    from benchmarks.cases import CASES
    from benchmarks.methods import blackjax_available
    from benchmarks.timing import log, machine_info

    t_start = time.perf_counter()
    settings = config.settings(args.mode)
    bj = blackjax_available()
    if not bj:
        log("BlackJAX is not installed (optional extra `benchmarks`): its rows are skipped")
    ctx = {"blackjax": bj, "mode": args.mode}
    results = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "mode": args.mode,
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "blackjax": bj,
        "settings": settings,
        "cases": [],
    }
    for name in args.only:
        log(f"case {name} ({args.mode})")
        t0 = time.perf_counter()
        try:
            out = CASES[name].run(settings, ctx)
            out["doc"] = (CASES[name].__doc__ or "").strip()
        except Exception:  # noqa: BLE001  a failed case is reported, the others still run
            out = {"name": name, "error": traceback.format_exc()}
            log(f"case {name} FAILED:\n{out['error']}")
        out["seconds"] = time.perf_counter() - t0
        log(f"case {name} done in {out['seconds']:.1f}s")
        results["cases"].append(out)
    results["wall_seconds"] = time.perf_counter() - t_start
    results["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    prefix = os.path.join(args.out, stamp)
    plots = report.write_plots(results, prefix)
    report.write_json(results, prefix + ".json")
    report.write_markdown(results, prefix + ".md", plots)
    print(report.terminal(results))
    print(f"\nwrote {prefix}.json, {prefix}.md and {len(plots)} plot(s); "
          f"total {results['wall_seconds']:.1f}s")
    return 1 if any("error" in c for c in results["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
