"""Run the training stages under the CPU stand-in for a GPU (megatron_apt/testing/devices.py).

    python tests/distributed/gpu_paths_worker.py SCENARIO [SCENARIO ...]

One process (gloo, a world of one). Per scenario: a Trainer built under ``LogicalDevices``
(its device is ``cuda:0``, tensors stored on the CPU), one warm-up update, two updates counted
with ``HostSyncCounter``, then ``train()`` to the end with a log line per update, a checkpoint
and the export. Prints ``GPU-PATHS {json}`` per scenario: the error a GPU run would raise (or
null), the project code's host syncs per update, DeepSpeed's, blocking host-to-device copies,
the collectives checked.
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megatron_apt.config.recipes import get_recipe  # noqa: E402
from megatron_apt.testing.devices import CHECKED, DeviceMixError, LogicalDevices  # noqa: E402
from megatron_apt.testing.host_sync import HostSyncCounter  # noqa: E402

SCENARIOS = {
    "apt-zero0-fp32": ("tiny-apt", dict(zero_stage=0, bf16=False)),
    "apt-zero2-bf16": ("tiny-apt", dict(zero_stage=2, bf16=True)),
    "consistency-zero3-bf16": ("tiny-consistency", dict(zero_stage=3, bf16=True)),
    "diffusion-zero1-bf16-cfg": ("tiny-diffusion", dict(zero_stage=1, bf16=True, cond_dropout=0.5)),
    # the gradient norms made on the host, as before issue 29: the first log step must fail
    "control-host-grad-norms": ("tiny-apt", dict(zero_stage=0, bf16=False)),
}
COUNTED = 2  # updates counted after the warm-up


def project(where: str) -> bool:
    return "/megatron_apt/" in where


def run(name: str) -> dict:
    from megatron_apt.engine.trainer import Trainer

    recipe, over = SCENARIOS[name]
    save = tempfile.mkdtemp(prefix=f"gpu-paths-{name}-")
    cfg = get_recipe(recipe).replace(train_iters=COUNTED + 2, save=save, save_interval=0, **over)
    out: dict = {"scenario": name, "error": None, "train_iters": cfg.train_iters}
    control = name.startswith("control")  # its old code lives here: check this module too
    with LogicalDevices(checked=CHECKED + (("__main__",) if control else ())) as dev:
        try:
            trainer = Trainer(cfg)
            out["device"] = str(trainer.device)
            dev.host_source(trainer.stream, "next")  # a loader hands host tensors
            if control:
                trainer._pop_grad_norms = lambda: _host_grad_norms(trainer)
                trainer._log = lambda metrics, updates: _old_log(trainer, metrics)
            trainer.run_update()  # warm-up: first-call work
            copies = len(dev.blocking_copies)
            with HostSyncCounter(counts=dev.on_device) as syncs:
                for _ in range(COUNTED):
                    trainer.run_update()
            ours = [e for e in syncs.events if project(e.where)]
            out["syncs_per_update"] = len(ours) / COUNTED
            out["deepspeed_syncs_per_update"] = (syncs.count - len(ours)) / COUNTED
            out["sync_sites"] = sorted({f"{e.op} at {e.where}" for e in ours})
            out["blocking_copies_per_update"] = (len(dev.blocking_copies) - copies) / COUNTED
            out["copy_sites"] = sorted(set(dev.blocking_copies[copies:]))
            trainer.train()  # log steps, the final checkpoint and the export
            out["step"] = trainer.step
            out["exported"] = sorted(p.name for p in Path(save).glob("*.safetensors"))
            out["collectives"] = len(dev.collectives)
            out["set_device"] = [str(d) for d in dev.set_devices]
        except DeviceMixError as e:
            out["error"] = str(e)
            out["traceback"] = traceback.format_exc()[-3000:]
    return out


def generate(name: str) -> dict:
    """``tools/generate.py --device cuda`` (one step, then 3 CFG diffusion steps with a negative
    prompt, through the VAE to PNGs) on tiny random assets, under the harness with
    ``torch.cuda.is_available()`` true for the tool."""
    import importlib.util

    from megatron_apt.checkpoint.io import save_model_file
    from megatron_apt.models import MMDiT
    from megatron_apt.models.mmdit import get_preset
    from megatron_apt.testing import randomize_parameters
    from megatron_apt.text import build_tiny_text_encoder
    from megatron_apt.vae import build_tiny_vae

    root = Path(tempfile.mkdtemp(prefix="gpu-paths-generate-"))
    model = MMDiT(get_preset("tiny"))
    randomize_parameters(model, seed=3)
    ckpt = save_model_file(root / "g.safetensors", model.state_dict(), model.cfg, "generator")
    t5, vae = build_tiny_text_encoder(root / "t5"), build_tiny_vae(root / "vae", "image")
    spec = importlib.util.spec_from_file_location("generate_tool", ROOT / "tools/generate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    base = ["--checkpoint", ckpt, "--text-encoder", t5, "--vae", vae, "--device", "cuda"]
    base += ["--max-text-length", "16", "--height", "16", "--width", "16", "--dtype", "fp32"]
    base += ["--prompt", "a red circle", "--prompt", "a blue square moving left"]
    runs = {
        "one-step": [],
        "cfg": ["--mode", "diffusion", "--steps", "3", "--guidance-scale", "4"],
    }
    out: dict = {"scenario": name, "error": None, "runs": {}}
    with LogicalDevices(cuda_available=True) as dev:
        for run_name, extra in runs.items():
            argv = [str(a) for a in [*base, *extra, "--output", root / run_name]]
            try:
                with HostSyncCounter(counts=dev.on_device) as syncs:
                    code = tool.main(argv)
            except DeviceMixError as e:
                out["error"] = str(e)
                out["traceback"] = traceback.format_exc()[-3000:]
                break
            summary = json.loads((root / run_name / "summary.json").read_text())
            ours = [e for e in syncs.events if project(e.where)]
            out["runs"][run_name] = {
                "code": code,
                "device": summary["device"],
                "pngs": len(list((root / run_name).glob("*.png"))),
                "syncs": len(ours),
                "sync_sites": sorted({f"{e.op} at {e.where}" for e in ours}),
            }
    return out


def _host_grad_norms(trainer) -> dict:
    """``Trainer._pop_grad_norms`` as it was: the means built on the host."""
    import torch

    out = {k: torch.tensor([float(x) for x in v]).mean() for k, v in trainer.grad_norms.items()}
    trainer.grad_norms = {}
    return out


def _old_log(trainer, metrics: dict) -> dict:
    """The log step's reduction as it was (engine/trainer.py before issue 29): the metrics
    stacked as they come, then moved to the device."""
    import torch

    keys = list(metrics)  # throughput values were host tensors (engine/throughput.py raw)
    old = {
        k: v if torch.is_tensor(v) else torch.tensor(v, dtype=torch.float64)
        for k, v in metrics.items()
    }
    t = torch.stack([old[k].detach().double().reshape(()) for k in keys])
    t = t.to(trainer.device)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def main(names: list[str]) -> int:
    for name in names:
        result = generate(name) if name == "generate" else run(name)
        print("GPU-PATHS " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
