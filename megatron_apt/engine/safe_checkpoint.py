"""DeepSpeed checkpoint engine that never unpickles arbitrary objects.

DeepSpeed 0.19.8's ``TorchCheckpointEngine.load`` calls ``torch.load(weights_only=False)``.
Ours loads with ``weights_only=True``; the few non-tensor types DeepSpeed stores in its
checkpoints (enums, its config objects) are allow-listed by name, nothing else.
"""

from __future__ import annotations

import argparse
import enum
import os
import pickle
import zipfile

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


def _safe_globals() -> list:
    out: list = [argparse.Namespace, enum.Enum]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        out += [LossScaler, DynamicLossScaler]
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        out.append(fragment_address)
    except ImportError:  # pragma: no cover
        pass
    return out


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    def load(self, path: str, map_location=None):
        """Three different failures, told apart: a missing file (I/O), a truncated or
        corrupt one (format), and one holding objects outside the allow-list (security: only
        this is a refusal that suggests tampering)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing")
        with torch.serialization.safe_globals(_safe_globals()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:  # what weights-only loading raises
                raise RuntimeError(
                    f"refusing to load {path}: it holds objects outside the allow-list of "
                    f"weights-only loading ({_first_line(e)})"
                ) from e
            except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
                raise RuntimeError(
                    f"{path} is truncated or not a torch checkpoint ({_first_line(e)})"
                ) from e


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def install(engine) -> None:
    """Swap the engine's checkpoint engine for the weights-only one."""
    engine.checkpoint_engine = SafeTorchCheckpointEngine(config_params=None)
