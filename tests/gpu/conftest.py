"""tests/gpu: CUDA tests (marker ``gpu``, skipped without CUDA) and their CPU halves (marker
``cpu_half``: the same test body on the CPU, run in CI and by ``tools/gpu_check.sh --dry-run``).

Every test carries its device as the property ``device`` (``cuda`` for ``gpu`` tests, else
``cpu``); tests record their measured figures with ``record_property``. With
``MEGATRON_APT_GPU_TESTS_JSON=PATH`` the session writes each test's outcome, device, skip reason
and figures to PATH (JSON), which ``tools/gpu_check.py`` reads: a GPU check whose CUDA tests
all skipped has measured nothing and must say so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPORT_ENV = "MEGATRON_APT_GPU_TESTS_JSON"
_RESULTS: dict[str, dict] = {}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cpu_half: the CPU half of a CUDA test (same body, device='cpu'), run in CI"
    )


def pytest_collection_modifyitems(items):
    """Each test of this folder records its device, skipped ones included (a ``skipif`` skips
    before any fixture runs)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            device = "cuda" if item.get_closest_marker("gpu") else "cpu"
            item.user_properties.append(("device", device))


def pytest_runtest_logreport(report):
    """Keep one entry per test: the failing phase wins, else the call's (or setup's skip)."""
    props = dict(report.user_properties)
    if "device" not in props:  # a test of another folder in the same session
        return
    entry = _RESULTS.setdefault(report.nodeid, {"outcome": "passed"})
    entry["device"] = props.pop("device")
    entry.setdefault("figures", {}).update(props)
    if report.failed:
        entry["outcome"] = "failed"
        entry["error"] = str(report.longrepr).strip().splitlines()[-1][:300]
    elif report.skipped and entry["outcome"] != "failed":
        entry["outcome"] = "skipped"
        longrepr = report.longrepr
        entry["reason"] = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)[:300]


def pytest_sessionfinish(session):
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    tests = [{"test": k, **v} for k, v in _RESULTS.items()]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"tests": tests}, indent=1, default=str) + "\n")
