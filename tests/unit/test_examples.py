"""The launch scripts in examples/ parse and name recipes and flags that exist: each command's
flags are checked against the program it runs (pretrain_apt.py's parser, a tool's --help)."""

import functools
import re
import subprocess
import sys

import pytest

from megatron_apt.config.recipes import RECIPES
from megatron_apt.testing.launch import REPO_ROOT

SCRIPTS = sorted((REPO_ROOT / "examples").glob("*.sh"))
LAUNCHER_FLAGS = {"--num_gpus", "--nproc-per-node", "--hostfile"}
PROGRAM = re.compile(r"(pretrain_apt\.py|tools/\w+\.py)(?:\s+([a-z][\w-]*))?")


@functools.cache
def _known_flags(program: str, subcommand: str | None) -> frozenset[str]:
    if program == "pretrain_apt.py":
        import pretrain_apt

        actions = pretrain_apt.build_parser()._actions
        return frozenset(opt for a in actions for opt in a.option_strings)
    cmd = [sys.executable, str(REPO_ROOT / program), *([subcommand] if subcommand else [])]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return frozenset(re.findall(r"(--[a-z][\w-]+)", out.stdout))


def _commands(script) -> list[str]:
    """Logical lines without comments (continuations joined)."""
    lines = [ln for ln in script.read_text().splitlines() if not ln.lstrip().startswith("#")]
    return re.sub(r"\\\n", " ", "\n".join(lines)).splitlines()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_and_uses_known_recipes_and_flags(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    checked = 0
    for line in _commands(script):
        for recipe in re.findall(r"--recipe ([\w.-]+)", line):
            assert recipe in RECIPES, recipe
        m = PROGRAM.search(line)
        if m is None or line.lstrip().startswith("echo"):
            continue
        program, sub = m.group(1), m.group(2)
        if program != "tools/convert_checkpoint.py":
            sub = None  # only convert_checkpoint.py has subcommands
        used = set(re.findall(r"(?<![\w-])(--[a-z][\w-]+)", line[m.end() :])) - LAUNCHER_FLAGS
        unknown = used - _known_flags(program, sub)
        assert not unknown, f"{script.name}: {program} {sub or ''}: unknown flags {unknown}"
        checked += 1
    assert checked >= 1, f"{script.name} runs no pretrain_apt.py or tools/ command"


def test_demo_redoes_everything_after_a_stage_an_older_folder_lacks(tmp_path, monkeypatch, capsys):
    """A demo folder made before the "vae" stage existed: its shards and models came from other
    latents, so the demo re-runs "vae" and every stage after it, moving the old training runs
    aside (never deleting them), instead of mixing them with the new VAE."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("demo_mod", REPO_ROOT / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "old"
    out.mkdir()
    old = [s for s in demo.STAGES if s != "vae"]
    (out / "progress.json").write_text(
        json.dumps({"_quick": True, "_seed": 0, **{s: 1.0 for s in old}})
    )
    (out / "diffusion").mkdir()
    (out / "diffusion" / "marker").write_text("old run")
    ran = []
    for stage in demo.STAGES:
        monkeypatch.setattr(demo.Demo, f"stage_{stage}", lambda self, s=stage: ran.append(s))
    monkeypatch.setattr(demo.Demo, "report", lambda self: 0)
    assert demo.Demo(demo.parse_args(["--quick", "--out", str(out)])).main() == 0
    assert ran == list(demo.STAGES[demo.STAGES.index("vae") :])
    assert "redoing it and all after it" in capsys.readouterr().out
    assert (out / "diffusion.replaced" / "marker").read_text() == "old run"
    # a complete folder skips everything
    ran.clear()
    assert demo.Demo(demo.parse_args(["--quick", "--out", str(out)])).main() == 0
    assert ran == []


@pytest.mark.parametrize(
    "arch, recipes, model",
    [("mmdit", ("demo-diffusion", "demo-consistency", "demo-apt"), None),
     ("wan", ("demo-diffusion", "demo-consistency", "demo-wan-apt"), "demo-wan")],
)  # fmt: skip
def test_demo_training_commands_per_family(tmp_path, monkeypatch, arch, recipes, model):
    """`--arch wan` trains the Wan preset in every stage and APT with its own recipe
    (`demo-wan-apt`: D at G's learning rate, the paper's; the MMDiT's `demo-apt` saturated D
    on Wan, config/recipes.py); the MMDiT demo keeps `demo-apt`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_cmds", REPO_ROOT / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    cmds = []
    monkeypatch.setattr(demo.Demo, "run", lambda self, log, cmd: cmds.append([str(c) for c in cmd]))
    d = demo.Demo(demo.parse_args(["--arch", arch, "--out", str(tmp_path / arch)]))
    for stage in ("diffusion", "consistency", "apt"):
        getattr(d, f"stage_{stage}")()
    assert [c[c.index("--recipe") + 1] for c in cmds] == list(recipes)
    for c in cmds:
        assert (c[c.index("--model") + 1] if "--model" in c else None) == model, c
    apt = RECIPES[recipes[-1]]()
    assert type(apt.model).__name__ == ("WanConfig" if arch == "wan" else "MMDiTConfig")
    assert apt.optim.lr_d == (None if arch == "wan" else pytest.approx(3 * apt.optim.lr))
