"""The MMDiT on one process: shapes, adaLN-Zero, masking, positions, errors, presets."""

import pytest
import torch

from megatron_apt.models import MMDiT
from megatron_apt.models.embeddings import (
    apply_rope,
    patchify,
    rope_3d,
    rope_rotation,
    unpatchify,
)
from megatron_apt.models.mmdit import PRESETS, count_parameters, get_preset
from megatron_apt.parallel import ParallelState
from megatron_apt.parallel.tensor_parallel import scatter_to_sequence_parallel
from megatron_apt.testing import dummy_inputs, randomize_parameters


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return MMDiT(get_preset("tiny"))


@pytest.mark.parametrize("frames", [1, 4])
def test_forward_shapes_and_return_layers(frames):
    tiny = MMDiT(get_preset("tiny"))
    randomize_parameters(tiny, seed=0)
    inputs = dummy_inputs(tiny.cfg, frames=frames, height=6, width=10)
    v, feats = tiny(**inputs, return_layers=(2, 1))
    assert v.shape == inputs["latents"].shape
    n_tokens = frames * 3 * 5
    assert [f.shape for f in feats] == [(2, n_tokens, 64)] * 2
    assert not torch.equal(feats[0], feats[1])  # layer 2 then layer 1, as asked


def test_adaln_zero_blocks_are_identity_at_init(tiny):
    """At initialization every block returns both streams unchanged; the last block's text
    stream is context-pre-only (no output)."""
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(12, 2, 64, generator=g), torch.randn(5, 2, 64, generator=g)
    cond = torch.randn(2, 64, generator=g)
    rope = rope_rotation(*rope_3d((1, 3, 4), tiny.cfg.rope_axes_dim))
    for i, block in enumerate(tiny.blocks):
        x_out, c_out = block(x, c, cond, rope)
        assert torch.equal(x_out, x)
        if i == len(tiny.blocks) - 1:
            assert block.context_pre_only and c_out is None
        else:
            assert torch.equal(c_out, c)
    # and the whole model predicts zero velocity until trained (zero-initialized output layer)
    assert torch.count_nonzero(tiny(**dummy_inputs(tiny.cfg))) == 0


def test_blocks_not_identity_after_randomizing():
    m = MMDiT(get_preset("tiny"))
    randomize_parameters(m, seed=0)
    x, c, cond = torch.randn(12, 2, 64), torch.randn(5, 2, 64), torch.randn(2, 64)
    x_out, c_out = m.blocks[0](x, c, cond, rope_rotation(*rope_3d((1, 3, 4), m.cfg.rope_axes_dim)))
    assert (x_out - x).abs().max() > 1e-3 and (c_out - c).abs().max() > 1e-3


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd3", "mid"])
def test_analytic_parameter_count(preset):
    cfg = get_preset(preset)
    model = MMDiT(cfg)
    assert count_parameters(cfg).total == sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == count_parameters(cfg).total


def test_paper_preset_is_about_8b():
    cfg = get_preset("mmdit-8b")
    assert cfg.num_layers == 36
    assert 7.5e9 < count_parameters(cfg).total < 9.0e9


def test_masked_text_tokens_do_not_change_the_output():
    m = MMDiT(get_preset("tiny"))
    randomize_parameters(m, seed=0)
    inputs = dummy_inputs(m.cfg, text_len=6)
    v = m(**inputs)
    text2 = inputs["text"].clone()
    text2[~inputs["text_mask"]] = 100.0  # garbage in the masked positions
    v2 = m(**{**inputs, "text": text2})
    torch.testing.assert_close(v, v2, rtol=0, atol=1e-6)
    unmasked = inputs["text"].clone()
    unmasked[0, 0] += 1.0
    assert (m(**{**inputs, "text": unmasked}) - v).abs().max() > 1e-4


