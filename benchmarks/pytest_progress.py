"""A pytest plugin for the device check: one JSON line per finished test, appended as it finishes, to
the file named by RPC_PY_TEST_LOG. A test run killed by a time limit (benchmarks/gpu_check.sh) keeps
every result it reached; junit XML would be written only at the end.

    RPC_PY_TEST_LOG=out.jsonl PYTHONPATH=benchmarks python -m pytest -p pytest_progress tests -m cuda
"""

import json
import os
import time


def pytest_runtest_logreport(report):
    path = os.environ.get("RPC_PY_TEST_LOG")
    if not path:
        return
    if report.when != "call" and not (report.skipped or report.failed):
        return  # setup/teardown lines only when they decide the outcome
    line = {"test": report.nodeid, "when": report.when, "outcome": report.outcome,
            "seconds": round(report.duration, 4), "time": time.time()}
    if report.failed:
        line["message"] = str(report.longrepr)[-2000:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        line["message"] = str(report.longrepr[2])[:300]
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
