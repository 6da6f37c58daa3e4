"""One entry for every text conditioning a ``--text-encoder`` path can name."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_apt.text.encoder import TextEncoder
from megatron_apt.text.sd3 import SD3TextEncoder, is_sd3_pipeline_dir
from megatron_apt.text.wan import WAN_TEXT_LENGTH, WanTextEncoder, is_wan_pipeline_dir

__all__ = ["load_text_encoder"]


def load_text_encoder(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_length: int | None = None,
) -> TextEncoder | SD3TextEncoder | WanTextEncoder:
    """The text encoder a local directory holds, chosen by its contents:

    * a diffusers SD3 / SD3.5 pipeline directory (``model_index.json`` of
      ``StableDiffusion3Pipeline``, or ``text_encoder/`` + ``text_encoder_2/``):
      :class:`SD3TextEncoder` (CLIP-L + CLIP-G + T5, pooled vectors; ``max_length`` is the
      T5 part, the CLIP context comes on top);
    * a diffusers Wan pipeline directory (``model_index.json`` of a ``Wan*`` pipeline, or a
      umT5 ``text_encoder/`` + ``tokenizer/``): :class:`WanTextEncoder` (umT5, exactly as
      ``WanPipeline.encode_prompt``);
    * a T5 / UMT5 directory (``config.json`` + ``spiece.model``, e.g. ``google/t5-v1_1-xxl`` or
      Wan's ``umt5-xxl``): :class:`TextEncoder`.

    ``max_length``: T5 / umT5 tokens per caption; None takes the family's: 512 for Wan
    (:data:`WAN_TEXT_LENGTH`), 256 for SD3 and a plain T5 directory.
    """

    def length(default: int) -> int:
        return default if max_length is None else max_length

    if Path(path).is_dir() and is_sd3_pipeline_dir(path):
        return SD3TextEncoder.from_pretrained(path, device, dtype, max_length=length(256))
    if Path(path).is_dir() and is_wan_pipeline_dir(path):
        return WanTextEncoder.from_pretrained(
            path, device, dtype, max_length=length(WAN_TEXT_LENGTH)
        )
    return TextEncoder.from_pretrained(path, device, dtype, max_length=length(256))