def test_patchify_roundtrip_and_conv_equivalence():
    x = torch.randn(2, 3, 4, 6, 8)
    patch = (2, 2, 2)
    tokens = patchify(x, patch)
    assert tokens.shape == (2, 2 * 3 * 4, 3 * 8)
    # feature order (C, pt, ph, pw) == a Conv3d with the flattened weight
    w = torch.randn(5, 3, *patch)
    conv = torch.nn.functional.conv3d(x, w, stride=patch).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens @ w.reshape(5, -1).T, conv, rtol=1e-5, atol=1e-5)
    # unpatchify takes (pt, ph, pw, C) features
    back = unpatchify(
        tokens.reshape(2, 24, 3, 8).permute(0, 1, 3, 2).reshape(2, 24, 24), patch, (2, 3, 4), 3
    )
    torch.testing.assert_close(back, x)


def test_rope_depends_on_relative_position_only():
    cos, sin = rope_3d((6, 1, 1), (8, 4, 4))
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    rot = lambda t, i: apply_rope(t, cos[i : i + 1], sin[i : i + 1])  # noqa: E731
    dots = [(rot(q, i + 2) * rot(k, i)).sum().item() for i in range(4)]
    assert max(dots) - min(dots) < 1e-5
    assert abs((rot(q, 3) * rot(k, 0)).sum().item() - dots[0]) > 1e-4


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.update(latents=d["latents"][:, :3]), "3 channels"),
        (lambda d: d.update(latents=d["latents"][..., :7]), "W=7 is not divisible"),
        (lambda d: d.update(latents=d["latents"][:, :, 0]), r"\[B, C, T, H, W\]"),
        (lambda d: d.update(text=d["text"][..., :31]), "text_dim=32"),
        (lambda d: d.update(timesteps=d["timesteps"][:1]), "timesteps must be"),
        (lambda d: d.update(timesteps=d["timesteps"] * 1000), r"must lie in \[0, 1\]"),
        (lambda d: d.update(text_mask=d["text_mask"][:, :2]), "text_mask must be"),
        (lambda d: d.update(pooled_text=torch.zeros(2, 4)), "pooled_text is given"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny, change, match):
    inputs = dummy_inputs(tiny.cfg)
    change(inputs)
    with pytest.raises(ValueError, match=match):
        tiny(**inputs)


def test_return_layers_out_of_range(tiny):
    with pytest.raises(ValueError, match="outside 1..2"):
        tiny(**dummy_inputs(tiny.cfg), return_layers=(3,))


def test_sequence_parallel_needs_divisible_tokens():
    ps = ParallelState(
        tp_group=None, dp_group=None, cp_group=None, tp_size=2, sequence_parallel=True
    )
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size 2"):
        scatter_to_sequence_parallel(torch.zeros(7, 1, 4), ps)


def test_bad_configs():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        get_preset("tiny", num_heads=5)
    with pytest.raises(ValueError, match="rope_axes_dim"):
        get_preset("tiny", rope_axes_dim=(4, 4, 4))
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("nope")
    assert set(PRESETS) >= {"tiny", "mid", "mmdit-8b", "sd3-medium"}


def test_config_dict_roundtrip():
    cfg = get_preset("tiny-sd3")
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown MMDiTConfig fields"):
        type(cfg).from_dict({**cfg.to_dict(), "hiden_size": 3})


def test_bf16_forward_close_to_fp32():
    m = MMDiT(get_preset("tiny"))
    randomize_parameters(m, seed=0)
    inputs = dummy_inputs(m.cfg)
    ref = m(**inputs)
    mb = MMDiT(get_preset("tiny"), params_dtype=torch.bfloat16)
    mb.load_state_dict(m.state_dict())
    out = mb(
        **{
            k: (v.bfloat16() if v is not None and v.is_floating_point() else v)
            for k, v in inputs.items()
        }
    )
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_gpu_specs_are_lazy_and_refuse_without_cuda():
    from megatron_apt.models import get_spec

    assert get_spec("local").name == "local"
    assert get_spec("auto").name in ("local", "te")
    with pytest.raises(ValueError, match="unknown layer spec"):
        get_spec("te-fp4")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            get_spec("te-fp8")


def test_spec_selected_by_name():
    m = MMDiT(get_preset("tiny"), spec="local")
    assert m.spec.name == "local"
    with pytest.raises(ValueError, match="unknown layer spec 'tee'"):
        MMDiT(get_preset("tiny"), spec="tee")
