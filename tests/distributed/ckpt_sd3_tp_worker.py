"""Worker for test_checkpoint_export: rank 0 saves a tiny random diffusers SD3 transformer and
a tiny random Wan2.1 transformer and imports each as a TP=2 sharded checkpoint; then every
rank loads them at TP=2 with sequence parallel (its own shard file, and cut from the diffusers
directory) and compares the velocity with diffusers'; 2 processes under torchrun."""

import argparse
import json

import torch
import torch.distributed as dist

from megatron_apt.checkpoint import convert, load_mmdit
from megatron_apt.models.wan import get_wan_preset
from megatron_apt.parallel import initialize_parallel
from megatron_apt.testing.diffusers_ref import tiny_sd3_transformer
from megatron_apt.testing.wan_ref import tiny_wan_transformer


def tiny_sd3():
    """diffusers' tester-size SD3 transformer (RMS QK norm) with every weight randomized."""
    return tiny_sd3_transformer("rms_norm", randomize=True)


def wan_cases(ps, root: str) -> dict:
    """The same for the Wan debug model (a pipeline root with transformer/, text of 7 tokens
    padded under SP and attended to as diffusers does: no mask)."""
    ref = tiny_wan_transformer(get_wan_preset("wan-debug"))  # same seed: same weights everywhere
    pipe, sharded = f"{root}/wan", f"{root}/wan-tp2"
    if dist.get_rank() == 0:
        ref.save_pretrained(f"{pipe}/transformer")
        convert.import_diffusers(pipe, sharded, tp_size=2)
    dist.barrier()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 2, 10, 6, generator=g)  # 2 x 5 x 3 = 30 visual tokens
    text, t = torch.randn(2, 7, 32, generator=g), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v_ref = ref(hidden_states=x, timestep=t * 1000, encoder_hidden_states=text).sample
    out = {}
    for name, path in (("wan-sharded", sharded), ("wan-diffusers", pipe)):
        model = load_mmdit(path, ps=ps)
        with torch.no_grad():
            v = model(x, t, text)
        out[name] = {
            "diff": (v - v_ref).abs().max().item(),
            "max": v_ref.abs().max().item(),
            "local_qkv_rows": model.blocks[0].self_attn.qkv.weight.shape[0],
        }
    return out


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
    results.update(wan_cases(ps, a.dir))
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    print("CKPT-SD3-TP-DONE", flush=True)


if __name__ == "__main__":
    main()
