"""The Wan family computes what diffusers' ``WanTransformer3DModel`` computes, and its weight
mapping is exact both ways (tiny, random, offline, CPU fp32): the claim behind importing and
exporting Wan2.1 weights (issue 31, phase 1)."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from megatron_apt.models.build_options import model_build
from megatron_apt.models.wan import (
    WanDiT,
    count_parameters,
    diffusers_to_wan,
    get_wan_preset,
    wan_config_from_diffusers,
    wan_config_to_diffusers,
    wan_to_diffusers,
)
from megatron_apt.parallel.tensor_parallel import tp_partition_dim
from megatron_apt.testing.devices import LogicalDevices
from megatron_apt.testing.host_sync import HostSyncCounter
from megatron_apt.testing.wan_ref import tiny_wan_transformer, wan_transformer

pytest.importorskip("diffusers")

ATOL = RTOL = 1e-5


def pair(**overrides):
    """A random diffusers reference of the debug preset and our model loaded from it."""
    cfg = get_wan_preset("wan-debug", **overrides)
    ref = tiny_wan_transformer(cfg)
    ours = WanDiT(cfg)
    ours.load_state_dict(diffusers_to_wan(ref.state_dict(), cfg))
    return cfg, ref, ours


def inputs(batch=2, frames=3, height=10, width=6, text_len=7, seed=1):
    """Latents with an odd token grid (3 x 5 x 3 after (1, 2, 2) patches), text, t in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, height, width, generator=g)
    text = torch.randn(batch, text_len, 32, generator=g)
    t = torch.rand(batch, generator=g)
    return x, t, text


@pytest.mark.parametrize("cross_attn_norm", [True, False])
def test_velocity_matches_diffusers(cross_attn_norm):
    _, ref, ours = pair(cross_attn_norm=cross_attn_norm)
    x, t, text = inputs()
    with torch.no_grad():
        v_ref = ref(hidden_states=x, timestep=t * 1000, encoder_hidden_states=text).sample
        v = ours(x, t, text)
    assert v_ref.abs().max() > 0.5
    torch.testing.assert_close(v, v_ref, rtol=RTOL, atol=ATOL)


def test_temporal_patch_and_single_frame():
    """A (2, 2, 2) patch over 4 frames, and one frame (an image): token order and unpatchify."""
    for patch, frames in (((2, 2, 2), 4), ((1, 2, 2), 1)):
        _, ref, ours = pair(patch_size=patch)
        x, t, text = inputs(frames=frames, height=6, width=10)
        with torch.no_grad():
            v_ref = ref(hidden_states=x, timestep=t * 1000, encoder_hidden_states=text).sample
            torch.testing.assert_close(ours(x, t, text), v_ref, rtol=RTOL, atol=ATOL)


def test_gradients_match_diffusers():
    """Every parameter's gradient (mapped like the weights) and the input's gradient."""
    cfg, ref, ours = pair()
    x, t, text = inputs()
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    (
        ref(hidden_states=x_ref, timestep=t * 1000, encoder_hidden_states=text).sample * w
    ).sum().backward()
    (ours(x_ours, t, text) * w).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=RTOL, atol=ATOL)
    grads_ref = diffusers_to_wan({k: p.grad for k, p in ref.named_parameters()}, cfg)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[name], rtol=1e-4, atol=ATOL, msg=name)


def test_padded_text_masked_equals_the_prompt_alone():
    """With ``text_mask`` a sample's padded tokens are no keys: its velocity is diffusers' on
    its real tokens alone. Without a mask the zero padding is attended to, as diffusers (and
    the Wan pipeline, which zero-pads umT5 to 512 tokens) does."""
    _, ref, ours = pair()
    x, t, text = inputs(text_len=7)
    lengths = [7, 3]
    text[1, 3:] = 0  # the pipeline's zero padding
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        v_masked = ours(x, t, text, text_mask=mask)
        v_unmasked = ours(x, t, text)
        for i, n in enumerate(lengths):
            alone = ref(
                hidden_states=x[i : i + 1], timestep=t[i : i + 1] * 1000,
                encoder_hidden_states=text[i : i + 1, :n],
            ).sample  # fmt: skip
            torch.testing.assert_close(v_masked[i : i + 1], alone, rtol=RTOL, atol=ATOL)
        padded = ref(hidden_states=x, timestep=t * 1000, encoder_hidden_states=text).sample
    torch.testing.assert_close(v_unmasked, padded, rtol=RTOL, atol=ATOL)
    assert (v_masked[1] - v_unmasked[1]).abs().max() > 1e-3  # the mask does something


def test_text_without_real_tokens_is_refused():
    _, _, ours = pair()
    x, t, text = inputs()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"samples \[1\] have no real text token"):
        ours(x, t, text, text_mask=mask)


