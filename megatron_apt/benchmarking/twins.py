"""diffusers' twin of our model in ``tools/benchmark.py``, one per model family.

* ``mmdit``: ``SD3Transformer2DModel`` of the same width, depth, heads and token count
  (:func:`megatron_apt.testing.diffusers_ref.sd3_kwargs_like`), with its own random weights:
  the architectures differ (RoPE against a sin-cos table, ...), so only the sizes match.
  Images only (``T == 1``).
* ``wan``: ``WanTransformer3DModel`` of the same config (the family's ``config_to_diffusers``)
  loaded with **our** weights (the family's ``to_diffusers``) and kept in fp32 where diffusers'
  loader keeps it (``_keep_in_fp32_modules``): both compute the same function, which
  :func:`check_agreement` asserts once before anything is timed. The text goes in unmasked on
  both sides (diffusers' Wan takes no mask; ours gets ``text_mask=None``); diffusers takes
  ``t * 1000``, ours ``t`` in [0, 1].

A twin is compiled as ours is (:func:`megatron_apt.models.compile.compile_blocks`): every
entry of its block list (``transformer_blocks`` in SD3, ``blocks`` in Wan), in place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_apt.benchmarking.workloads import model_calls
from megatron_apt.models.families import family_of

__all__ = [
    "AGREEMENT_TOLERANCE",
    "AgreementError",
    "Twin",
    "cast_as_loaded",
    "check_agreement",
    "prepare_ours",
    "twin_for",
]

# relative error ||ours - theirs|| / ||theirs|| of the forward that passes the agreement check.
# On the CPU both Wan models give bitwise the same output in fp32 and in bf16 (wan-debug, and
# width 256 x 4 layers); other kernels (a GPU's) may sum in another order: fp32 keeps ~1e-6 of
# it, bf16 rounds it at every block. Unmapped (independently initialized) weights give ~1.
AGREEMENT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.1}


class AgreementError(RuntimeError):
    """Ours and the diffusers twin loaded with our weights compute different functions."""


@dataclass(frozen=True)
class Twin:
    """How to stand diffusers' model of one family against ours."""

    family: str
    class_name: str
    same_weights: bool  # loaded with our weights: the outputs must agree
    kwargs: Callable[..., dict]  # (cfg, latent) -> the diffusers constructor's arguments
    build: Callable[..., torch.nn.Module]  # (kwargs, ours, cfg, device, dtype, seed)
    blocks: Callable[[torch.nn.Module], torch.nn.ModuleList]  # what --compile compiles
    run: Callable[..., Callable[[], torch.Tensor]]  # (model, inputs) -> one forward

    def calls(self, model, inputs) -> dict[str, Callable[[], object]]:
        """``{"forward": ..., "forward_backward": ...}`` of the twin, as ``ours_calls``."""
        return model_calls(self.run(model, inputs), model)

    def compile(self, model) -> int:
        for block in self.blocks(model):
            block.compile()
        return len(self.blocks(model))


# ---- mmdit: SD3Transformer2DModel of the same size -------------------------------------------


def _sd3_kwargs(cfg, latent) -> dict:
    from megatron_apt.testing.diffusers_ref import sd3_kwargs_like

    if latent[0] != 1:
        raise ValueError(f"diffusers' SD3 transformer is images-only; --latent has T={latent[0]}")
    return sd3_kwargs_like(cfg, latent[1], latent[2])


def _sd3_build(kwargs, ours, cfg, device, dtype, seed) -> torch.nn.Module:
    from megatron_apt.testing.diffusers_ref import sd3_transformer

    torch.manual_seed(seed)
    return sd3_transformer(**kwargs).to(device, dtype).train()


def _sd3_run(model, inputs) -> Callable[[], torch.Tensor]:
    kw = dict(
        hidden_states=inputs["latents"][:, :, 0],  # images: [B, C, H, W]
        encoder_hidden_states=inputs["text"],
        pooled_projections=inputs["pooled"],
        timestep=inputs["timesteps"] * 1000.0,
        return_dict=False,
    )
    return lambda: model(**kw)[0]


# ---- wan: WanTransformer3DModel with our weights ----------------------------------------------


def _wan_kwargs(cfg, latent) -> dict:
    config = family_of(cfg).config_to_diffusers(cfg)  # ValueError: no diffusers equivalent
    return {k: v for k, v in config.items() if not k.startswith("_")}


