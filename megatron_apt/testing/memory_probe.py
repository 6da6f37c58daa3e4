"""Measure the real memory of single-process training steps of a model of any family (MMDiT,
Wan; run as a fresh subprocess).

    python -m megatron_apt.testing.memory_probe '{"preset": "demo", "height": 32, ...}'
    python -m megatron_apt.testing.memory_probe '{"probe": "export", "preset": "demo", ...}'

The second form measures the trainer's end-of-run export instead (:func:`export_main`).

(tests call :func:`run_memory_probe`, which starts it with the environment described below).

Prints one JSON line. What it measures (process resident set size, RSS, from /proc):

* ``base``: RSS after importing torch, one warm-up step of a throwaway tiny model (lazy
  imports, runtime initialization) and making the inputs, before the model exists;
* ``static``: RSS once the weights, the gradients (kept and zeroed in place as DeepSpeed's
  buffers are), RMSprop's square averages and the fp32 EMA copy exist, before any forward,
  minus ``base``;
* ``held_after_forward``: RSS right after the forward of the measured (second) step minus
  RSS before it: what the autograd graph keeps for the backward (plus the output);
* ``peak``: the highest RSS during the measured step (forward, backward, optimizer step, EMA
  update) minus ``base``; the kernel's high-water mark is reset right before the step
  (``/proc/self/clear_refs``; where that is refused, ``ru_maxrss``, which the step's peak
  exceeds as long as nothing before it went higher).

The caller starts it with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc serves every tensor
above 64 KiB with its own mmap and returns it to the OS when it is freed: RSS then follows
the live tensor bytes instead of the allocator's free lists. One thread (``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys

import torch


def run_memory_probe(spec: dict, timeout: int = 300) -> dict:
    """Run this probe on ``spec`` in a fresh process (one thread, every tensor above 64 KiB
    in its own mmap) and return its JSON result; AssertionError with its output on failure."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="0",
        PYTHONPATH=str(root),
    )
    proc = subprocess.run(
        [sys.executable, __file__, json.dumps(spec)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY-PROBE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("MEMORY-PROBE "))


def saved_storage_bytes(model: torch.nn.Module, inputs: dict) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for the backward of
    ``model(**inputs)`` (what an activation inventory must account for; in-process)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)
    del out
    return sum(seen.values())


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def high_water(resettable: bool) -> int:
    if resettable:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


WARM_UP_PRESETS = {"mmdit": "tiny", "wan": "wan-debug"}


def warm_up_runtime(model_cls, cfg, make_inputs) -> None:
    """One training step of a tiny model, so that the lazy imports and kernel/runtime
    initializations of a first step (about 18 MB of RSS) happen before the baseline."""
    model = model_cls(cfg)
    model.set_recompute("1")
    model(**make_inputs(cfg)).square().mean().backward()
    torch.optim.RMSprop(model.parameters(), foreach=False).step()
    del model
    gc.collect()


def main(spec: dict) -> dict:
    from megatron_apt.models import MMDiT
    from megatron_apt.models.families import family_of, get_preset
    from megatron_apt.testing import dummy_inputs, randomize_parameters

    torch.set_num_threads(1)
    cfg = get_preset(spec["preset"], **spec.get("overrides", {}))  # a preset of any family
    family = family_of(cfg)
    warm_up_runtime(MMDiT, get_preset("tiny"), dummy_inputs)
    if family.name != "mmdit":  # the family's own code paths too
        warm_up_runtime(family.build, get_preset(WARM_UP_PRESETS[family.name]), dummy_inputs)
    torch.manual_seed(0)
    inputs = dummy_inputs(
        cfg,
        batch=spec["batch"],
        frames=spec.get("frames", 1),
        height=spec["height"],
        width=spec["width"],
        text_len=spec["text_len"],
        masked=False,
    )
    target = torch.randn(inputs["latents"].shape, generator=torch.Generator().manual_seed(1))
    gc.collect()
    base = rss()
    model = family.build(cfg)
    model.set_recompute(spec.get("recompute", "none"))
    randomize_parameters(model, seed=0)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params] if spec.get("ema", True) else []
    opt = torch.optim.RMSprop(params, lr=1e-6, alpha=0.9, eps=1e-8, foreach=False)
    marks = {}

    def step() -> float:
        r0 = rss()
        v = model(**inputs)
        marks["held_after_forward"] = rss() - r0
        loss = (v - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 0.01)
        return loss.item()

    # the static state, measured before any forward: the first training step leaves ~4 MB of
    # heap residue (small autograd allocations, Python objects; ~1 MB more per further step)
    # that is no tensor of the plan's and would count as static otherwise
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # creates RMSprop's square averages; zero gradients leave the weights as they are
    gc.collect()
    static = rss() - base
    step()  # warm-up: the first step's lazy allocations happen before the measured one
    gc.collect()
    resettable = reset_peak()
    before = rss()
    loss = step()
    peak = high_water(resettable) - base
    return {
        "base": base,
        "static": static,
        "before_step": before - base,
        "held_after_forward": marks["held_after_forward"],
        "peak": peak,
        "hwm_reset": resettable,
        "loss": loss,
        "params": sum(p.numel() for p in params),
    }


def export_main(spec: dict) -> dict:
    """Peak RSS of the APT trainer's end-of-run export (one process, gloo, the given ZeRO
    stage and precision), above the RSS just before it, with the sizes that bound it: the
    generator's fp32 bytes and its largest tensor. ``"legacy": true`` measures instead what
    gathering every full tensor at once costs (the full fp32 generator and its EMA held
    together, as the export did before it streamed): the control that the probe sees a
    model-sized gather."""
    import tempfile

    os.environ.setdefault("MEGATRON_APT_BACKEND", "gloo")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from megatron_apt.config.recipes import get_recipe
    from megatron_apt.engine.trainer import Trainer
    from megatron_apt.models.mmdit import get_preset

    torch.set_num_threads(1)
    out_dir = tempfile.mkdtemp(prefix="export-probe-")
    cfg = get_recipe("tiny-apt").replace(
        model=get_preset(spec["preset"], **spec.get("overrides", {})),
        zero_stage=spec.get("zero_stage", 0),
        bf16=spec.get("bf16", False),
        save=out_dir,
        train_iters=1,
    )
    trainer = Trainer(cfg)
    g = [p for p in trainer.engines["generator"].module.parameters()]
    gc.collect()
    resettable = reset_peak()
    base = rss()
    if spec.get("legacy"):
        from megatron_apt.engine.master_weights import MasterWeights

        held = [MasterWeights(trainer.engines["generator"], trainer.ps).full_state()]
        held.append(trainer.emas["generator"].tp_local_state_dict())
    else:
        trainer.export(__import__("pathlib").Path(out_dir))
    peak = high_water(resettable) - base
    return {
        "peak": peak,
        "hwm_reset": resettable,
        "generator_bytes": sum(p.numel() for p in g) * 4,
        "largest_tensor_bytes": max(p.numel() for p in g) * 4,
        "files": sorted(f for f in os.listdir(out_dir) if f.endswith(".safetensors")),
    }


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    run = export_main if spec.get("probe") == "export" else main
    print("MEMORY-PROBE " + json.dumps(run(spec)), flush=True)
