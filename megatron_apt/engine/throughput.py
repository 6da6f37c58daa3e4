"""Per log step: achieved TFLOP/s per GPU, MFU, tokens/s and peak memory of a training run,
from the analytic FLOPs of each micro-batch actually run (megatron_apt.config.flops)."""

from __future__ import annotations

import torch

from megatron_apt.config.flops import phase_flops, visual_tokens
from megatron_apt.config.training import TrainConfig, parse_head_layers, parse_recompute_layers
from megatron_apt.models.families import family_of
from megatron_apt.parallel.state import ParallelState
from megatron_apt.utils.throughput import ThroughputMeter, peak_memory_gib, reference_peak

RAW_FLOPS, RAW_TOKENS, RAW_SECONDS = "_flops", "_tokens", "_seconds"  # popped by finish()
# the trainer's micro-batch kinds (its SALT keys) -> the FLOP phases of config/flops.py
PHASE_OF = {"diffusion": "diffusion", "consistency": "consistency", "d": "apt_d", "g": "apt_g"}


class TrainingThroughput:
    """Counts this rank's share of the FLOPs and tokens of every micro-batch and turns them
    into the log fields ``tflops_per_gpu``, ``mfu``, ``peak_tflops``, ``tokens_per_s`` (the
    whole job's) and ``peak_mem_gib``."""

    def __init__(
        self, cfg: TrainConfig, ps: ParallelState, device: torch.device, dtype: torch.dtype
    ):
        self.model = cfg.model
        self.forward_flops = family_of(cfg.model).forward_flops
        self.frozen_d = cfg.freeze_discriminator
        self.recompute = len(parse_recompute_layers(cfg.recompute_layers, cfg.model.num_layers))
        self.head_layers = parse_head_layers(cfg.d_head_layers, cfg.model.num_layers)
        self.share = ps.tp_size * ps.cp_size  # model-parallel ranks that split a micro-batch
        self.world = torch.distributed.get_world_size()
        self.device = device
        fp8 = "fp8" in str(cfg.layer_spec or "")
        self.peak = reference_peak(device, dtype, fp8)
        self.meter = ThroughputMeter()

    def count(self, kind: str, batch: dict) -> None:
        """One micro-batch of kind ``kind`` (diffusion, consistency, d, g) with ``batch``."""
        phase = PHASE_OF[kind]
        if phase == "apt_d" and self.frozen_d:
            phase = "apt_d_frozen"
        b, _, t, h, w = batch["latents"].shape
        n_vis, n_txt = visual_tokens(self.model, t, h, w), batch["text"].shape[1]
        flops = b * phase_flops(
            self.model, phase, n_vis, n_txt, self.recompute, self.head_layers, self.forward_flops
        )
        self.meter.add(flops / self.share, b * (n_vis + n_txt) / self.share)

    def raw(self, seconds: float) -> dict[str, float]:
        """This rank's FLOPs, tokens (x world size: their mean over the ranks is the job's
        sum), seconds and peak memory since the last call, for the trainer's all-reduce: host
        numbers (Python floats), which the trainer puts on the device with the losses."""
        flops, tokens = self.meter.take()
        out = {
            RAW_FLOPS: flops,
            RAW_TOKENS: tokens * self.world,
            RAW_SECONDS: seconds,
            "peak_mem_gib": peak_memory_gib(self.device),
        }
        return {k: float(v) for k, v in out.items()}

    def finish(self, values: dict[str, float], updates: int) -> dict[str, float]:
        """The rank-averaged :meth:`raw` values -> the log fields: ``step_time_s`` (mean
        seconds per update), ``tflops_per_gpu``, ``mfu``, ``peak_tflops``, ``tokens_per_s``."""
        values = dict(values)
        flops, tokens = values.pop(RAW_FLOPS), values.pop(RAW_TOKENS)
        seconds = max(values.pop(RAW_SECONDS), 1e-12)
        tflops = flops / seconds / 1e12
        values.update(
            step_time_s=seconds / max(updates, 1),
            tflops_per_gpu=tflops,
            mfu=tflops / self.peak["tflops"],
            peak_tflops=self.peak["tflops"],
            tokens_per_s=tokens / seconds,
        )
        return values