def cast_as_loaded(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating parameters and buffers to ``dtype``, except those that diffusers'
    ``from_pretrained(torch_dtype=...)`` keeps in fp32: the tensors whose dotted name has a
    component in the class's ``_keep_in_fp32_modules`` (diffusers 0.42.1
    models/model_loading_utils.py:238-239; Wan, transformer_wan.py:549: rope, time_embedder,
    scale_shift_table, norm1-3). ``model.to(bf16)`` would run those in bf16, unlike the
    released pipeline and unlike ours, which keeps the same modules in fp32; casting them down
    and back up would round their values. In place, without diffusers' ``to()`` (which warns
    about exactly this)."""
    keep = set(getattr(type(model), "_keep_in_fp32_modules", None) or ())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            target = torch.float32 if keep & set(name.split(".")) else dtype
            if t.dtype != target:
                t.data = t.data.to(target)


def diffusers_state_of(ours: torch.nn.Module, cfg, twin: torch.nn.Module) -> dict:
    """The state dict the Wan twin is loaded with: ours, mapped by the family's
    ``to_diffusers`` (the tests replace this to check that unmapped weights are caught)."""
    return family_of(cfg).to_diffusers(ours.state_dict(), cfg)


def _wan_build(kwargs, ours, cfg, device, dtype, seed) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):  # initialized where it runs (its random init is overwritten)
        model = WanTransformer3DModel(**kwargs)
    # copied into the twin's own (fp32) parameters: nothing shared with ours
    model.load_state_dict(diffusers_state_of(ours, cfg, model), strict=True)
    cast_as_loaded(model, dtype)
    return model.train()


def _wan_run(model, inputs) -> Callable[[], torch.Tensor]:
    kw = dict(
        hidden_states=inputs["latents"],  # [B, C, T, H, W]
        encoder_hidden_states=inputs["text"],  # no mask: diffusers' Wan attends to every token
        timestep=inputs["timesteps"] * 1000.0,
        return_dict=False,
    )
    return lambda: model(**kw)[0]


TWINS = {
    "mmdit": Twin(
        family="mmdit",
        class_name="SD3Transformer2DModel",
        same_weights=False,
        kwargs=_sd3_kwargs,
        build=_sd3_build,
        blocks=lambda m: m.transformer_blocks,
        run=_sd3_run,
    ),
    "wan": Twin(
        family="wan",
        class_name="WanTransformer3DModel",
        same_weights=True,
        kwargs=_wan_kwargs,
        build=_wan_build,
        blocks=lambda m: m.blocks,
        run=_wan_run,
    ),
}


def twin_for(cfg) -> Twin:
    """The diffusers twin of ``cfg``'s family (``ValueError`` for a family without one)."""
    name = family_of(cfg).name
    if name not in TWINS:
        raise ValueError(f"no diffusers twin for the {name!r} family")
    return TWINS[name]


def prepare_ours(model: torch.nn.Module, cfg) -> None:
    """What ours needs before it is compared: Wan's init zeroes the output projection (as
    Wan's), which would make both outputs 0 and the agreement check vacuous; it gets
    xavier-uniform weights here (from the global RNG: seed first). The time of the product is
    the same whatever its values."""
    if family_of(cfg).name == "wan":
        with torch.no_grad():
            torch.nn.init.xavier_uniform_(model.final_proj.weight)


def check_agreement(
    ours: Callable[[], torch.Tensor], theirs: Callable[[], torch.Tensor], dtype: torch.dtype
) -> dict:
    """One forward of each (no grad): ``{"rel_err", "max_abs_diff", "output_rms",
    "tolerance"}``; :class:`AgreementError` when the relative error
    ``||ours - theirs|| / ||theirs||`` exceeds :data:`AGREEMENT_TOLERANCE` of ``dtype``, is not
    finite, or the reference output is all zeros (nothing would be compared)."""
    with torch.no_grad():
        a, b = ours().float(), theirs().float()
    if a.shape != b.shape:
        raise AgreementError(f"output shapes differ: ours {tuple(a.shape)}, diffusers {b.shape}")
    ref = b.norm().item()
    rel = (a - b).norm().item() / ref if ref > 0 else float("nan")
    out = {
        "rel_err": rel,
        "max_abs_diff": (a - b).abs().max().item(),
        "output_rms": ref / max(b.numel(), 1) ** 0.5,
        "tolerance": AGREEMENT_TOLERANCE[dtype],
    }
    if not (rel <= out["tolerance"]):  # NaN fails too
        raise AgreementError(
            f"ours and diffusers' twin disagree: relative error {rel:.3g} > "
            f"{out['tolerance']:g} ({str(dtype).removeprefix('torch.')}; max abs diff "
            f"{out['max_abs_diff']:.3g}, output rms {out['output_rms']:.3g}): the weights are "
            "not mapped, or the two models no longer compute the same function"
        )
    return out
