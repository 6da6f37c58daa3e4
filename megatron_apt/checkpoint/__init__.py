"""Checkpoint formats, conversion and loading.

* :mod:`~megatron_apt.checkpoint.io`: the consolidated (TP=1) model file;
* :mod:`~megatron_apt.checkpoint.convert`: the TP-sharded directory, diffusers import /
  export of every registered model family (SD3, Wan2.1), training-checkpoint export,
  resharding, inspection (``tools/convert_checkpoint.py``);
* :mod:`~megatron_apt.checkpoint.diffusers_dir`: diffusers model directories of any family;
* :mod:`~megatron_apt.checkpoint.model_init`: the trainer's builders with ``init_from``;
* :func:`load_mmdit`: the velocity model (any family) of a checkpoint in any of those
  formats, for inference.
"""

from __future__ import annotations

__all__ = ["load_mmdit"]


def __getattr__(name: str):
    if name == "load_mmdit":  # lazy: keeps `import megatron_apt.checkpoint.io` light
        from megatron_apt.checkpoint.load import load_mmdit

        return load_mmdit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
