"""tools/benchmark.py on the tiny preset (diffusers comparison included): every JSON field is
there with sane values; bad arguments exit with code 2 and name the value. No wall-clock
assertions."""

import json
import math
import subprocess
import sys

import pytest

from megatron_apt.config import get_preset
from megatron_apt.config.flops import forward_flops
from megatron_apt.testing.launch import REPO_ROOT
from tools import benchmark

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    argv = ["--preset", "tiny", "--latent", "1x8x8", "--text-len", "8", "--batch", "2"]
    argv += ["--warmup", "1", "--repeats", "2", "--device", "cpu", "--json-out", str(out)]
    assert benchmark.main(argv) == 0
    return json.loads(out.read_text())


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and 0 < x < math.inf


def test_json_has_every_field(tiny_run, capsys):
    r = tiny_run
    cfg = get_preset("tiny")
    assert r["preset"] == "tiny" and r["latent"] == [1, 8, 8] and r["batch"] == 2
    assert r["visual_tokens"] == 16 and r["text_tokens"] == 8 and r["tokens"] == 2 * 24
    assert r["device"]["type"] == "cpu" and r["device"]["name"]
    assert r["dtype"] == "float32" and r["layer_spec"] == "local"
    assert r["repeats"] == 2 and r["warmup"] == 1
    fwd = forward_flops(cfg, 16, 8, 2)
    assert r["flops"]["forward"] == fwd
    assert r["flops"]["forward_backward"] == 3 * fwd
    assert r["flops"]["apt_update"] == benchmark.APT_FORWARD_EQUIVALENTS * fwd
    assert "attention" in r["flops"]["formula"]
    mm = r["reference"]["matmul"]
    assert mm["shape"] == [48, 64, 256] and _positive(mm["tflops"]) and _positive(mm["median_s"])
    assert r["reference"]["peak"] is None  # no datasheet peak on CPU
    assert r["diffusers"]["skipped"] is None and r["diffusers"]["config"]["num_layers"] == 2
    assert set(r["phases"]) == {"forward", "forward_backward", "apt_update"}
    for phase, entry in r["phases"].items():
        models = ("ours",) if phase == "apt_update" else ("ours", "diffusers")
        ratio_keys = {"ratio_ours_over_diffusers", "ratio_min", "ratio_paired_median"}
        assert set(entry) - ratio_keys == set(models)
        for who in models:
            s = entry[who]
            assert len(s["times_s"]) == 2 and all(_positive(t) for t in s["times_s"])
            assert _positive(s["median_s"]) and _positive(s["tokens_per_s"])
            assert 0 < s["min_s"] <= s["median_s"]
            assert _positive(s["visual_tokens_per_s"]) and _positive(s["tflops"])
            assert s["flops"] == r["flops"][phase]
            assert _positive(s["utilization_vs_matmul"]) and s["utilization_vs_peak"] is None
            assert _positive(s["memory"]["peak_mib"]) and s["memory"]["method"]
        if phase != "apt_update":
            assert all(_positive(entry[k]) for k in ratio_keys)


def test_markdown_table(tiny_run):
    text = benchmark.markdown(tiny_run)
    assert "| forward | ours |" in text and "| forward_backward | diffusers |" in text
    assert "| apt_update | ours |" in text and "ours / diffusers" in text


def test_video_latent_skips_diffusers_with_a_reason(tmp_path):
    out = tmp_path / "video.json"
    argv = ["--preset", "tiny", "--latent", "2x4x4", "--text-len", "4", "--phases", "forward"]
    argv += ["--warmup", "0", "--repeats", "1", "--device", "cpu", "--json-out", str(out)]
    assert benchmark.main(argv) == 0
    r = json.loads(out.read_text())
    assert "T=2" in r["diffusers"]["skipped"] and set(r["phases"]) == {"forward"}
    assert "diffusers" not in r["phases"]["forward"]


def run_tool(*args):
    return subprocess.run(
        [sys.executable, "tools/benchmark.py", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "latent, needle",
    [("1x7x8", "H=7 is not divisible by the patch size 2"), ("13x90", "13x90")],
)
def test_bad_latent_exits_2_naming_the_value(latent, needle):
    proc = run_tool("--preset", "tiny", "--latent", latent, "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and latent in proc.stderr


def test_bad_phase_and_spec_exit_2():
    proc = run_tool("--preset", "tiny", "--latent", "1x8x8", "--phases", "forward,train")
    assert proc.returncode == 2 and "--phases" in proc.stderr
    proc = run_tool("--preset", "tiny", "--latent", "1x8x8", "--layer-spec", "nope")
    assert proc.returncode == 2 and "nope" in proc.stderr
