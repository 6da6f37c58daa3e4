"""The ``local`` spec (megatron-core linears + torch SDPA) on CUDA against the CPU fp32
reference, needing only torch CUDA (issue 29, item 10): the MMDiT's forward and every
parameter gradient, and one APT update (D phase, D's RMSprop step, G phase with D frozen).

Each comparison is one function of ``(device, dtype)``. The ``gpu`` tests run it on CUDA; the
``cpu_half`` tests run the SAME function with ``device="cpu"`` (bf16 on the CPU against fp32 on
the CPU), in CI and in ``tools/gpu_check.sh --dry-run``.

Error measure: per tensor ``||got - want|| / ||want||`` (Frobenius). Tolerances, calibrated on
bf16-on-CPU against fp32 (seeds 0-5, weights ~ N(0, 0.1^2), the sizes below) with a stated
margin, because a first-principles bound is loose: bf16 keeps 8 significant bits, unit
roundoff u = 2^-8 = 3.9e-3; each rounded op adds a relative error of std ~u/sqrt(3) and, for
independent roundings, k ops in sequence ~sqrt(k) u/sqrt(3). The tiny MMDiT forward measured
6.1e-3 - 8.7e-3 (1.6-2.2 u, i.e. k ~ 8-15 effective roundings: 2 blocks of norm, modulate,
QKV, attention, projection, MLP, gate). Gradients are worse where a parameter's gradient is a
sum over tokens that cancels (RMS QK-norm weights, the heads' LayerNorm biases): up to 2.9e-2
per tensor for the MMDiT, 1.3e-1 in the APT update (whose D gradients also carry the R1
term's rounding noise, below). CUDA's kernels differ from the CPU's only in summation order
and in where they round (cuBLAS and SDPA's flash kernel accumulate in fp32 and round once, as
the CPU's do), so the CUDA errors are expected at the same size: every tolerance is 3x the
worst bf16-on-CPU figure. What they catch: a bug that ignores the text mask moves the forward
by 4.5e-2 (> FWD_TOL), a missing or zeroed gradient gives 1.0, a sign error 2.0, TF32 switched
on in an fp32 run ~1e-3 (> FP32_TOL).

fp32 on CUDA against fp32 on the CPU: fp32 keeps 24 bits (u = 6e-8); the same ~sqrt(k) growth
and cancellation give ~1e-6; FP32_TOL = 1e-4 leaves 100x.

The approximated R1 penalty (``loss_r1``) is compared in fp32 only: at sigma = 0.01 it is
``lambda (D(x) - D(x + sigma eps))^2`` of two logits that differ by ~1e-4, below the bf16
resolution of the logits themselves (measured on the CPU, seeds 0-5: its bf16 value has a
relative error of 2.3 to 1.6e3 against fp32), so in bf16 only its finiteness is checked and
its error recorded.
"""

from __future__ import annotations

import pytest
import torch

from megatron_apt.models import MMDiT
from megatron_apt.models.build_options import model_build
from megatron_apt.models.builders import build_discriminator, build_generator
from megatron_apt.models.mmdit import get_preset
from megatron_apt.stages.apt import APTConfig, discriminator_step, frozen, generator_step
from megatron_apt.testing import dummy_inputs, randomize_parameters
from megatron_apt.testing.gpu import (
    concatenated_error,
    gradients,
    relative_errors,
    to_device,
)

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

WEIGHT_STD = 0.1  # large enough that attention is not uniform: the text mask matters
SHAPE = dict(batch=2, frames=2, height=8, width=8, text_len=8)  # 32 visual + 8 text tokens

# bf16: 3x the worst bf16-on-CPU figure of seeds 0-5 (module docstring)
FWD_TOL = 3e-2  # measured <= 8.7e-3
GRAD_TOL = 9e-2  # per tensor, measured <= 2.9e-2
GRAD_ALL_TOL = 4e-2  # all gradients as one vector, measured <= 1.3e-2
APT_LOSS_TOL = 2e-2  # loss_d (adversarial part), loss_g; measured <= 6.1e-3
APT_GRAD_TOL = 4e-1  # per tensor, measured <= 1.3e-1
APT_GRAD_ALL_TOL = 1.1e-1  # G's and D's gradients each as one vector, measured <= 3.6e-2
FP32_TOL = 1e-4  # fp32 against fp32, every figure