def test_impossible_context_parallel_splits_are_refused():
    """Context parallelism is built (CP=2 against CP=1: tests/distributed/
    test_context_parallel.py); heads that do not divide by TP x CP are refused at build, a
    visual token count that does not divide by the ranks at the embedding (before any
    collective: a state with cp_size=2 and no group is enough here)."""
    import dataclasses

    from megatron_apt.parallel.state import single_process_state

    cfg = get_wan_preset("wan-debug")  # 4 heads
    cp8 = dataclasses.replace(single_process_state(), cp_size=8)
    with pytest.raises(ValueError, match=r"num_heads=4 is not divisible by tensor_parallel_size=1"
                       r" x context_parallel_size=8"):  # fmt: skip
        WanDiT(cfg, cp8)
    cp2 = dataclasses.replace(single_process_state(), cp_size=2)
    model = WanDiT(cfg, cp2)
    x, t, text = inputs(frames=3, height=10, width=6)  # 3 x 5 x 3 = 45 tokens
    message = r"45 visual tokens \(grid \(3, 5, 3\)\) x batch 2 do not split into 2 ranks"
    with pytest.raises(ValueError, match=message + r" = context_parallel_size 2"):
        model(x, t, text)


def test_export_is_bitwise_and_round_trips():
    cfg, ref, ours = pair()
    original = ref.state_dict()
    exported = wan_to_diffusers(ours.state_dict(), cfg)
    assert set(exported) == set(original)
    for k, v in original.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k
    ours_sd = {k: v for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}
    again = diffusers_to_wan(exported, cfg)
    assert set(again) == set(ours_sd)
    assert all(torch.equal(again[k], ours_sd[k]) for k in ours_sd)
    # and the exported weights load strictly into a fresh diffusers model
    fresh = wan_transformer(cfg)
    fresh.load_state_dict(exported, strict=True)


def test_fused_qkv_is_per_head():
    """Rows of head j of the fused QKV are (q_j, k_j, v_j): a contiguous TP split keeps heads."""
    cfg, ref, ours = pair()
    hd = cfg.head_dim
    qkv = ours.blocks[0].self_attn.qkv.weight
    attn = ref.blocks[0].attn1
    for j in range(cfg.num_heads):
        rows = qkv[3 * hd * j : 3 * hd * (j + 1)]
        for part, lin in zip(rows.split(hd), (attn.to_q, attn.to_k, attn.to_v)):
            assert torch.equal(part, lin.weight[j * hd : (j + 1) * hd])


def test_tensor_parallel_metadata():
    """What a TP split reads (megatron's tags): the fused linears and the across-heads q/k
    RMSNorm weights split with the heads (dim 0), the output linears along their input
    (dim 1); embeddings, time projection, tables and LayerNorms replicated."""
    _, _, ours = pair()
    dims = {n: tp_partition_dim(p) for n, p in ours.named_parameters()}
    split0 = {n for n, d in dims.items() if d == 0}
    split1 = {n for n, d in dims.items() if d == 1}
    assert "blocks.0.self_attn.q_norm.weight" in split0
    assert "blocks.1.cross_attn.k_norm.weight" in split0
    assert "blocks.0.cross_attn.kv.weight" in split0 and "blocks.0.fc1.bias" in split0
    assert split1 == {
        f"blocks.{i}.{m}.weight"
        for i in range(2)
        for m in ("self_attn.proj", "cross_attn.proj", "fc2")
    }
    assert all(not n.startswith(("time_", "text_", "patch_", "final_")) for n in split0)


@pytest.mark.parametrize("direction", ["import", "export"])
def test_missing_unexpected_and_misshapen_keys_are_named(direction):
    cfg, ref, ours = pair()
    if direction == "import":
        sd, convert = dict(ref.state_dict()), diffusers_to_wan
        key, what = "blocks.1.attn2.to_k.weight", "diffusers WanTransformer3DModel state dict"
    else:
        sd, convert = dict(ours.state_dict()), wan_to_diffusers
        key, what = "blocks.1.cross_attn.kv.weight", "Wan state dict"
    missing = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(ValueError, match=rf"{what} does not fit .*missing keys \['{key}'\]"):
        convert(missing, cfg)
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.9.bogus'\]"):
        convert({**sd, "blocks.9.bogus": torch.zeros(1)}, cfg)
    wrong = {**sd, key: sd[key][:, :-1]}
    shape, good = tuple(wrong[key].shape), tuple(sd[key].shape)
    message = f"{key} has shape {shape}, the config needs {good}"
    with pytest.raises(ValueError, match=re.escape(message)):
        convert(wrong, cfg)


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan-debug"])
def test_parameter_counts_match_diffusers(name):
    """Our analytic count, our model and diffusers' model of the same config, all built on the
    meta device (nothing allocated): 1,418,996,800 and 14,288,491,584 for the presets."""
    cfg = get_wan_preset(name)
    with torch.device("meta"), model_build(use_cpu_initialization=True, initialize=False):
        ours = WanDiT(cfg)
    with torch.device("meta"):
        ref = wan_transformer(cfg)
    n_ref = sum(p.numel() for p in ref.parameters())
    assert count_parameters(cfg) == ours.num_parameters() == n_ref
    expected = {"wan2.1-t2v-1.3b": 1_418_996_800, "wan2.1-t2v-14b": 14_288_491_584}
    assert n_ref == expected.get(name, n_ref)


