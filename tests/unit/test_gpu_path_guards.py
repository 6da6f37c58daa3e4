"""What the GPU kernels accept, checked on CPU (issue 14, items 5, 6, 7):

* FP8 (Transformer Engine ``assert_dim_for_fp8_exec``: GEMM rows % 8, widths % 16): the config
  names a layout whose per-rank visual rows do not align (the paper's video recipe at TP 4 + SP:
  46 800 / 4 = 11 700 rows); text of any length (77, 226 T5 tokens) is padded with masked tokens
  to the alignment, which leaves the output unchanged; an FP8 model refuses to generate (its
  scales are only updated in training);
* flash-attn takes fp16/bf16 only: a flash spec without --bf16 is refused in the config, and the
  kernel wrapper names the dtype.

The FP8 model here is the ``local`` kernels with the spec's ``fp8`` flag set: on CPU there is no
TE, but the padding and the checks are the model's own, before any kernel.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_apt.config.recipes import get_recipe
from megatron_apt.config.training import validate
from megatron_apt.inference.pipeline import GenerationPipeline
from megatron_apt.models import MMDiT
from megatron_apt.models.mmdit import get_preset
from megatron_apt.models.specs import check_flash_dtype, local_spec
from megatron_apt.testing import dummy_inputs, randomize_parameters


def fp8_like_spec():
    return dataclasses.replace(local_spec(), name="local-fp8-flag", fp8=True)


def test_fp8_config_names_misaligned_rows():
    video = get_recipe("mmdit-8b-video-apt")  # TP 4 + SP, 13x90x160 latents
    with pytest.raises(ValueError, match=r"46800 visual tokens.*4 ranks.*11700 GEMM rows"):
        validate(dataclasses.replace(video, layer_spec="te-fp8"))
    validate(dataclasses.replace(video, layer_spec="te-fp8", micro_batch_size=2))  # 23 400 rows
    validate(dataclasses.replace(get_recipe("mmdit-8b-image-apt"), layer_spec="te-fp8"))
    validate(dataclasses.replace(video, layer_spec="te"))  # BF16: no alignment needed


def test_flash_needs_bf16():
    tiny = get_recipe("tiny-apt")
    with pytest.raises(ValueError, match="flash-attn, which takes fp16/bf16 only: add --bf16"):
        validate(dataclasses.replace(tiny, layer_spec="te-flash", bf16=False))
    validate(dataclasses.replace(tiny, layer_spec="te-flash", bf16=True))
    with pytest.raises(TypeError, match=r"fp16/bf16 only, the model computes in torch.float32"):
        check_flash_dtype(torch.float32)
    check_flash_dtype(torch.bfloat16)


@pytest.mark.parametrize("text_len", [5, 13])
def test_fp8_pads_text_to_the_alignment_without_changing_the_output(text_len):
    cfg = get_preset("tiny", num_layers=2)
    ref, fp8 = MMDiT(cfg), MMDiT(cfg, spec=fp8_like_spec())
    randomize_parameters(ref, seed=0)
    fp8.load_state_dict(ref.state_dict())
    inputs = dummy_inputs(cfg, batch=2, height=8, width=8, text_len=text_len)  # 16 tokens
    x, c, _, _ = fp8.embed(
        inputs["latents"], inputs["timesteps"], inputs["text"], inputs["text_mask"], None
    )
    assert c.shape[1] % 8 == 0 and c.shape[1] >= text_len  # rows per rank: multiple of 8
    with torch.no_grad():
        torch.testing.assert_close(fp8(**inputs), ref(**inputs), rtol=1e-5, atol=1e-5)


def test_fp8_model_refuses_misaligned_visual_rows_and_generation():
    cfg = get_preset("tiny", num_layers=2)
    model = MMDiT(cfg, spec=fp8_like_spec())
    bad = dummy_inputs(cfg, batch=1, height=6, width=6)  # 9 visual tokens x batch 1
    with pytest.raises(ValueError, match=r"local-fp8-flag: 9 visual tokens .* not divisible by 8"):
        model(**bad)
    with pytest.raises(ValueError, match="cannot generate: FP8 scaling factors"):
        GenerationPipeline(model, vae=None, text_encoder=None)


class _TELikeExtraState(torch.nn.Module):
    """A module with extra state and no tolerance for its absence, as TE's modules are."""

    def get_extra_state(self):
        return torch.zeros(1)

    def set_extra_state(self, state):
        pass


