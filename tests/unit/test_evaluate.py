"""Evaluation metrics against hand values, and tools/evaluate.py on rendered data."""

import json

import numpy as np
import pytest

from megatron_apt.data.synthetic import make_synthetic_dataset, random_spec, render
from megatron_apt.evaluation.metrics import caption_accuracy, frechet_distance, sharpness
from tools import evaluate as evaluate_tool


def test_frechet_distance_hand_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, a + np.array([3.0, 0.0, 4.0])) == pytest.approx(25.0, rel=1e-6)
    # diagonal covariances: |mu|^2 + sum (sqrt(s1) - sqrt(s2))^2
    b = a * np.array([2.0, 1.0, 0.5])
    s_a, s_b = np.var(a, 0, ddof=1), np.var(b, 0, ddof=1)
    expected = ((np.sqrt(s_a) - np.sqrt(s_b)) ** 2).sum() + ((a.mean(0) - b.mean(0)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.05)
    with pytest.raises(ValueError, match="equal D"):
        frechet_distance(a, a[:, :2])


def test_sharpness_and_caption_accuracy():
    specs = [random_spec(0, i, 32, video=True) for i in range(12)]
    clean = [render(s, 32, 9) for s in specs]
    blurred = [((f[:, :-1].astype(float) + f[:, 1:]) / 2).astype(np.uint8) for f in clean]
    blurred = [((f[:, :, :-1].astype(float) + f[:, :, 1:]) / 2).astype(np.uint8) for f in blurred]
    assert sharpness(blurred) < 0.7 * sharpness(clean)
    acc = caption_accuracy(clean, [s.caption for s in specs])
    assert acc["all"] == 1.0
    noise = [
        np.random.default_rng(i).integers(0, 255, (9, 32, 32, 3), dtype=np.uint8) for i in range(12)
    ]
    assert caption_accuracy(noise, [s.caption for s in specs])["all"] < 0.3


ROW_KEYS = {
    "fd",
    "fd_ci",
    "cfd",
    "cfd_ci",
    "caption_all_ci",
    "sharpness_ratio",
    "background_noise",
    "saturation_distance",
    "caption_color",
    "caption_shape",
    "caption_motion",
    "caption_all",
    "num_samples",
}


def test_evaluate_tool_json_keys_reference_halves_and_n_warning(tmp_path, capsys):
    make_synthetic_dataset(tmp_path / "real", 24, "video", size=32, frames=9, fmt="gif", seed=0)
    make_synthetic_dataset(tmp_path / "other", 16, "video", size=32, frames=9, fmt="gif", seed=1)
    out = tmp_path / "res"
    common = ["--real", str(tmp_path / "real"), "--row", f"held-out={tmp_path / 'other'}"]
    common += ["--feature-net", str(tmp_path / "net.safetensors"), "--feature-steps", "10"]
    evaluate_tool.main([*common, "--output", str(out), "--bootstrap", "200"])
    res = json.loads(out.with_suffix(".json").read_text())
    assert set(res) >= {"real", "rows", "feature_net_accuracy", "reference", "warnings"}
    for row in (res["real"], res["rows"]["held-out"]):
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        lo, hi = row["fd_ci"]
        assert lo < hi and row["fd"] >= 0
    real, row = res["real"], res["rows"]["held-out"]
    # two halves of 12 real clips: one the reference of every row, the other the real row
    assert res["reference"]["num_samples"] == 12 and real["num_samples"] == 12
    assert row["num_samples"] == 16
    assert row["caption_all"] > 0.9 and row["sharpness"] > 100  # "sharpness" kept for the demo
    assert 0.5 < row["sharpness_ratio"] < 2 and 0.5 < real["sharpness_ratio"] < 2
    assert real["background_noise"] < 0.5 and row["background_noise"] < 0.5  # GIF: lossless
    assert row["saturation_distance"] < 0.05 and 0.7 < row["saturation_mean"] < 1
    assert (tmp_path / "net.safetensors").exists()
    table = out.with_suffix(".md").read_text()
    assert "| held-out |" in table and "| real data |" in table and "video FD ↓ [95 % CI]" in table
    # N differs from the reference's: warned (stderr, JSON and table) ...
    assert len(res["warnings"]) == 1 and "N=16" in res["warnings"][0]
    assert "N=16" in capsys.readouterr().err and "N=16" in table
    # ... and not once every set is capped to the same N (the cached net is reused)
    evaluate_tool.main([*common, "--output", str(out), "--max-samples", "8", "--bootstrap", "0"])
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["warnings"] == [] and res["reference"]["num_samples"] == 8
    assert res["real"]["num_samples"] == res["rows"]["held-out"]["num_samples"] == 8
    assert res["rows"]["held-out"]["fd_ci"] is None


def test_row_limits_get_a_floor_of_their_own_n_and_a_stale_net_is_refused(tmp_path):
    make_synthetic_dataset(tmp_path / "real", 96, "video", size=16, frames=5, fmt="gif", seed=0)
    make_synthetic_dataset(tmp_path / "other", 48, "video", size=16, frames=5, fmt="gif", seed=1)
    out, net = tmp_path / "res", tmp_path / "net.safetensors"
    args = ["--real", str(tmp_path / "real"), "--row", f"all={tmp_path / 'other'}",
            "--row", f"first 20={tmp_path / 'other'}@20", "--size", "16",
            "--feature-net", str(net), "--feature-steps", "20", "--bootstrap", "50",
            "--max-samples", "48", "--output", str(out)]  # fmt: skip
    evaluate_tool.main(args)
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["rows"]["first 20"]["num_samples"] == 20 and res["rows"]["all"]["num_samples"] == 48
    # the real-data floor measured again at the capped row's N, against the same reference
    assert set(res["floors"]) == {"20"} and res["floors"]["20"]["num_samples"] == 20
    assert "| real data (first 20) |" in out.with_suffix(".md").read_text()
    assert len(res["warnings"]) == 1 and "'first 20'" in res["warnings"][0]
    # conditional FD: 48 clips hold caption classes of >= 16 (shapes: ~16 each); 20 do not
    assert res["rows"]["all"]["cfd"] is not None or res["rows"]["all"]["cfd_classes"] == {}
    assert res["rows"]["first 20"]["cfd"] is None
    # the cached net was trained for 5-frame clips of 16 pixels: another size is refused
    with pytest.raises(ValueError, match=r"net\.safetensors.*size 16 \(wanted 32\)"):
        evaluate_tool.main([*args[:-2], "--size", "32"])


def test_reads_generate_output_folders(tmp_path):
    from megatron_apt.data.media import write_media

    spec = random_spec(3, 0, 32, video=True)
    write_media(tmp_path / "0000-x.gif", render(spec, 32, 9), fps=8)
    (tmp_path / "summary.json").write_text(
        json.dumps({"samples": [{"index": 0, "prompt": spec.caption, "files": ["0000-x.gif"]}]})
    )
    frames, captions = evaluate_tool.load_folder(str(tmp_path))
    assert captions == [spec.caption] and frames[0].shape == (9, 32, 32, 3)
