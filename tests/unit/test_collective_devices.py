"""Every tensor handed to a collective is on the backend's device (issue: under NCCL a CPU
tensor raises "No backend type associated with device type cpu" at the first update).

A CPU machine cannot run NCCL, so the rule is checked on the source: in every function of the
package, the tools and the entry point, a tensor passed to a ``torch.distributed`` collective
must not come from a tensor factory (``torch.tensor``, ``zeros``, ``ones``, ``empty``,
``full``, ``arange``, ``rand``, ``randn``) called without ``device=``: such tensors go through
``megatron_apt.parallel.state.comm_tensor`` / ``comm_device``, or take the device of the model
tensors they are computed from. A control shows the scan flags the code this rule replaced.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "all_to_all", "all_to_all_single", "reduce",
    "gather", "scatter", "send", "recv", "isend", "irecv",
}  # fmt: skip
FACTORIES = {"tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn"}


def _is_hostless_factory(node: ast.AST) -> bool:
    """``torch.<factory>(...)`` without ``device=`` (it lands on the CPU)."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in FACTORIES
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
        and not any(k.arg == "device" for k in node.keywords)
    )


def _collective(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr in COLLECTIVES and isinstance(node.func.value, ast.Name):
            if node.func.value.id in ("dist", "torch.distributed"):
                return node.func.attr
    return None


def host_tensors_in_collectives(source: str, filename: str = "<src>") -> list[str]:
    """``file:line: name`` for every collective argument that is (or was assigned from, in
    the same function) a tensor factory without ``device=``."""
    found = []
    tree = ast.parse(source, filename)
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module)):
            continue
        hostless = set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and _is_hostless_factory(node.value):
                hostless |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(fn):
            name = _collective(node)
            if name is None:
                continue
            for arg in node.args:
                if _is_hostless_factory(arg) or (isinstance(arg, ast.Name) and arg.id in hostless):
                    what = arg.id if isinstance(arg, ast.Name) else ast.unparse(arg)
                    found.append(f"{filename}:{node.lineno}: dist.{name}({what})")
    return sorted(set(found))


def _sources() -> list[Path]:
    files = [*(ROOT / "megatron_apt").rglob("*.py"), *(ROOT / "tools").glob("*.py")]
    return [*files, ROOT / "pretrain_apt.py"]


def test_no_host_tensor_reaches_a_collective():
    files = _sources()
    assert len(files) > 30 and any(f.name == "trainer.py" for f in files)
    found = [hit for f in files for hit in host_tensors_in_collectives(f.read_text(), str(f))]
    assert not found, "tensors created on the CPU reach a collective:\n" + "\n".join(found)


def test_the_scan_flags_the_code_it_replaced():
    """The non-finite flag as it was written before (a CPU tensor all-reduced under NCCL)."""
    before = """
def _finite_everywhere(self, loss):
    flag = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0
"""
    after = before.replace("torch.tensor(", "comm_tensor(")
    assert host_tensors_in_collectives(before) == ["<src>:4: dist.all_reduce(flag)"]
    assert host_tensors_in_collectives(after) == []
    inline = "def f():\n    dist.broadcast(torch.zeros(3), src=0)\n"
    assert host_tensors_in_collectives(inline) == ["<src>:2: dist.broadcast(torch.zeros(3))"]
    ok = "def f(d):\n    t = torch.zeros(3, device=d)\n    dist.all_reduce(t)\n"
    assert host_tensors_in_collectives(ok) == []
