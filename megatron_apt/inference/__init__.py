"""Inference: prompts -> text encoder -> one-step generator (or diffusion model) -> VAE -> files,
with the per-component timing of the paper's Table 8. CLI: ``tools/generate.py``."""

from megatron_apt.inference.pipeline import (
    COMPONENTS,
    MODES,
    ComponentTimer,
    GeneratedSample,
    GenerationPipeline,
    SamplingConfig,
    format_timing_table,
    sample_noise,
)
from megatron_apt.inference.writers import (
    SUMMARY_FILE,
    check_writable_size,
    sample_stem,
    slugify,
    write_sample,
    write_summary,
)

__all__ = [
    "COMPONENTS",
    "MODES",
    "SUMMARY_FILE",
    "ComponentTimer",
    "GeneratedSample",
    "GenerationPipeline",
    "SamplingConfig",
    "check_writable_size",
    "format_timing_table",
    "sample_noise",
    "sample_stem",
    "slugify",
    "write_sample",
    "write_summary",
]