def _cpu_fp32_and(dtype: torch.dtype, build, seed: int):
    """``(reference, model)``: ``build(params_dtype)`` twice, the reference in fp32 with
    weights drawn from ``seed``, the model in ``dtype`` with the same weights (rounded)."""
    # on the CPU even where megatron would allocate on the current CUDA device
    # (models/build_options.py model_build; megatron-core 0.16.1 tensor_parallel/layers.py)
    with model_build(use_cpu_initialization=True):
        ref, model = build(torch.float32), build(dtype)
    assert {p.device.type for p in ref.parameters()} == {"cpu"}
    randomize_parameters(ref, seed=seed, std=WEIGHT_STD)
    model.load_state_dict(ref.state_dict())
    return ref, model


# ------------------------------------------------------------------------------------------
# (a) the MMDiT: forward and every parameter gradient
# ------------------------------------------------------------------------------------------


def mmdit_errors(
    device: str, dtype: torch.dtype, preset: str = "tiny", seed: int = 0
) -> dict[str, float]:
    """The MMDiT of ``preset`` (local spec) in ``dtype`` on ``device`` against fp32 on the CPU:
    ``forward``, ``grad/<name>`` for every parameter, ``grad/all``."""
    cfg = get_preset(preset)
    ref, model = _cpu_fp32_and(dtype, lambda dt: MMDiT(cfg, params_dtype=dt), seed)
    model = model.to(device)
    inputs = dummy_inputs(cfg, masked=True, seed=seed, **SHAPE)
    want = ref(**inputs)
    # a fixed random projection as the loss: every output element gets a gradient of O(1)
    probe = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed + 1))
    (want * probe).mean().backward()
    got = model(**to_device(inputs, device, dtype))
    (got.float() * probe.to(device)).mean().backward()
    g_got, g_want = gradients(model), gradients(ref)
    errors = {"forward": relative_errors({"o": got}, {"o": want})["o"]}
    errors.update({f"grad/{k}": v for k, v in relative_errors(g_got, g_want).items()})
    errors["grad/all"] = concatenated_error(g_got, g_want)
    return errors


def check_mmdit(errors: dict[str, float], dtype: torch.dtype, record) -> None:
    fp32 = dtype == torch.float32
    fwd, grad, grad_all = (FP32_TOL,) * 3 if fp32 else (FWD_TOL, GRAD_TOL, GRAD_ALL_TOL)
    worst = max((k for k in errors if k.startswith("grad/") and k != "grad/all"), key=errors.get)
    for name, value in (("forward", errors["forward"]), ("grad_all", errors["grad/all"])):
        record(f"{name}_rel_err", value)
    record("grad_worst_rel_err", errors[worst])
    record("grad_worst", worst)
    assert errors["forward"] <= fwd, errors["forward"]
    assert errors["grad/all"] <= grad_all, errors["grad/all"]
    bad = {k: v for k, v in errors.items() if k.startswith("grad/") and v > grad}
    assert not bad, f"gradients beyond {grad}: {bad}"
    assert len(errors) > 40  # every parameter of the tiny MMDiT was compared (~50)


DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]
PRESETS = ["tiny", "tiny-sd3"]  # RMS QK-norm + 3-D RoPE; SD3-style (no QK-norm, pos-embed)


@pytest.mark.cpu_half
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", PRESETS)
def test_mmdit_on_cpu_matches_cpu_fp32(preset, dtype, record_property):
    """The CPU half: the same comparison with the model on the CPU."""
    check_mmdit(mmdit_errors("cpu", dtype, preset), dtype, record_property)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", PRESETS)
def test_mmdit_on_cuda_matches_cpu_fp32(preset, dtype, record_property):
    check_mmdit(mmdit_errors("cuda", dtype, preset), dtype, record_property)


# ------------------------------------------------------------------------------------------
# (b) one APT update
# ------------------------------------------------------------------------------------------


