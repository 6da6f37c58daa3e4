"""Text -> pixels: text encoder, one-step generator (or the diffusion model), VAE decode.

The three components of the paper's Table 8 (appendix C), each timed:

* **text encoder**: prompts -> ``TextEmbeddings`` (``text [B, L, D]``, ``text_mask [B, L]``);
  under tensor parallelism only TP rank 0 holds the encoder and broadcasts the embeddings, so
  every rank conditions on bit-identical inputs;
* **DiT**: noise ``z [B, C, T', H', W']`` -> latents. ``mode="generator"``: the APT generator
  ``G(z, c) = z - v(z, c, 1)`` in one step, or the zero-shot two-step sampler through
  ``t_mid``; ``mode="diffusion"``: the diffusion model with ``steps`` Euler steps, classifier-free
  guidance and a negative prompt (for comparison). TP-sharded weights work as is (every rank
  runs the same call on the same noise);
* **VAE**: latents -> ``uint8 [B, T, H, W, 3]`` pixels (on TP rank 0 only).

Noise is per sample: sample ``index`` with ``seed`` always gets the same ``z`` (drawn on the CPU
from ``SeedSequence([seed, index])``), whatever the batch size, device or number of ranks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_apt.inference.schedule import (
    SCHEDULES,
    diffusers_scheduler_sample,
    flow_match_euler_sigmas,
)
from megatron_apt.models import Generator, MMDiT
from megatron_apt.models.families import family_of
from megatron_apt.parallel.state import ParallelState
from megatron_apt.stages.diffusion import euler_sample
from megatron_apt.text import DEFAULT_NEGATIVE_PROMPT, SD3TextEncoder, TextEmbeddings, TextEncoder
from megatron_apt.vae import VAE

__all__ = [
    "COMPONENTS",
    "MODES",
    "ComponentTimer",
    "GeneratedSample",
    "GenerationPipeline",
    "SamplingConfig",
    "format_timing_table",
    "sample_noise",
]

MODES = ("generator", "diffusion")
COMPONENTS = {"text_encoder": "Text Encoder", "dit": "DiT", "vae": "VAE"}
"""Timed components (key -> label of the paper's Table 8)."""


@dataclass(kw_only=True)
class SamplingConfig:
    """How latents are sampled.

    mode: ``"generator"`` (APT generator, ``steps`` 1 or 2) or ``"diffusion"`` (``steps`` Euler
        steps of the diffusion model with CFG).
    t_mid: intermediate time of the zero-shot two-step sampler (``steps=2``).
    renoise: two-step only: re-noise the one-step sample with fresh noise (per sample, seeded)
        instead of reusing ``z`` (the ODE's Euler step).
    guidance_scale, negative_prompt, shift: diffusion mode (CFG ``v_u + g (v_c - v_u)`` with
        the negative prompt as ``u``; timestep shift of the Euler schedule).
    schedule, num_train_timesteps: diffusion mode: ``"linear"`` (shifted ``linspace(1, 0)``),
        ``"flow-match-euler"`` (diffusers' ``FlowMatchEulerDiscreteScheduler`` sigmas, as
        SD3's pipeline samples) or ``"unipc"`` (diffusers' ``UniPCMultistepScheduler`` of
        ``scheduler_config``, Wan's default; :mod:`megatron_apt.inference.schedule`).
    scheduler_config: ``"unipc"`` only: the scheduler's config (``read_scheduler``).
    """

    mode: str = "generator"
    steps: int = 1
    t_mid: float = 0.5
    renoise: bool = False
    guidance_scale: float = 7.5
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    shift: float = 1.0
    schedule: str = "linear"
    num_train_timesteps: int = 1000
    scheduler_config: dict | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if (self.schedule == "unipc") != (self.scheduler_config is not None):
            raise ValueError(
                "schedule 'unipc' takes the scheduler's config (scheduler_config), the "
                f"others none; got schedule={self.schedule!r}"
            )
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        if self.mode == "generator" and self.steps not in (1, 2):
            raise ValueError(
                f"the generator samples in 1 step or 2 (zero-shot), got steps={self.steps}; "
                "use mode='diffusion' for multi-step sampling of a diffusion model"
            )
        if self.mode == "generator" and self.steps == 2 and not 0.0 < self.t_mid < 1.0:
            raise ValueError(f"t_mid={self.t_mid} must lie in (0, 1)")
        if self.mode == "diffusion" and not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    @property
    def uses_cfg(self) -> bool:
        return self.mode == "diffusion" and self.guidance_scale != 1.0


# ---------------------------------------------------------------------------------------------
# Noise and timing
# ---------------------------------------------------------------------------------------------


def sample_noise(shape: Sequence[int], seed: int, index: int, stream: int = 0) -> torch.Tensor:
    """``z ~ N(0, I)`` of ``shape`` (e.g. ``(C, T', H', W')``), fp32 on the CPU, a function of
    ``(seed, index, stream)`` only: batch size, device and rank do not change it."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    words = np.random.SeedSequence([seed, index, stream]).generate_state(2, dtype=np.uint32)
    g = torch.Generator().manual_seed((int(words[0]) << 32) | int(words[1]))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


class ComponentTimer:
    """Wall-clock seconds per component; synchronizes the device around each measurement so
    that asynchronous CUDA work is charged to the component that launched it."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def reset(self) -> None:
        self.seconds.clear()


def format_timing_table(seconds: dict[str, float], num_samples: int) -> str:
    """The components of Table 8 (text encoder, DiT, VAE) with seconds, share of their total
    and seconds per sample, then the total."""
    total = sum(seconds.get(k, 0.0) for k in COMPONENTS)
    n = max(num_samples, 1)
    lines = [f"{'component':<14}{'seconds':>10}{'share':>9}{'per sample':>12}"]
    for key, label in COMPONENTS.items():
        s = seconds.get(key, 0.0)
        share = 100.0 * s / total if total > 0 else 0.0
        lines.append(f"{label:<14}{s:>10.3f}{share:>8.1f}%{s / n:>12.4f}")
    lines.append(f"{'Total':<14}{total:>10.3f}{100.0 if total else 0.0:>8.1f}%{total / n:>12.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


@dataclass
class GeneratedSample:
    """One sample: its prompt index, prompt, latents ``[C, T', H', W']`` (fp32, CPU) and
    pixels ``uint8 [T, H, W, 3]`` (None on ranks that do not decode)."""

    index: int
    prompt: str
    latents: torch.Tensor
    pixels: np.ndarray | None = None


class GenerationPipeline:
    """Text encoder + DiT + VAE.

    Args:
        model: the velocity model (MMDiT, possibly a TP shard); for ``mode="generator"`` its
            weights are the APT generator's (``G = z - v(z, 1)``).
        vae: decodes latents; also fixes the pixel <-> latent sizes.
        text_encoder: required on the rank that encodes (TP rank 0); None elsewhere.
        ps: process groups (TP); None = single process.
        device: where the DiT runs (the VAE and text encoder keep their own devices).
    """

    def __init__(
        self,
        model: MMDiT,
        vae: VAE,
        text_encoder: TextEncoder | SD3TextEncoder | None,
        *,
        ps: ParallelState | None = None,
        device: torch.device | str = "cpu",
        timer: ComponentTimer | None = None,
    ) -> None:
        if model.spec.fp8:
            # TE's delayed scaling updates amaxes and scales only on leaving an autocast with
            # grad enabled (transformer_engine/pytorch/quantization.py, fp8.py before TE 2.8,
            # ``FP8GlobalStateManager.autocast_exit``: ``if enabled and AUTOCAST_DEPTH == 0
            # and not _graph and torch.is_grad_enabled(): reduce_and_update_fp8_tensors``),
            # and model files carry no FP8 state: sampling would quantize with the initial
            # scales forever
            raise ValueError(
                f"layer spec {model.spec.name!r} cannot generate: FP8 scaling factors are only "
                "updated in training; generate with the BF16 spec 'te' (or 'auto')"
            )
        self.model, self.vae, self.text_encoder = model, vae, text_encoder
        # the pretrained Wan attends to the zero-padded text: no mask (families.py)
        self.use_text_mask = family_of(model.cfg).uses_text_mask
        self.generator = Generator(model)
        self.ps = ps or model.ps
        self.device = torch.device(device)
        self.timer = timer or ComponentTimer(self.device)
        self.is_writer = self.ps.model_rank == 0  # rank 0 of the TP (x CP) group
        if self.is_writer and text_encoder is None:
            raise ValueError("model-parallel rank 0 needs a text encoder")
        if text_encoder is not None and text_encoder.dim != model.cfg.text_dim:
            raise ValueError(
                f"text encoder gives {text_encoder.dim}-wide embeddings, the model expects "
                f"text_dim={model.cfg.text_dim}"
            )
        pooled = getattr(text_encoder, "pooled_dim", None)
        if text_encoder is not None and pooled != model.cfg.pooled_text_dim:
            raise ValueError(
                f"the model expects pooled text of width {model.cfg.pooled_text_dim} but the "
                f"text encoder ({type(text_encoder).__name__}) gives "
                + (f"{pooled}-wide pooled vectors" if pooled else "none")
                + ": SD3-style models need SD3's text encoders (--text-encoder <SD3 pipeline "
                "directory>)"
            )

    @property
    def cfg(self):
        return self.model.cfg

    # -- shapes ---------------------------------------------------------------------------

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, T', H', W')`` for ``frames x height x width`` PIXELS; ``ValueError`` when the
        VAE cannot take that size or the model cannot take its latents."""
        shape = self.vae.latent_shape(frames, height, width)
        self.check_latent_shape(shape)
        return shape

    def check_latent_shape(self, shape: Sequence[int]) -> None:
        c, t, h, w = shape
        cfg = self.cfg
        if c != cfg.in_channels or cfg.out_channels != cfg.in_channels:
            raise ValueError(
                f"the VAE gives {c} latent channels but the model takes in_channels="
                f"{cfg.in_channels} (out_channels={cfg.out_channels}): checkpoint and VAE "
                "do not belong together"
            )
        pt, ph, pw = cfg.patch_size
        s = self.vae.spatial_compression
        if t % pt or h % ph or w % pw:
            raise ValueError(
                f"latent size T'xH'xW' = {t}x{h}x{w} is not divisible by the patch size "
                f"{pt}x{ph}x{pw}: pixel height and width must be multiples of {s * ph}x{s * pw}"
            )
        tokens = (t // pt) * (h // ph) * (w // pw)
        split = self.ps.cp_size * (self.ps.tp_size if self.ps.sequence_parallel else 1)
        if tokens % split:
            raise ValueError(
                f"{tokens} visual tokens are not divisible by {split}, the ranks that split "
                f"them (context parallel {self.ps.cp_size}"
                + (
                    f" x tensor parallel {self.ps.tp_size} with SP)"
                    if self.ps.sequence_parallel
                    else ")"
                )
            )

    def pixel_shape(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """``(T, H, W)`` in pixels of ``(C, T', H', W')`` latents."""
        return tuple(self.vae.pixel_shape(*latent_shape[1:])[1:])

    # -- components -----------------------------------------------------------------------

    def encode_text(self, prompts: Sequence[str]) -> TextEmbeddings:
        """Embeddings of ``prompts`` on the DiT's device, identical on every TP rank; the mask
        stays on the host, where the model reads its layout without a device sync."""
        with self.timer("text_encoder"):
            emb = None
            if self.is_writer:
                emb = self.text_encoder.encode(list(prompts)).to("cpu")
            emb = self._broadcast(emb)
        on_device = emb.to(self.device)
        return TextEmbeddings(on_device.text, emb.text_mask, on_device.pooled)

    def _broadcast(self, emb: TextEmbeddings | None) -> TextEmbeddings:
        if self.ps.tp_size * self.ps.cp_size == 1:
            return emb
        box = [emb]
        group = self.ps.model_group
        src = dist.get_global_rank(group, 0)
        dist.broadcast_object_list(box, src=src, group=group)
        return box[0]

    @torch.no_grad()
    def sample_latents(
        self,
        emb: TextEmbeddings,
        noise: torch.Tensor,
        sampling: SamplingConfig,
        negative: TextEmbeddings | None = None,
        renoise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noise ``[B, C, T', H', W']`` (fp32) -> latents ``[B, C, T', H', W']`` (fp32)."""
        noise = noise.to(self.device)

        def mask(e: TextEmbeddings) -> torch.Tensor | None:
            return e.text_mask if self.use_text_mask else None

        with self.timer("dit"):
            if sampling.mode == "generator":
                return self.generator.sample(
                    noise,
                    emb.text,
                    mask(emb),
                    emb.pooled,
                    steps=sampling.steps,
                    t_mid=sampling.t_mid,
                    renoise=None if renoise is None else renoise.to(self.device),
                ).float()
            cond = {"text": emb.text, "text_mask": mask(emb), "pooled_text": emb.pooled}
            uncond = None
            if sampling.uses_cfg:
                if negative is None:
                    raise ValueError("classifier-free guidance needs the negative embeddings")
                uncond = {
                    "text": negative.text,
                    "text_mask": mask(negative),
                    "pooled_text": negative.pooled,
                }
            if sampling.schedule == "unipc":
                return diffusers_scheduler_sample(
                    self.model,
                    noise,
                    num_steps=sampling.steps,
                    scheduler_config=sampling.scheduler_config,
                    cond=cond,
                    uncond=uncond,
                    guidance_scale=sampling.guidance_scale,
                ).float()
            return euler_sample(
                self.model,
                noise,
                num_steps=sampling.steps,
                cond=cond,
                uncond=uncond,
                guidance_scale=sampling.guidance_scale,
                shift=sampling.shift,
                timesteps=self._timesteps(sampling),
            ).float()

    @staticmethod
    def _timesteps(sampling: SamplingConfig) -> torch.Tensor | None:
        if sampling.schedule == "linear":
            return None  # euler_sample's own shifted linspace
        return flow_match_euler_sigmas(sampling.steps, sampling.shift, sampling.num_train_timesteps)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray | None:
        """Latents ``[B, C, T', H', W']`` -> ``uint8 [B, T, H, W, 3]`` (None off TP rank 0)."""
        if not self.is_writer:
            return None
        with self.timer("vae"):
            pixels = self.vae.decode(latents)  # [B, 3, T, H, W] in [-1, 1]
            pixels = ((pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
            return pixels.permute(0, 2, 3, 4, 1).cpu().numpy()  # [B, T, H, W, 3]

    # -- end to end -----------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str],
        latent_shape: Sequence[int],
        sampling: SamplingConfig,
        *,
        seed: int = 0,
        batch_size: int = 1,
        first_index: int = 0,
    ) -> Iterator[GeneratedSample]:
        """Samples of ``prompts`` (indices ``first_index + i``), ``batch_size`` per DiT call,
        yielded in order as their batch finishes."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.check_latent_shape(latent_shape)
        negative = None
        if sampling.uses_cfg:
            negative = self.encode_text([sampling.negative_prompt])
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            indices = range(first_index + start, first_index + start + len(batch))
            noise = torch.stack([sample_noise(latent_shape, seed, i) for i in indices])
            renoise = None
            if sampling.mode == "generator" and sampling.steps == 2 and sampling.renoise:
                renoise = torch.stack([sample_noise(latent_shape, seed, i, 1) for i in indices])
            emb = self.encode_text(batch)
            latents = self.sample_latents(emb, noise, sampling, negative, renoise)
            pixels = self.decode(latents)
            latents = latents.cpu()
            for j, (i, prompt) in enumerate(zip(indices, batch)):
                yield GeneratedSample(i, prompt, latents[j], None if pixels is None else pixels[j])