def test_public_1_3b_config_is_the_preset():
    """Wan-AI/Wan2.1-T2V-1.3B-Diffusers ``transformer/config.json`` (diffusers 0.33.0.dev0)."""
    public = {
        "_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0.dev0",
        "added_kv_proj_dim": None, "attention_head_dim": 128, "cross_attn_norm": True,
        "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "image_dim": None, "in_channels": 16,
        "num_attention_heads": 12, "num_layers": 30, "out_channels": 16,
        "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
        "text_dim": 4096,
    }  # fmt: skip
    assert wan_config_from_diffusers(public) == get_wan_preset("wan2.1-t2v-1.3b")
    assert wan_config_from_diffusers({}) == get_wan_preset("wan2.1-t2v-14b")  # the defaults
    for name in ("wan-debug", "wan2.1-t2v-14b"):
        cfg = get_wan_preset(name)
        assert wan_config_from_diffusers(wan_config_to_diffusers(cfg)) == cfg
    with pytest.raises(ValueError, match="image-to-video fields {'image_dim': 1280}"):
        wan_config_from_diffusers({**public, "image_dim": 1280})
    with pytest.raises(ValueError, match=r"unknown WanTransformer3DModel fields \['bogus'\]"):
        wan_config_from_diffusers({**public, "bogus": 1})


def test_recompute_changes_nothing():
    _, _, ours = pair()
    x, t, text = inputs()
    outs = []
    for layers in ("none", "all"):
        ours.zero_grad()
        ours.set_recompute(layers)
        v = ours(x, t, text)
        v.square().sum().backward()
        outs.append((v.detach(), [p.grad.clone() for p in ours.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bf16_keeps_diffusers_fp32_modules():
    """params_dtype=bf16: time embedder, modulation tables and the cross-attention LayerNorm
    stay fp32 (diffusers' ``_keep_in_fp32_modules``, transformer_wan.py:549); the velocity is
    as close to fp32 as diffusers' own bf16 model (its fp32 modules kept as its loader keeps
    them: a name component in that list, model_loading_utils.py:238-240)."""
    cfg, ref, ours32 = pair()
    ours = WanDiT(cfg, params_dtype=torch.bfloat16)
    ours.load_state_dict(ours32.state_dict())
    fp32 = {n for n, p in ours.named_parameters() if p.dtype == torch.float32}
    keep = ("time_embed.", "final_scale_shift_table", ".scale_shift_table", ".cross_norm.")
    assert fp32 == {n for n, _ in ours.named_parameters() if any(k in n for k in keep)}
    assert len(fp32) == 4 + 1 + 2 * 3  # time embedder (4), final table, per block 3
    assert ours.blocks[0].fc1.weight.dtype == torch.bfloat16
    ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    for name, p in ref_bf16.named_parameters():
        if any(m in name.split(".") for m in ref._keep_in_fp32_modules):
            p.data = p.data.float()
    x, t, text = inputs()
    with torch.no_grad():
        v = ours(x.bfloat16(), t, text.bfloat16()).float()
        v32 = ref(hidden_states=x, timestep=t * 1000, encoder_hidden_states=text).sample
        v_ref = ref_bf16(
            hidden_states=x.bfloat16(), timestep=t * 1000, encoder_hidden_states=text.bfloat16()
        ).sample.float()
    err, err_ref = (v - v32).abs().max(), (v_ref - v32).abs().max()
    assert err <= 1.5 * err_ref and err < 0.02 * v32.abs().max(), (err, err_ref)
    assert (v - v_ref).abs().max() < 0.02 * v32.abs().max()


@pytest.mark.parametrize("masked", [True, False])
def test_no_host_sync_per_step_with_a_host_mask(masked):
    """The MMDiT's contract (models/inputs.py): weights and inputs on the (logical) GPU, the
    text mask on the host; after a warm-up call (the timestep range check) a forward and
    backward read no device value (text length 7 also exercises the padding path under
    LogicalDevices when masked)."""
    _, _, ours = pair()
    x, t, text = inputs(frames=2)
    mask = torch.arange(7)[None] < torch.tensor([7, 4])[:, None] if masked else None

    def step():
        ours.zero_grad(set_to_none=True)
        ours(x, t, text, text_mask=mask).square().mean().backward()

    with LogicalDevices() as dev:
        if mask is not None:
            dev.mark_host(mask)
        step()
        with HostSyncCounter(counts=dev.on_device) as syncs:
            step()
    assert not dev.blocking_copies, dev.blocking_copies
    assert syncs.count == 0, syncs.summary()
