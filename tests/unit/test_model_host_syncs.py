"""The model makes no host synchronization per step (issue 29, item 8, the model's part).

On CUDA every read of a device tensor's value on the host (``.item()``, ``bool(t)``,
``torch.equal``, ``torch.nonzero``, ...) stops the host until the GPU has caught up. The model
takes ``text_mask`` on the host (``megatron_apt/models/inputs.py``) and reads it there. This
runs the tiny MMDiT, the discriminator with its heads and the generator, forward and backward,
on the logical GPU of :class:`~megatron_apt.testing.devices.LogicalDevices` (weights and
inputs on the "device", the text mask on the host, mixing refused as CUDA does) and counts
the reads of device values with :class:`~megatron_apt.testing.host_sync.HostSyncCounter`.

The attention core asks for the varlen form of the mask, as the TE and flash-attn cores do.
After one warm-up call (the first call checks the timestep range: one read), a step makes
none. The code before this change raised on the host mask (``torch.cat`` of a device tensor
and the host mask) and made 6 reads per forward with the mask on the device (two ``.item()``
of the timestep check, ``bool(mask.all())``, ``torch.equal``, ``int(max)``, ``torch.nonzero``);
a device mask now costs 4 (``bool(mask.all())`` and the three of the varlen analysis).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_apt.models import MMDiT
from megatron_apt.models.discriminator import Discriminator, DiscriminatorConfig
from megatron_apt.models.generator import Generator
from megatron_apt.models.mmdit import get_preset
from megatron_apt.models.specs import SDPAttention, local_spec
from megatron_apt.testing import dummy_inputs, randomize_parameters
from megatron_apt.testing.devices import LogicalDevices
from megatron_apt.testing.host_sync import HostSyncCounter

DEVICE_MASK_SYNCS = 4  # bool(mask.all()) + the varlen analysis (any, max, nonzero)


class VarlenSDPA(SDPAttention):
    """SDPA that derives the varlen form (lengths, cu_seqlens, index) as TE / flash do."""

    def forward(self, q, k, v, key_mask=None):
        if key_mask is not None:
            assert key_mask.varlen() is not None  # right-padded text
        return super().forward(q, k, v, key_mask)


def _cfg():
    return dataclasses.replace(get_preset("tiny"), num_layers=3)


def _mmdit(seed=0):
    spec = dataclasses.replace(local_spec(), name="varlen-sdpa", attention=VarlenSDPA)
    model = MMDiT(_cfg(), spec=spec)
    randomize_parameters(model, seed=seed)
    return model


def _mmdit_step(inputs):
    model = _mmdit()

    def step():
        model.zero_grad(set_to_none=True)
        model(**inputs).square().mean().backward()

    return step


def _discriminator_step(inputs):
    d = Discriminator(_mmdit(), DiscriminatorConfig(head_layers=(1, 3)))
    randomize_parameters(d, seed=1)
    kw = {k: inputs[k] for k in ("text", "text_mask", "pooled_text")}

    def step():
        d.zero_grad(set_to_none=True)
        d(inputs["latents"], inputs["timesteps"], **kw).sum().backward()

    return step


def _generator_step(inputs):
    g = Generator(_mmdit())
    kw = {k: inputs[k] for k in ("text", "text_mask", "pooled_text")}

    def step():
        g.zero_grad(set_to_none=True)
        g(inputs["latents"], **kw).square().mean().backward()

    return step


STEPS = {"mmdit": _mmdit_step, "discriminator": _discriminator_step, "generator": _generator_step}


def count_syncs(make_step, masked: bool, host_mask: bool):
    """Host synchronizations of one step after a warm-up step, on a logical GPU."""
    inputs = dummy_inputs(_cfg(), batch=2, frames=2, text_len=6, masked=masked)
    step = make_step(inputs)  # weights and inputs: on the (logical) device
    with LogicalDevices() as dev:
        if host_mask and masked:
            dev.mark_host(inputs["text_mask"])
        step()  # the first call checks the timestep range (one read)
        with HostSyncCounter(counts=dev.on_device) as syncs:
            step()
    assert not dev.blocking_copies, dev.blocking_copies
    return syncs


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("role", sorted(STEPS))
def test_no_host_sync_per_step_with_a_host_mask(role, masked):
    syncs = count_syncs(STEPS[role], masked, host_mask=True)
    assert syncs.count == 0, syncs.summary()


def test_a_device_mask_still_works_and_syncs_a_known_number_of_times():
    syncs = count_syncs(_mmdit_step, masked=True, host_mask=False)
    assert syncs.count == DEVICE_MASK_SYNCS, syncs.summary()


def test_host_and_device_masks_give_the_same_numbers():
    inputs = dummy_inputs(_cfg(), batch=2, frames=2, text_len=6)
    model = _mmdit()
    with LogicalDevices() as dev:
        out_device = model(**inputs)
        dev.mark_host(inputs["text_mask"])
        out_host = model(**inputs)
    assert torch.equal(out_host, out_device)


def test_the_timestep_slip_is_still_caught_on_the_device():
    """SD3's sigma * 1000 fails on the first call with device timesteps, and on every call
    with host timesteps (free there)."""
    inputs = dummy_inputs(_cfg())
    bad = {**inputs, "timesteps": inputs["timesteps"] * 1000}
    with LogicalDevices():
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
            _mmdit()(**bad)  # device timesteps, first call
    model = _mmdit()
    model(**inputs)
    for _ in range(2):  # host timesteps (a CPU run): every call
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
            model(**bad)
