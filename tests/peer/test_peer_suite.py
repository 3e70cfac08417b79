"""The peer suite: every ONNX node test case through qgraph's load → canonicalize → save, checked in onnxruntime.

The classification is in ``tools/peer_cases.py`` (shared with ``tools/run_peer_suite.py``, which prints the same
table for a full run). Every case runs twice: as shipped (inputs fed at run time) and as its ``@constant`` variant
(inputs turned into initializers, so that FoldConstants evaluates every operator ahead of time). This test runs them in
two worker processes (about 45 s on two shared cores; ``QGRAPH_PEER_EVERY=N`` samples every N-th case), writes the
counts and every case's outcome to ``peer_suite.json`` under pytest's temporary folder, prints the table even without
``-s``, and fails on a failing case that ``baseline.json`` does not list, or on a listed case that now passes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tools import peer_cases

BASELINE = Path(__file__).with_name("baseline.json")
#: Run every N-th case only (deterministic sample) when the suite gets too slow for a unit-test run.
SAMPLE_EVERY = int(os.environ.get("QGRAPH_PEER_EVERY", "1"))


@pytest.fixture(scope="module")
def suite_results():
    names = peer_cases.sample_case_names(peer_cases.all_case_names(), SAMPLE_EVERY)
    names += peer_cases.constant_variant_names(names)
    start = time.perf_counter()
    results = peer_cases.run_suite(names, workers=2)
    return results, time.perf_counter() - start


def test_every_case_is_classified_and_none_regresses(suite_results, tmp_path_factory, capsys, record_property):
    results, seconds = suite_results
    counts = peer_cases.summarize(results)
    report = tmp_path_factory.mktemp("peer") / "peer_suite.json"
    report.write_text(
        json.dumps({"counts": counts, "seconds": round(seconds, 1), "cases": [r.as_dict() for r in results]}, indent=1)
    )
    record_property("peer_suite_counts", counts)
    with capsys.disabled():
        print(f"\npeer suite ({report}):\n{peer_cases.format_table(results, seconds)}")

    assert counts["total"] == len(results) > 0
    assert sum(counts[outcome] for outcome in peer_cases.OUTCOMES) == counts["total"]
    assert counts["passed"] + counts["passed_converted"] > counts["total"] // 2, "most cases should pass"

    baseline = json.loads(BASELINE.read_text())["known_failures"]
    failed = {result.name: result.reason.splitlines()[0] for result in results if result.outcome == "failed"}
    new_failures = {name: reason for name, reason in failed.items() if name not in baseline}
    ran = {result.name for result in results}
    fixed = sorted(name for name in baseline if name in ran and name not in failed)
    assert not new_failures, "cases that qgraph now breaks:\n" + "\n".join(
        f"  {name}: {reason}" for name, reason in sorted(new_failures.items())
    )
    assert not fixed, f"these cases pass now; remove them from {BASELINE.name}: {', '.join(fixed)}"


def test_baseline_lists_only_existing_cases_with_reasons():
    baseline = json.loads(BASELINE.read_text())["known_failures"]
    existing = set(peer_cases.all_case_names())
    assert len(existing) > 1000
    for name, reason in baseline.items():
        assert name.removesuffix(peer_cases.CONSTANT_VARIANT) in existing, f"{name} is not a node test case"
        assert reason.strip(), f"{name} needs a one-line reason"
