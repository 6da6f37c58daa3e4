"""The one metrics entry point: a JSONL file, TensorBoard and a fixed one-line console format.

Every log step appends one JSON object to ``LOG_DIR/metrics.jsonl`` and writes the same scalars
to TensorBoard (``LOG_DIR/tensorboard``). Only the writer rank (global rank 0) writes; values
must already be reduced over data parallel by the caller. Events of the collapse policy
(``megatron_apt.engine.recovery``: collapse, rollback, stop) are records with an ``"event"``
key in the same file; readers of metrics skip them (``evaluation.figures.read_metrics``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


class MetricsLogger:
    def __init__(
        self,
        log_dir: str | Path | None,
        enabled: bool = True,
        total_steps: int = 0,
        tensorboard: bool = True,
        stream=None,
    ):
        self.enabled = enabled
        self.total = total_steps
        self.stream = stream or sys.stdout
        self.path = None
        self.tb = None
        if enabled and log_dir is not None:
            d = Path(log_dir)
            d.mkdir(parents=True, exist_ok=True)
            self.path = d / "metrics.jsonl"
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(str(d / "tensorboard"))
                except ImportError:  # pragma: no cover - tensorboard is a dependency
                    self.tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in values.items()}}
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(_tag(k), v, step)
            self.tb.flush()
        print(self.format_line(record), file=self.stream, flush=True)

    def event(self, step: int, name: str, fields: dict) -> None:
        """Append ``{"step": step, "event": name, **fields}`` to metrics.jsonl (the caller
        prints its own console line)."""
        if not self.enabled:
            return
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "event": name, **fields}) + "\n")
        if self.tb is not None:
            self.tb.add_text(f"Events/{name}", json.dumps(fields), step)
            self.tb.flush()

    def format_line(self, r: dict) -> str:
        """``step 12/350 | samples 49152 | loss_g 0.6931 | ... | lr 5.0e-06 | 1.234 s``."""
        parts = [f"step {r['step']}/{self.total}"]
        if "samples" in r:
            parts.append(f"samples {int(r['samples'])}")
        for k in ("loss", "loss_g", "loss_d", "loss_r1", "d_real", "d_fake"):
            if k in r:
                parts.append(f"{k} {r[k]:.4f}")
        if "d_acc_real" in r and "d_acc_fake" in r:  # D's accuracy on real / fake samples
            parts.append(f"d_acc {r['d_acc_real']:.2f}/{r['d_acc_fake']:.2f}")
        if "lr" in r:
            parts.append(f"lr {r['lr']:.1e}")
        if "skipped" in r and r["skipped"]:
            parts.append(f"skipped {int(r['skipped'])}")
        if "step_time_s" in r:
            parts.append(f"{r['step_time_s']:.3f} s")
        if "tflops_per_gpu" in r:
            mfu = f" (MFU {100 * r['mfu']:.1f}%)" if "mfu" in r else ""
            parts.append(f"{r['tflops_per_gpu']:.3g} TFLOP/s/GPU{mfu}")
        if "tokens_per_s" in r:
            parts.append(f"{r['tokens_per_s']:.3g} tok/s")
        if "peak_mem_gib" in r:
            parts.append(f"{r['peak_mem_gib']:.2f} GiB")
        return " | ".join(parts)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


HEALTH_KEYS = ("d_acc_real", "d_acc_fake", "logit_gap")
PERF_KEYS = ("tflops_per_gpu", "mfu", "peak_tflops", "tokens_per_s", "peak_mem_gib", "step_time_s")


def _tag(key: str) -> str:
    """TensorBoard tag: ``Loss/``, ``Health/`` (D's accuracies, logit gap, gradient norms),
    ``Perf/`` (TFLOP/s, MFU, tokens/s, memory, step time), ``D/`` (mean logits), ``Train/``
    (the rest)."""
    if key in HEALTH_KEYS or key.startswith("grad_norm"):
        return f"Health/{key}"
    if key in PERF_KEYS:
        return f"Perf/{key}"
    if key.startswith("loss"):
        return f"Loss/{key}"
    if key.startswith("d_"):
        return f"D/{key}"
    return f"Train/{key}"
