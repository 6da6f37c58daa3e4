"""The launch scripts in examples/ parse and name recipes and flags that exist."""

import re
import subprocess

import pytest

from megatron_apt.config.recipes import RECIPES
from megatron_apt.testing.launch import REPO_ROOT

SCRIPTS = sorted((REPO_ROOT / "examples").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_and_uses_known_recipes_and_flags(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = "\n".join(
        ln for ln in script.read_text().splitlines() if not ln.lstrip().startswith("#")
    )
    for recipe in re.findall(r"--recipe ([\w.-]+)", text):
        assert recipe in RECIPES, recipe
    import pretrain_apt

    known = {opt for a in pretrain_apt.build_parser()._actions for opt in a.option_strings}
    used = set(re.findall(r"(--[a-z][\w-]+)", text)) - {
        "--num_gpus",
        "--nproc-per-node",
        "--hostfile",
    }
    assert used <= known, used - known
