"""Scale-out details of the GPU path, checked on CPU (issue 14, item 12):

* the attention mask's host-side analysis (is every row a prefix, the longest row, the valid
  keys' positions: what TE and flash-attn's varlen kernels take) runs once per forward, shared
  by every layer, also through recompute; it was a host sync in each layer (with the text
  mask on the host, as the trainer passes it, it is none: tests/unit/test_model_host_syncs.py);
* a skeleton build (conversion: shapes only, on the meta device) stays on the meta device on a
  CUDA host: megatron allocates with ``device=torch.cuda.current_device()`` unless told to
  initialize "on the CPU", which a meta context cannot redirect (simulated here: the check
  megatron's GPU path hinges on says "CUDA ready", and any CUDA allocation fails on this
  machine, so the old code fails this test);
* TE models loaded from a file skip their random initialization; CPU specs keep it;
* ``CUDA_DEVICE_MAX_CONNECTIONS=1`` for tensor-parallel runs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_apt.checkpoint.convert import build_skeleton, tensor_layout
from megatron_apt.checkpoint.io import save_model_file
from megatron_apt.checkpoint.model_init import build_discriminator, build_mmdit
from megatron_apt.models import MMDiT, specs
from megatron_apt.models.mmdit import get_preset
from megatron_apt.models.mmdit import model as mmdit_module
from megatron_apt.models.specs import KeyMask, SDPAttention, local_spec
from megatron_apt.parallel.state import configure_cuda_env
from megatron_apt.testing import dummy_inputs, randomize_parameters


class VarlenProbeAttention(SDPAttention):
    """SDPA that asks for the varlen form as the TE and flash cores do."""

    def forward(self, q, k, v, key_mask=None):
        if key_mask is not None:
            assert isinstance(key_mask, KeyMask)
            assert key_mask.varlen() is not None  # right-padded text
        return super().forward(q, k, v, key_mask)


def probe_spec():
    return dataclasses.replace(local_spec(), name="varlen-probe", attention=VarlenProbeAttention)


def test_mask_analysis_once_per_forward(monkeypatch):
    cfg = dataclasses.replace(get_preset("tiny"), num_layers=3)
    model = MMDiT(cfg, spec=probe_spec())
    randomize_parameters(model)
    calls = []
    real = specs._right_padded_lengths
    monkeypatch.setattr(specs, "_right_padded_lengths", lambda m: calls.append(1) or real(m))
    inputs = dummy_inputs(cfg, masked=True)
    assert not bool(inputs["text_mask"].all())  # the case with a mask
    ref = MMDiT(cfg)  # plain SDPA on tensors: the same numbers
    ref.load_state_dict(model.state_dict())
    out = model(**inputs)
    assert len(calls) == 1, f"{len(calls)} mask analyses for {cfg.num_layers} layers"
    torch.testing.assert_close(out, ref(**inputs), rtol=0, atol=0)
    calls.clear()
    model.set_recompute("all")  # recomputed blocks reuse the forward's mask object
    model(**inputs).square().mean().backward()
    assert len(calls) == 1, f"{len(calls)} mask analyses with recompute"


def test_varlen_form_of_a_mask():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    keys = KeyMask(mask).varlen()
    assert keys.lengths.tolist() == [3, 4, 1] and keys.max_len == 4
    assert keys.cu_seqlens.dtype == torch.int32 and keys.cu_seqlens.tolist() == [0, 3, 7, 8]
    k = torch.randn(3 * 4, 2, 5)
    torch.testing.assert_close(k.index_select(0, keys.index), k[mask.reshape(-1)])
    holes = torch.tensor([[1, 0, 1, 1]], dtype=torch.bool)  # CP's [x_0; c_0; x_1; c_1] order
    assert KeyMask(holes).varlen() is None


def _explode_on_cuda(*args, **kwargs):
    raise RuntimeError("tried to allocate on CUDA")


@pytest.mark.parametrize("role", ["mmdit", "discriminator"])
def test_skeleton_stays_on_meta_on_a_cuda_host(monkeypatch, role):
    # a CUDA host with megatron's RNG tracker seeded: megatron would allocate on the GPU
    monkeypatch.setattr(mmdit_module, "_cuda_rng_tracker_ready", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", _explode_on_cuda)
    model = build_skeleton(get_preset("tiny"), role)
    devices = {p.device.type for p in model.parameters()}
    assert devices == {"meta"}, devices


@pytest.mark.parametrize("role", ["mmdit", "discriminator"])
def test_skeleton_keeps_tp_attributes(role):
    """Built without init, megatron's linears lack their TP attributes (it sets them in the
    init functions only); conversion reads the partition dims off the skeleton."""
    cfg = get_preset("tiny")
    initialized = MMDiT(cfg) if role == "mmdit" else build_discriminator(cfg)
    want = tensor_layout(cfg, role, model=initialized)
    assert any(dim is not None for _, dim in want.values())
    assert tensor_layout(cfg, role) == want  # from build_skeleton


def fake_te_spec():
    """The local kernels flagged as TE: the build decisions of a TE spec, on CPU."""
    return dataclasses.replace(local_spec(), name="te-like", uses_te=True)


def _count_inits(monkeypatch) -> list:
    from megatron.core.tensor_parallel import layers

    calls = []
    real_cpu = layers._initialize_affine_weight_cpu
    monkeypatch.setattr(
        layers, "_initialize_affine_weight_cpu",
        lambda *a, **k: calls.append("megatron") or real_cpu(*a, **k),
    )  # fmt: skip
    real_dit = MMDiT._init_replicated
    monkeypatch.setattr(
        MMDiT, "_init_replicated", lambda self: calls.append("dit") or real_dit(self)
    )
    return calls


def test_te_models_loaded_from_a_file_skip_random_init(monkeypatch, tmp_path):
    cfg = get_preset("tiny")
    src = MMDiT(cfg)
    randomize_parameters(src)
    path = tmp_path / "m.safetensors"
    save_model_file(path, src.state_dict(), cfg, role="diffusion")
    calls = _count_inits(monkeypatch)
    model = build_mmdit(cfg, spec=fake_te_spec(), init_from=path)
    assert calls == [], calls
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    build_mmdit(cfg, spec=local_spec(), init_from=path)  # CPU specs: init kept (RNG draws)
    assert "megatron" in calls and "dit" in calls
    calls.clear()
    build_mmdit(cfg, spec=fake_te_spec())  # nothing to load: initialized
    assert "megatron" in calls and "dit" in calls


def test_cuda_device_max_connections():
    env: dict = {}
    assert configure_cuda_env(1, env) is None and env == {}  # no TP: nothing to overlap
    assert configure_cuda_env(2, env) is None and env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}  # the user's choice is kept, with a warning
    note = configure_cuda_env(4, env)
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "8" and "only with 1" in note
