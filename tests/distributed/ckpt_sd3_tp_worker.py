"""Worker for test_checkpoint_export: rank 0 saves a tiny random diffusers SD3 transformer and
imports it as a TP=2 sharded checkpoint; then every rank loads it at TP=2 with sequence
parallel (its own shard file, and cut from the diffusers directory) and compares the velocity
with diffusers'; 2 processes under torchrun."""

import argparse
import json

import torch
import torch.distributed as dist

from megatron_apt.checkpoint import convert, load_mmdit
from megatron_apt.parallel import initialize_parallel
from megatron_apt.testing.diffusers_ref import tiny_sd3_transformer


def tiny_sd3():
    """diffusers' tester-size SD3 transformer (RMS QK norm) with every weight randomized."""
    return tiny_sd3_transformer("rms_norm", randomize=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    from diffusers import SD3Transformer2DModel

    ps = initialize_parallel(tensor_parallel_size=2, sequence_parallel=True)
    sd3_dir, sharded = f"{a.dir}/transformer", f"{a.dir}/sd3-tp2"
    if dist.get_rank() == 0:
        tiny_sd3().save_pretrained(sd3_dir)
        convert.import_diffusers(sd3_dir, sharded, tp_size=2)
    dist.barrier()
    ref = SD3Transformer2DModel.from_pretrained(sd3_dir).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)  # 16 visual tokens: divisible by TP
    text, pooled = torch.randn(2, 7, 32, generator=g), torch.randn(2, 24, generator=g)
    sigma = torch.tensor([0.25, 0.9])
    with torch.no_grad():
        v_ref = ref(
            hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
            timestep=sigma * 1000,
        ).sample  # fmt: skip
    results = {"tp_size": ps.tp_size, "sequence_parallel": ps.sequence_parallel}
    for name, path in (("sharded", sharded), ("diffusers", sd3_dir)):
        model = load_mmdit(path, ps=ps)
        qkv = model.blocks[0].visual.qkv.weight
        with torch.no_grad():
            v = model(x[:, :, None], sigma, text, None, pooled)[:, :, 0]
        results[name] = {
            "diff": (v - v_ref).abs().max().item(),
            "max": v_ref.abs().max().item(),
            "local_qkv_rows": qkv.shape[0],
        }
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    print("CKPT-SD3-TP-DONE", flush=True)


if __name__ == "__main__":
    main()
