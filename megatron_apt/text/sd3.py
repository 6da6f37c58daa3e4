"""Stable Diffusion 3 / 3.5 text conditioning: CLIP-L + OpenCLIP-bigG + T5-XXL, built exactly as
``diffusers.StableDiffusion3Pipeline.encode_prompt`` builds it (diffusers 0.42,
``pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py``, ``_get_clip_prompt_embeds``,
``_get_t5_prompt_embeds``, ``encode_prompt``):

* each CLIP (``CLIPTextModelWithProjection``) gets its tokenizer's ids padded to
  ``tokenizer.model_max_length`` (77); its token embeddings are the PENULTIMATE hidden states
  (``hidden_states[-2]``, ``clip_skip=None``) and its pooled vector the projected
  ``text_embeds``;
* the two CLIP token embeddings are concatenated along the width (768 + 1280 = 2048) and
  zero-padded to the T5 width (4096); the T5 tokens (ids padded to ``max_length``, 256 in SD3,
  run WITHOUT an attention mask, as diffusers does) follow along the sequence:
  ``text [B, 77 + max_length, 4096]``;
* ``pooled [B, 2048]`` = the two pooled vectors concatenated;
* with no ``text_encoder_3`` the T5 part is zeros of the transformer's ``joint_attention_dim``.

Every token is attended (SD3 has no text mask): ``text_mask`` is all True.

Loaded from a LOCAL pipeline directory (``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``,
``tokenizer_2/``, ``text_encoder_3/``, ``tokenizer_3/``); weights from safetensors only,
``local_files_only``, no remote code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_apt.text.encoder import TextEmbeddings, check_weights_dir

__all__ = ["SD3TextEncoder", "is_sd3_pipeline_dir"]

_CLIP_DIRS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
_T5_DIRS = ("text_encoder_3", "tokenizer_3")


def is_sd3_pipeline_dir(path: str | Path) -> bool:
    """True for a directory laid out like a diffusers SD3 pipeline (``model_index.json`` naming
    ``StableDiffusion3Pipeline``, or ``text_encoder/`` + ``text_encoder_2/`` subfolders)."""
    path = Path(path)
    index = path / "model_index.json"
    if index.is_file():
        try:
            if json.loads(index.read_text()).get("_class_name", "").startswith("StableDiffusion3"):
                return True
        except (json.JSONDecodeError, AttributeError):
            pass
    return all((path / enc).is_dir() for enc, _ in _CLIP_DIRS)


class SD3TextEncoder(torch.nn.Module):
    """SD3's three frozen text encoders and their tokenizers (module docstring).

    Same interface as :class:`megatron_apt.text.TextEncoder`: ``dim`` (the T5 width, i.e. the
    transformer's ``joint_attention_dim``), ``pooled_dim``, ``encode(captions)`` ->
    :class:`TextEmbeddings` with ``pooled``.
    """

    def __init__(
        self, clips, clip_tokenizers, t5, t5_tokenizer, max_length: int = 256, t5_dim=None
    ):
        super().__init__()
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        if t5 is None and not t5_dim:
            raise ValueError("without text_encoder_3 the T5 width (t5_dim) must be given")
        self.clips = torch.nn.ModuleList([m.eval().requires_grad_(False) for m in clips])
        self.clip_tokenizers = list(clip_tokenizers)
        self.t5 = None if t5 is None else t5.eval().requires_grad_(False)
        self.t5_tokenizer = t5_tokenizer
        self.max_length = max_length
        self._t5_dim = t5.config.d_model if t5 is not None else int(t5_dim)
        clip_width = sum(m.config.hidden_size for m in self.clips)
        if clip_width > self._t5_dim:
            raise ValueError(
                f"the CLIP token embeddings ({clip_width} wide) do not fit the T5 width "
                f"{self._t5_dim} they are zero-padded to"
            )

    @property
    def dim(self) -> int:
        return self._t5_dim

    @property
    def pooled_dim(self) -> int:
        return sum(m.config.projection_dim for m in self.clips)

    @property
    def clip_length(self) -> int:
        return self.clip_tokenizers[0].model_max_length

    @property
    def text_length(self) -> int:
        """``L`` of every embedding: the CLIP context plus the T5 tokens."""
        return self.clip_length + self.max_length

    @property
    def device(self) -> torch.device:
        return next(self.clips[0].parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.clips[0].parameters()).dtype

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = 256,
    ) -> SD3TextEncoder:
        """Load from a local SD3/SD3.5 pipeline directory; never downloads, never unpickles."""
        from transformers import (
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            T5EncoderModel,
            T5Tokenizer,
        )

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"SD3 pipeline directory not found: {path}")
        clips, toks = [], []
        for enc, tok in _CLIP_DIRS:
            check_weights_dir(path / enc, ("clip_text_model",))
            clips.append(
                CLIPTextModelWithProjection.from_pretrained(
                    path / enc, local_files_only=True, use_safetensors=True, dtype=dtype
                ).to(device)
            )
            toks.append(_tokenizer(CLIPTokenizer, path / tok))
        t5 = t5_tok = t5_dim = None
        if (path / _T5_DIRS[0]).is_dir():
            check_weights_dir(path / _T5_DIRS[0], ("t5",))
            t5 = T5EncoderModel.from_pretrained(
                path / _T5_DIRS[0], local_files_only=True, use_safetensors=True, dtype=dtype
            ).to(device)
            t5_tok = _tokenizer(T5Tokenizer, path / _T5_DIRS[1])
        else:  # SD3 without T5: zeros of the transformer's text width (diffusers' fallback)
            cfg = path / "transformer" / "config.json"
            if not cfg.is_file():
                raise FileNotFoundError(
                    f"{path} has no text_encoder_3/ and no transformer/config.json to take "
                    "the T5 width (joint_attention_dim) from"
                )
            t5_dim = json.loads(cfg.read_text())["joint_attention_dim"]
        return cls(clips, toks, t5, t5_tok, max_length=max_length, t5_dim=t5_dim)

    # -- encoding ---------------------------------------------------------------------------

    def _clip(self, k: int, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.clip_tokenizers[k]
        ids = tok(
            captions,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out = self.clips[k](ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2], out[0]  # [B, 77, W_k], [B, P_k]

    def _t5(self, captions: list[str]) -> torch.Tensor:
        if self.t5 is None:
            return torch.zeros(
                len(captions), self.max_length, self.dim, device=self.device, dtype=self.dtype
            )
        ids = self.t5_tokenizer(
            captions,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        return self.t5(ids.to(self.device))[0]  # no attention mask, as diffusers

    @torch.no_grad()
    def embed(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text [B, L, D], pooled [B, P])`` of one batch of captions."""
        (h1, p1), (h2, p2) = self._clip(0, captions), self._clip(1, captions)
        t5 = self._t5(captions)
        clip = torch.cat([h1, h2], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip.to(t5.dtype), t5], dim=-2), torch.cat([p1, p2], dim=-1)

    def encode(
        self, captions: Sequence[str], padding: str | None = None, batch_size: int = 32
    ) -> TextEmbeddings:
        """Captions -> :class:`TextEmbeddings` (``text [B, 77 + max_length, D]``, an all-True
        mask, ``pooled [B, P]``), ``batch_size`` captions per call of the encoders."""
        if padding not in (None, "max_length"):
            raise ValueError(
                f"SD3 text conditioning has a fixed length (padding='max_length'), got {padding!r}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        captions = list(captions)
        texts, pooled = [], []
        for i in range(0, len(captions), batch_size):
            t, p = self.embed(captions[i : i + batch_size])
            texts.append(t)
            pooled.append(p)
        if texts:
            text, pool = torch.cat(texts), torch.cat(pooled)
        else:
            text = torch.zeros(0, self.text_length, self.dim, dtype=self.dtype, device=self.device)
            pool = torch.zeros(0, self.pooled_dim, dtype=self.dtype, device=self.device)
        mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        return TextEmbeddings(text=text, text_mask=mask, pooled=pool)

    def forward(self, captions: Sequence[str]) -> TextEmbeddings:
        return self.encode(captions)


def _tokenizer(cls, path: Path):
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    try:
        return cls.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a loadable {cls.__name__} ({e})") from e
