"""The fp32 master weights of a DeepSpeed engine, addressed per parameter.

Under ``--bf16`` the engine's module holds bf16 copies of the weights; the weights the optimizer
updates are fp32 and live inside DeepSpeed's optimizer, laid out differently per configuration.
An EMA, a consistency target or an exported model file made from the module's bf16 copies
loses every update smaller than bf16's resolution (8 bits of mantissa: an update of 1e-4 to a
weight of 0.5 vanishes), so they read the masters. The layouts, as of deepspeed 0.19.8:

``full``
    No ZeRO, fp32 (``runtime/engine.py`` ``_do_optimizer_sanity_check`` returns None: the
    client optimizer steps the module's parameters), and parameters no optimizer holds
    (frozen ones): the module's parameter is the master.
``flat``
    No ZeRO, bf16 (``DDP_BFLOAT16`` -> ``runtime/engine.py`` ``_configure_fp16_optimizer``):
    with a fused Adam, ``FP16_Optimizer`` (``runtime/fp16/fused_optimizer.py`` lines 89-103)
    keeps one flat fp32 copy per param group, ``fp32_groups_flat[g]``, the group's trainable
    parameters flattened and concatenated in order without padding; with any other optimizer
    (RMSprop, torch's Adam), ``FP16_UnfusedOptimizer`` (``runtime/fp16/unfused_optimizer.py``
    lines 74-88) keeps one fp32 clone per parameter, ``fp32_groups[g][i]``. Every rank holds
    all of it.
``fragment``
    ZeRO 1/2, and ``BF16_Optimizer``, which is what ZeRO-1 under bf16 runs (fp32 gradient
    accumulation: ``megatron_apt/engine/ds_config.py`` ``grad_accum_dtype``; it links its fp32
    partition the same way, ``runtime/bf16_optimizer.py`` line 344): ``param._hp_mapping``
    (``utils/tensor_fragment.py`` ``tensor_fragment``, set by
    ``utils/mixed_precision_linkage.py`` ``link_hp_params``) names the slice of this rank's flat
    fp32 partition that holds part of the parameter, ``hp_fragment`` (1-D), and where it sits
    in the flattened parameter,
    ``lp_fragment_address``; a rank holding no part of it has ``_hp_mapping = None``.
    DeepSpeed assembles a full parameter by all-reducing zero-padded fragments over DP
    (``tensor_fragment.py`` line 87, ``get_full_hp_param``); so does :meth:`assemble`, in
    buckets. Relinked on checkpoint load (``stage_1_and_2.py`` line 3793,
    ``bf16_optimizer.py`` line 689): never cached here.
``partition``
    ZeRO-3: this rank's fp32 partition of each parameter, ``ds_tensor``'s size (padded
    equally on every rank), read with ``deepspeed.utils.safe_get_local_fp32_param``
    (``tensor_fragment.py`` line 289); full = all-gather over the DP group, narrowed to
    ``ds_numel`` (``runtime/zero/stage3.py`` line 3090 ``_fp32_state_allgather``).

:class:`MasterWeights` gives them one interface: :meth:`local` (this rank's share, fp32, or
None), :meth:`assemble` (full TP-local fp32 tensors from tensors laid out like ``local``;
collective over DP) and :meth:`localize` (the inverse; no communication).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_apt.parallel.state import ParallelState, comm_device

BUCKET_NUMEL = 1 << 25  # fp32 elements per all-reduce when assembling fragments (128 MiB)


class MasterWeights:
    def __init__(self, engine, ps: ParallelState):
        self.engine, self.ps = engine, ps
        self.params = dict(engine.module.named_parameters())
        self.zero3 = engine.zero_optimization_stage() == 3
        self._flat = _flat_addresses(engine.optimizer)  # id(param) -> (group, offset)
        self.layout = {n: self._layout(p) for n, p in self.params.items()}

    def _layout(self, p: torch.nn.Parameter) -> str:
        if self.zero3:
            return "partition"
        if hasattr(p, "_hp_mapping"):
            return "fragment"
        if id(p) in self._flat:
            return "flat"
        return "full"

    @property
    def group(self):
        return self.ps.grad_group

    @property
    def group_size(self) -> int:
        return self.ps.dp_cp_size

    # ---- this rank's share --------------------------------------------------------------
    def local(self, name: str) -> torch.Tensor | None:
        """This rank's share of parameter ``name``'s master, fp32: a view of DeepSpeed's own
        tensor where the master is fp32 (do not modify it), a copy for a frozen bf16
        parameter; the parameter's shape (``full``/``flat``), or 1-D (``fragment``: None when
        this rank holds no part of it; ``partition``)."""
        p, layout = self.params[name], self.layout[name]
        if layout == "partition":
            if not p.requires_grad:  # no optimizer state: the module's partition is all there is
                return p.ds_tensor.detach().float()
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p).detach()
        if layout == "fragment":
            mapping = p._hp_mapping
            return None if mapping is None else mapping.get_hp_fragment().detach()
        if layout == "flat":
            g, offset, index = self._flat[id(p)]
            if offset is None:
                return self.engine.optimizer.fp32_groups[g][index].detach()
            flat = self.engine.optimizer.fp32_groups_flat[g]
            return flat.detach().narrow(0, offset, p.numel()).view(p.shape)
        return p.detach().float()

    def local_state(self) -> dict[str, torch.Tensor]:
        """Copies of every share this rank holds (names without a share are left out)."""
        out = {}
        for n in self.params:
            t = self.local(n)
            if t is not None:
                out[n] = t.clone()
        return out

    def full_shape(self, name: str) -> tuple[int, ...]:
        """The TP-local shape of parameter ``name`` (ZeRO-3's module holds an empty tensor)."""
        p = self.params[name]
        return tuple(p.ds_shape) if self.layout[name] == "partition" else tuple(p.shape)

    def localize(self, name: str, full: torch.Tensor) -> torch.Tensor | None:
        """This rank's share of a full TP-local tensor of parameter ``name`` (fp32 copy)."""
        p, layout = self.params[name], self.layout[name]
        shape = self.full_shape(name)
        if tuple(full.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(full.shape)}, expected {shape}")
        full = full.detach().float()
        if layout == "fragment":
            mapping = p._hp_mapping
            if mapping is None:
                return None
            a = mapping.lp_fragment_address
            return full.reshape(-1).narrow(0, a.start, a.numel).clone()
        if layout == "partition":
            part = p.ds_tensor.ds_numel
            rank = dist.get_rank(self.group) if self.group_size > 1 else 0
            padded = torch.zeros(part * self.group_size, dtype=torch.float32, device=full.device)
            padded[: full.numel()] = full.reshape(-1)
            return padded[rank * part : (rank + 1) * part].clone()
        return full.clone()

    def local_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of :meth:`local`'s tensor (None: this rank holds no part)."""
        p, layout = self.params[name], self.layout[name]
        if layout == "partition":
            return (p.ds_tensor.ds_numel,)
        if layout == "fragment":
            m = p._hp_mapping
            return None if m is None else (m.lp_fragment_address.numel,)
        return tuple(p.shape)

    # ---- full tensors -------------------------------------------------------------------
    def assemble(
        self, shares: dict[str, torch.Tensor | None], out_device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """Full TP-local fp32 tensors of every parameter from ``shares`` laid out like
        :meth:`local` (missing or None: no part here). Collective over the DP group: every
        rank calls it with the same parameters in the same order and gets the same result."""
        out: dict[str, torch.Tensor] = {}
        fragments = []
        for n, p in self.params.items():
            layout, t = self.layout[n], shares.get(n)
            if layout == "fragment" and self.group_size > 1:
                fragments.append(n)
            elif layout == "partition":
                out[n] = self._gather_partition(n, t)
            elif t is None:
                raise ValueError(f"no share of {n} on this rank (layout {layout!r})")
            else:
                out[n] = t.detach().float().reshape(p.shape).clone()
        for bucket in _buckets(fragments, {n: self.params[n].numel() for n in fragments}):
            out.update(self._reduce_fragments(bucket, shares, out_device))
        if out_device is not None:
            out = {n: t.to(out_device) for n, t in out.items()}
        return {n: out[n] for n in self.params}  # the module's order

    def full_state(self, out_device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The full TP-local fp32 master of every parameter (collective over DP)."""
        return self.assemble({n: self.local(n) for n in self.params}, out_device)

    def gather_to_first(self, name: str, share: torch.Tensor | None) -> torch.Tensor | None:
        """Parameter ``name``'s full TP-local fp32 tensor on the first rank of the DP group from
        every rank's ``share`` (laid out like :meth:`local`), None on the others; one parameter
        at a time, so that no rank holds more than one full tensor (the streaming export,
        ``megatron_apt.engine.export``). Collective over the DP group. Fragments are summed
        with ``dist.reduce`` (as :meth:`_reduce_fragments`, to one rank), ZeRO-3 partitions
        collected with ``dist.gather`` (as :meth:`_gather_partition`)."""
        p, layout, size, group = self.params[name], self.layout[name], self.group_size, self.group
        first = size == 1 or dist.get_rank(group) == 0
        root = dist.get_global_rank(group, 0) if size > 1 else 0
        if layout == "fragment" and size > 1:
            buf = torch.zeros(p.numel(), dtype=torch.float32, device=comm_device(group))
            mapping = p._hp_mapping
            if share is not None and mapping is not None:
                a = mapping.lp_fragment_address
                buf.narrow(0, a.start, a.numel).copy_(share.reshape(-1))
            dist.reduce(buf, dst=root, group=group)
            return buf.view(p.shape) if first else None
        if layout == "partition":
            if share is None:
                raise ValueError(f"no ZeRO-3 partition of {name} on this rank")
            part = share.detach().float().to(comm_device(group)).contiguous()
            if size > 1:
                parts = [torch.empty_like(part) for _ in range(size)] if first else None
                dist.gather(part, parts, dst=root, group=group)
                part = torch.cat(parts) if first else None
            return part[: p.ds_numel].view(p.ds_shape) if first else None
        if share is None:
            raise ValueError(f"no share of {name} on this rank (layout {layout!r})")
        return share.detach().float().reshape(p.shape) if first else None

    def _reduce_fragments(self, names, shares, out_device) -> dict[str, torch.Tensor]:
        # DeepSpeed's get_full_hp_param, one all-reduce per bucket instead of per parameter:
        # each element is non-zero on exactly one rank, so the sum is exact
        device = comm_device(self.group)
        sizes = [self.params[n].numel() for n in names]
        buf = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
        offset = 0
        for n, size in zip(names, sizes, strict=True):
            t, mapping = shares.get(n), self.params[n]._hp_mapping
            if t is not None and mapping is not None:
                a = mapping.lp_fragment_address
                buf.narrow(0, offset + a.start, a.numel).copy_(t.reshape(-1))
            offset += size
        dist.all_reduce(buf, group=self.group)
        if out_device is not None:
            buf = buf.to(out_device)
        return {
            n: part.view(self.params[n].shape).clone()
            for n, part in zip(names, buf.split(sizes), strict=True)
        }

    def _gather_partition(self, name: str, t: torch.Tensor | None) -> torch.Tensor:
        p = self.params[name]
        if t is None:
            raise ValueError(f"no ZeRO-3 partition of {name} on this rank")
        t = t.detach().float()
        if self.group_size == 1:
            flat = t
        else:  # equal partitions on every rank (ds_tensor is padded)
            part = t.to(comm_device(self.group)).contiguous()
            flat = torch.empty(
                part.numel() * self.group_size, dtype=torch.float32, device=part.device
            )
            dist.all_gather_into_tensor(flat, part, group=self.group)
        return flat[: p.ds_numel].view(p.ds_shape).clone()


def _flat_addresses(optimizer) -> dict[int, tuple[int, int | None, int]]:
    """No ZeRO, bf16/fp16: id(param) -> where its fp32 master is. ``FP16_Optimizer`` (fused
    optimizers) keeps one flat copy per group, ``fp32_groups_flat[group]`` (the group's
    parameters concatenated, no padding): (group, offset, -1). ``FP16_UnfusedOptimizer``
    (every other optimizer, e.g. RMSprop: ``runtime/engine.py`` ``_configure_fp16_optimizer``,
    ``runtime/fp16/unfused_optimizer.py`` lines 74-88) keeps one fp32 clone per parameter,
    ``fp32_groups[group][index]``: (group, None, index)."""
    groups = getattr(optimizer, "fp16_groups", None)
    if groups is None:
        return {}
    flats = getattr(optimizer, "fp32_groups_flat", None)
    lists = getattr(optimizer, "fp32_groups", None)
    out: dict[int, tuple[int, int | None, int]] = {}
    for g, params in enumerate(groups):
        offset = 0
        for i, p in enumerate(params):
            if flats is not None:
                out[id(p)] = (g, offset, -1)
            elif lists is not None:
                if tuple(lists[g][i].shape) != tuple(p.shape):
                    raise RuntimeError(
                        f"DeepSpeed's fp32 master {g}/{i} has shape {tuple(lists[g][i].shape)}, "
                        f"its parameter {tuple(p.shape)}: FP16_UnfusedOptimizer's layout changed"
                    )
                out[id(p)] = (g, None, i)
            offset += p.numel()
        if flats is not None and offset != flats[g].numel():
            raise RuntimeError(
                f"DeepSpeed's flat fp32 master of param group {g} has {flats[g].numel()} "
                f"elements, its parameters {offset}: the layout of FP16_Optimizer changed"
            )
    return out


def _buckets(names: list[str], numel: dict[str, int]) -> list[list[str]]:
    out, cur, size = [], [], 0
    for n in names:
        if cur and size + numel[n] > BUCKET_NUMEL:
            out.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += numel[n]
    return out + ([cur] if cur else [])
