"""Run the ONNX node test cases (the peer suite) through qgraph and print the table of outcomes.

Usage::

    python tools/run_peer_suite.py                       # all 1288 cases, 2 worker processes
    python tools/run_peer_suite.py --every 4             # a deterministic quarter of them
    python tools/run_peer_suite.py test_add test_conv    # named cases only
    python tools/run_peer_suite.py --json results.json --list failed,refused

The classification lives in ``tools/peer_cases.py`` (shared with the pytest test in ``tests/peer``); the known
failures are in ``tests/peer/baseline.json``. Exit status 1 when a case fails that the baseline does not list.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools import peer_cases  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help="case names (default: every case)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--every", type=int, default=1, help="run every N-th case only (deterministic sample)")
    parser.add_argument("--timeout", type=float, default=peer_cases.CASE_TIMEOUT_SECONDS, help="seconds per case")
    parser.add_argument("--json", type=Path, help="write every case's outcome and reason to this file")
    parser.add_argument(
        "--list", default="failed", help="comma-separated outcomes whose cases are printed with their reason"
    )
    parser.add_argument(
        "--passes", help="comma-separated pass names instead of the canonical pipeline ('' for load and save only)"
    )
    parser.add_argument(
        "--constant-inputs", action="store_true",
        help="also run each case with its inputs as initializers (constant folding evaluates every operator)",
    )
    arguments = parser.parse_args(argv)
    passes = None if arguments.passes is None else tuple(name for name in arguments.passes.split(",") if name)

    names = arguments.cases or peer_cases.sample_case_names(peer_cases.all_case_names(), arguments.every)
    if arguments.constant_inputs:
        names = [name for name in names if not name.endswith(peer_cases.CONSTANT_VARIANT)]
        names += peer_cases.constant_variant_names(names)
    start = time.perf_counter()
    results = peer_cases.run_suite(names, workers=arguments.workers, timeout=arguments.timeout, passes=passes)
    seconds = time.perf_counter() - start

    shown = {outcome.strip() for outcome in arguments.list.split(",") if outcome.strip()}
    for result in results:
        if result.outcome in shown:
            runs_the_original = result.outcome == "refused" and result.original_runnable
            note = " (onnxruntime runs the original)" if runs_the_original else ""
            reason = result.reason.splitlines()[0] if result.reason else ""
            print(f"{result.outcome:<16} {result.name:<60} {reason}{note}")
    print()
    print(peer_cases.format_table(results, seconds))

    baseline = json.loads((ROOT / "tests" / "peer" / "baseline.json").read_text())["known_failures"]
    failed = {result.name for result in results if result.outcome == "failed"}
    new_failures = sorted(failed - set(baseline))
    trimmed = sorted(name for name in set(baseline) & set(names) if name not in failed)
    if new_failures:
        print(f"\nnew failures (not in tests/peer/baseline.json): {', '.join(new_failures)}")
    if trimmed:
        print(f"\nbaseline entries that no longer fail (trim them): {', '.join(trimmed)}")
    if arguments.json:
        arguments.json.write_text(
            json.dumps(
                {"counts": peer_cases.summarize(results), "seconds": round(seconds, 1),
                 "cases": [result.as_dict() for result in results]},
                indent=1,
            )
        )
    return 1 if new_failures else 0


if __name__ == "__main__":
    sys.exit(main())