def test_init_from_a_model_file_into_a_model_with_extra_state(tmp_path):
    """--init-generator / --init-discriminator with the te spec (issue 14, item 3): the file has
    no ``_extra_state``, the model does; the load succeeds, real keys stay checked."""
    from megatron_apt.checkpoint.io import save_model_file
    from megatron_apt.checkpoint.model_init import load_model_file_into

    cfg = get_preset("tiny", num_layers=2)
    src = MMDiT(cfg)
    randomize_parameters(src, seed=1)
    path = save_model_file(tmp_path / "g.safetensors", src.state_dict(), cfg, role="diffusion")
    dst = MMDiT(cfg)
    dst.blocks[0].te_like = _TELikeExtraState()
    assert "blocks.0.te_like._extra_state" in dst.state_dict()
    with pytest.raises(RuntimeError, match="_extra_state"):  # what a strict load does
        dst.load_state_dict(src.state_dict())
    load_model_file_into(dst, path)
    weights = {k: v for k, v in src.state_dict().items() if not k.endswith("_extra_state")}
    assert len(weights) > 20
    for k, v in weights.items():
        assert torch.equal(dst.state_dict()[k], v), k
    partial = {k: v for k, v in src.state_dict().items() if k != "final_proj.weight"}
    bad = save_model_file(tmp_path / "bad.safetensors", partial, cfg, role="diffusion")
    with pytest.raises(ValueError, match=r"bad.safetensors.*final_proj.weight"):
        load_model_file_into(dst, bad)


def test_te_linears_do_not_cache_fp8_weights_across_steps():
    """megatron's TE linears reuse their first FP8 weight copy unless the cache is disabled
    (issue 14, item 2; the GPU test of the effect is tests/gpu)."""
    from megatron_apt.models.mmdit.model import megatron_config
    from megatron_apt.parallel.state import single_process_state

    tcfg = megatron_config(get_preset("tiny"), single_process_state(), torch.float32, True)
    assert tcfg.disable_parameter_transpose_cache is True


def test_te_attention_sends_masks_with_holes_to_sdpa():
    """TE reads a padding mask as per-sequence lengths (valid keys first). The CP key order
    [x_0; c_0; x_1; c_1] with padded text has holes: those masks must not reach TE (issue 14,
    item 4). TE's kernels are replaced by recorders (no TE here); the dispatch is the code's."""
    from types import SimpleNamespace

    from megatron_apt.models.specs import SDPAttention, TEAttention, _right_padded_lengths
    from megatron_apt.parallel.context_parallel import cp_key_mask

    text_mask = torch.ones(2, 8, dtype=torch.bool)
    text_mask[1, 2:] = False  # sample 1 has 2 text tokens, padded to 8
    holes = cp_key_mask(16, text_mask, SimpleNamespace(cp_size=2))  # [x_0; c_0; x_1; c_1]
    assert _right_padded_lengths(holes) is None  # c_0's padding sits before x_1
    prefix = torch.cat([torch.ones(2, 16, dtype=torch.bool), text_mask], dim=1)  # CP = 1

    calls = []
    attn = TEAttention.__new__(TEAttention)
    torch.nn.Module.__init__(attn)
    attn.num_heads, attn.head_dim = 2, 4
    attn.core = lambda q, k, v, attention_mask: calls.append("te") or q.flatten(2)
    attn.fallback = SDPAttention(2, 4)
    q = k = v = torch.randn(24, 2, 2, 4)
    attn(q, k, v, prefix)
    assert calls == ["te"]
    out = attn(q, k, v, holes)
    assert calls == ["te"]  # the mask with holes went to SDPA
    torch.testing.assert_close(out, SDPAttention(2, 4)(q, k, v, holes))
