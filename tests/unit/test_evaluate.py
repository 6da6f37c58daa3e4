"""Evaluation metrics against hand values, and tools/evaluate.py on rendered data."""

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


def test_evaluate_tool_ranks_real_above_corrupted(tmp_path):
    make_synthetic_dataset(tmp_path / "real", 24, "video", size=32, frames=9, fmt="gif", seed=0)
    make_synthetic_dataset(tmp_path / "other", 16, "video", size=32, frames=9, fmt="gif", seed=1)
    out = tmp_path / "res"
    evaluate_tool.main(
        [
            "--real",
            str(tmp_path / "real"),
            "--row",
            f"held-out={tmp_path / 'other'}",
            "--output",
            str(out),
            "--feature-net",
            str(tmp_path / "net.safetensors"),
            "--feature-steps",
            "30",
        ]
    )
    import json

    res = json.loads(out.with_suffix(".json").read_text())
    row = res["rows"]["held-out"]
    assert row["caption_all"] > 0.9 and row["sharpness"] > 100
    assert (tmp_path / "net.safetensors").exists()
    assert "| held-out |" in out.with_suffix(".md").read_text()


def test_reads_generate_output_folders(tmp_path):
    import json

    from megatron_apt.data.media import write_media

    spec = random_spec(3, 0, 32, video=True)
    write_media(tmp_path / "0000-x.gif", render(spec, 32, 9), fps=8)
    (tmp_path / "summary.json").write_text(
        json.dumps({"samples": [{"index": 0, "prompt": spec.caption, "files": ["0000-x.gif"]}]})
    )
    frames, captions = evaluate_tool.load_folder(str(tmp_path))
    assert captions == [spec.caption] and frames[0].shape == (9, 32, 32, 3)
