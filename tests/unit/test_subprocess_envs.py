"""The tests' subprocesses get their environment from ``launcher_env`` (issue 29, item 10).

``megatron_apt.testing.launch.launcher_env`` pins what a CPU test's workers need on any
machine: gloo (``MEGATRON_APT_BACKEND``), no visible GPU (``CUDA_VISIBLE_DEVICES=""``: on a GPU
machine NCCL would otherwise get the tests' CPU tensors and every rank would land on cuda:0),
DeepSpeed's CPU accelerator, one thread. An environment built by hand from ``os.environ``
(``{**os.environ, ...}``, ``dict(os.environ, ...)``, ``os.environ.copy()``) silently drops
these on the first GPU machine that runs the suite, unless it sets both pins itself.

This test reads every file under tests/ (Python's ``ast``) and names each such environment
with its file and function. The ones below are known and do not start workers (ALLOWED), or
are reported to their owners (PENDING); anything else fails, naming where.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PINS = {"CUDA_VISIBLE_DEVICES", "MEGATRON_APT_BACKEND"}

ALLOWED = {  # (file, function): why the inherited environment is harmless there
    ("tests/unit/test_ablation_options.py", "_cli_config"): "--print-config: exits at parsing",
    ("tests/unit/test_ablation_options.py", "_cli_error"): "argument errors: exit 2 at parsing",
    ("tests/unit/test_recipes.py", "_cli"): "--print-config / config errors: exit before init",
    ("tests/unit/test_collapse_detector.py", "_cli"): "--print-config / config errors",
}
PENDING: dict[tuple[str, str], str] = {}  # (file, function) -> why it may stay, for now


def _is_os_environ(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "environ"
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
    )


def _keys(node: ast.AST) -> set[str]:
    """The string keys a hand-built environment sets itself."""
    if isinstance(node, ast.Dict):
        return {k.value for k in node.keys if isinstance(k, ast.Constant)}
    if isinstance(node, ast.Call):
        return {kw.arg for kw in node.keywords if kw.arg}
    return set()


def _hand_built(node: ast.AST) -> bool:
    """``{**os.environ, ...}``, ``dict(os.environ, ...)`` or ``os.environ.copy()``."""
    if isinstance(node, ast.Dict):
        return any(k is None and _is_os_environ(v) for k, v in zip(node.keys, node.values))
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Name) and f.id == "dict" and node.args:
            return _is_os_environ(node.args[0])
        return isinstance(f, ast.Attribute) and f.attr == "copy" and _is_os_environ(f.value)
    return False


SUBPROCESS = {"run", "Popen", "call", "check_call", "check_output"}


def _starts_process_with_env(func: ast.AST) -> bool:
    """``func`` calls ``subprocess.<run|Popen|...>(..., env=...)``."""
    return any(
        isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr in SUBPROCESS
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == "subprocess"
        and any(kw.arg == "env" for kw in n.keywords)
        for n in ast.walk(func)
    )


def hand_built_environments(source: str) -> list[tuple[str, int]]:
    """``(function, line)`` of every hand-built environment without both pins in a function
    that starts a subprocess with ``env=`` (copies of ``os.environ`` for other purposes,
    e.g. monkeypatching it, are not environments of a subprocess)."""
    found: dict[int, str] = {}
    for func in ast.walk(ast.parse(source)):  # outer functions first: inner names win
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if _starts_process_with_env(func):
                for n in ast.walk(func):
                    if _hand_built(n) and not PINS <= _keys(n):
                        found[n.lineno] = func.name
    return sorted(((name, line) for line, name in found.items()), key=lambda x: x[1])


def scan(root: Path = ROOT) -> dict[tuple[str, str], list[int]]:
    """``{(file, function): [lines]}`` over every Python file under ``root/tests``."""
    out: dict[tuple[str, str], list[int]] = {}
    for path in sorted((root / "tests").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for func, line in hand_built_environments(path.read_text()):
            out.setdefault((rel, func), []).append(line)
    return out


def test_the_scanner_finds_each_hand_built_form():
    run = "    subprocess.run(['x'], env=env)\n"
    source = (
        "import os, subprocess\n"
        "def a():\n    env = {**os.environ, 'X': '1'}\n"
        + run
        + "def b():\n    env = dict(os.environ, X='1')\n"
        + run
        + "def c():\n    env = os.environ.copy()\n"
        + run
        + "def pinned():\n"
        "    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'MEGATRON_APT_BACKEND': 'gloo'}\n"
        + run
        + "def fine():\n    env = launcher_env({'X': '1'})\n"
        + run
        + "def no_process(monkeypatch):\n    monkeypatch.setattr(os, 'environ', dict(os.environ))\n"
    )
    assert hand_built_environments(source) == [("a", 3), ("b", 6), ("c", 9)]


def test_subprocess_environments_come_from_launcher_env():
    found = scan()
    unexpected = {k: v for k, v in found.items() if k not in ALLOWED and k not in PENDING}
    assert not unexpected, (
        "environments built by hand from os.environ without CUDA_VISIBLE_DEVICES='' and "
        "MEGATRON_APT_BACKEND (use megatron_apt.testing.launch.launcher_env): "
        + "; ".join(f"{f}:{lines} in {fn}()" for (f, fn), lines in sorted(unexpected.items()))
    )
