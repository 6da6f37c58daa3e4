"""megatron-apt: Adversarial Post-Training of MMDiT diffusion models into one-step generators."""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "megatron_apt/__init__.py").read_text())[1]

# Versions we rely on (read against their installed sources): see README "Pinned versions".
TORCH = "torch==2.13.0"
INSTALL_REQUIRES = [
    TORCH,
    "megatron-core==0.16.1",
    "deepspeed==0.19.8",
    "psutil>=5.9",  # megatron dist_checkpointing needs it and does not declare it
    "numpy>=1.26",
    "safetensors>=0.4",
    "sentencepiece==0.2.3",
    "transformers==5.24.0",  # T5 text encoder loaded from local directories
    "diffusers==0.42.1",  # VAE wrappers (AutoencoderKL, AutoencoderKLWan); SD3 interop
    "imageio>=2.34",
    "av>=12",  # MP4 read/write through imageio
    "Pillow>=10",
    "tqdm>=4.66",
    "tensorboard>=2.16",
    "matplotlib>=3.8",  # loss curves (tools/make_figures.py)
]
EXTRAS = {
    # CUDA machines only: Transformer Engine kernels (BF16/FP8) and flash-attn. megatron-core
    # 0.16.1 declares transformer-engine>=2.9.0a0,<2.12.0 (its METADATA). flash-attn: what every
    # TE of that range accepts; outside [version_required, max_version] TE turns its flash
    # backend off (TE 2.9: 2.1.1-2.8.1, 2.7.3 on Blackwell; TE 2.10/2.11: up to 2.8.3;
    # attention/dot_product_attention/utils.py:116-118, backends.py:83-87 / :96-100; the table
    # is in tests/unit/test_fp8_amax_and_kernel_pins.py). Both compile against the installed
    # torch: install them with `make install-gpu` (a second pip step with
    # --no-build-isolation), not `pip install .[gpu]` in one step.
    "gpu": ["transformer-engine[pytorch]>=2.9,<2.12", "flash-attn>=2.7.3,<=2.8.1"],
    # mpirun launches: mpi4py plus an MPI library from a wheel.
    "mpi": ["mpi4py==4.1.2", "mpich"],
    "dev": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "pytest-xdist>=3.5",  # make test: the unit tests on 2 workers
        "ruff>=0.6",
        "mpi4py==4.1.2",  # the tests start real mpirun jobs
        "mpich",
    ],
}

setup(
    name="megatron-apt",
    version=VERSION,
    description="Adversarial post-training of MMDiT flow-matching models into one-step "
    "image and video generators, on megatron-core and DeepSpeed",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_apt", "megatron_apt.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