def _apt_update(gen, disc, batch: dict, seed: int) -> dict[str, torch.Tensor]:
    """One APT update as the trainer does it without DeepSpeed (``stages/apt.py``): D phase,
    D's RMSprop step, G phase with D frozen, G's step; the losses and gradients."""
    apt = APTConfig.image()
    rng = torch.Generator().manual_seed(seed)  # every draw on the CPU: the same on any device

    def rmsprop(module):  # the paper's optimizer and learning rate (alpha 0.9)
        params = [p for p in module.parameters() if p.requires_grad]
        return torch.optim.RMSprop(params, lr=1e-6, alpha=0.9, eps=1e-8)

    opt_d, opt_g = rmsprop(disc), rmsprop(gen)
    loss_d, metrics = discriminator_step(disc, gen, batch, apt, rng)
    loss_d.backward()
    out = {"loss_d": metrics["loss_d"], "loss_r1": metrics["loss_r1"]}
    out.update(gradients(disc, "d/"))
    opt_d.step()
    with frozen(disc):
        loss_g, _ = generator_step(disc, gen, batch, apt, rng)
        loss_g.backward()
    out["loss_g"] = loss_g.detach()
    out.update(gradients(gen, "g/"))
    opt_g.step()
    return out


def apt_errors(device: str, dtype: torch.dtype, seed: int = 0) -> dict[str, float]:
    """One APT update of the tiny G and D (local spec) in ``dtype`` on ``device`` against fp32
    on the CPU: the losses, every gradient, ``g/all`` and ``d/all``."""
    cfg = get_preset("tiny")
    nets = []
    for i, build in enumerate((build_generator, build_discriminator)):
        make = lambda dt, b=build: b(cfg, params_dtype=dt)  # noqa: E731
        nets.append(_cpu_fp32_and(dtype, make, seed=2 * seed + i))
    (g_ref, gen), (d_ref, disc) = nets
    inputs = dummy_inputs(cfg, masked=True, seed=seed, **{**SHAPE, "frames": 1})
    batch = {k: inputs[k] for k in ("latents", "text", "text_mask", "pooled_text")}
    want = _apt_update(g_ref, d_ref, batch, seed)
    got = _apt_update(gen.to(device), disc.to(device), to_device(batch, device, dtype), seed)
    errors = relative_errors(got, want)
    for net in ("g", "d"):
        keys = [k for k in want if k.startswith(net + "/")]
        errors[f"{net}/all"] = concatenated_error(
            {k: got[k] for k in keys}, {k: want[k] for k in keys}
        )
    errors["loss_r1_finite"] = float(torch.isfinite(got["loss_r1"]).item())
    return errors


def check_apt(errors: dict[str, float], dtype: torch.dtype, record) -> None:
    fp32 = dtype == torch.float32
    loss_tol, grad, grad_all = (FP32_TOL,) * 3 if fp32 else (APT_LOSS_TOL, APT_GRAD_TOL,
                                                             APT_GRAD_ALL_TOL)  # fmt: skip
    losses = ("loss_d", "loss_g", "loss_r1") if fp32 else ("loss_d", "loss_g")
    for key in ("loss_d", "loss_g", "loss_r1", "g/all", "d/all"):
        record(f"{key.replace('/', '_')}_rel_err", errors[key])
    tensors = {k: v for k, v in errors.items() if k[:2] in ("g/", "d/") and not k.endswith("/all")}
    worst = max(tensors, key=tensors.get)
    record("grad_worst_rel_err", tensors[worst])
    record("grad_worst", worst)
    assert errors["loss_r1_finite"] == 1.0
    bad = {k: errors[k] for k in losses if errors[k] > loss_tol}
    assert not bad, f"losses beyond {loss_tol}: {bad}"
    assert errors["g/all"] <= grad_all and errors["d/all"] <= grad_all, errors
    bad = {k: v for k, v in tensors.items() if v > grad}
    assert not bad, f"gradients beyond {grad}: {bad}"
    assert len(tensors) > 100  # every trained parameter of G and D (~138)


@pytest.mark.cpu_half
@pytest.mark.parametrize("dtype", DTYPES)
def test_apt_update_on_cpu_matches_cpu_fp32(dtype, record_property):
    """The CPU half: the same update with G and D on the CPU."""
    check_apt(apt_errors("cpu", dtype), dtype, record_property)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_apt_update_on_cuda_matches_cpu_fp32(dtype, record_property):
    check_apt(apt_errors("cuda", dtype), dtype, record_property)
