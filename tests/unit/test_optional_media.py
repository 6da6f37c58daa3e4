"""PyAV and imageio are optional at run time: training, checkpoint conversion and benchmarking
run without them (issue 29, item 3: the GPU image has no PyAV).

Each check runs in a subprocess where ``av`` and ``imageio`` cannot be imported
(``sys.modules[name] = None``): every module of the package imports, the entry points print
their help, and one update of ``tiny-apt`` trains and saves. Decoding or encoding a video without
its library raises :class:`MediaLibraryMissing` naming the package and its pip requirement, not
a :class:`MediaError` (which preprocessing would take for an unreadable file and skip).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from megatron_apt.data import media
from megatron_apt.data.media import MediaError, read_frames, write_media
from megatron_apt.testing.launch import REPO_ROOT, launcher_env

BLOCKED = ("av", "imageio", "imageio.v3")
# run a script (argv[1], its arguments after it) or code (-c) with the media libraries blocked
RUNNER = f"""
import runpy, sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
if sys.argv[1] == "-c":
    exec(sys.argv[2])
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_blocked(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, *args],
        cwd=REPO_ROOT,
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n--- stderr ---\n" + proc.stderr[-3000:]
    return proc


IMPORT_ALL = """
import importlib, pkgutil, sys
import megatron_apt
names = [m.name for m in pkgutil.walk_packages(megatron_apt.__path__, "megatron_apt.")]
for name in names:
    importlib.import_module(name)
import pretrain_apt
loaded = sorted(n for n in ("av", "imageio") if sys.modules.get(n) is not None)
print("IMPORTED", len(names), "LOADED", loaded)
"""


def test_every_module_imports_without_media_libraries():
    proc = run_blocked("-c", IMPORT_ALL)
    assert "LOADED []" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize(
    "script", ["pretrain_apt.py", "tools/convert_checkpoint.py", "tools/benchmark.py"]
)
def test_entry_points_start_without_media_libraries(script):
    proc = run_blocked(str(REPO_ROOT / script), "--help")
    assert "usage:" in proc.stdout


def test_training_runs_without_media_libraries(tmp_path):
    """The trainer reads latent shards (``megatron_apt.data``) and writes checkpoints: one
    update on one process, no media library."""
    args = ["--recipe", "tiny-apt", "--train-iters", "1", "--save", str(tmp_path / "run")]
    proc = run_blocked(str(REPO_ROOT / "pretrain_apt.py"), *args)
    assert "TRAINING-DONE" in proc.stdout, proc.stdout[-2000:]


@pytest.fixture
def no_media_libraries(monkeypatch):
    for name in BLOCKED:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("name", ["clip.mp4", "clip.webm"])
def test_reading_a_video_without_pyav_names_the_package(tmp_path, no_media_libraries, name):
    missing = r"'av' package .* pip install 'av>=12'"
    with pytest.raises(media.MediaLibraryMissing, match=missing) as e:
        read_frames(tmp_path / name)
    assert not isinstance(e.value, MediaError)  # not "an unreadable file": nothing is skipped


def test_writing_a_video_without_pyav_names_the_package(tmp_path, no_media_libraries):
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(media.MediaLibraryMissing, match=r"'av' package .* pip install 'av>=12'"):
        write_media(tmp_path / "clip.mp4", frames)
    # images and GIFs are written with Pillow: no optional library needed
    assert write_media(tmp_path / "frame.png", frames[:1]).is_file()
    assert write_media(tmp_path / "clip.gif", frames).is_file()


def test_reading_a_gif_without_imageio_names_the_package(tmp_path, no_media_libraries):
    gif = write_media(tmp_path / "clip.gif", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(media.MediaLibraryMissing, match=r"'imageio' package .* 'imageio>=2.34'"):
        read_frames(gif)
