"""The ``mpu`` object DeepSpeed asks for, over our :class:`ParallelState`.

DeepSpeed 0.19.8 partitions ZeRO state over ``get_data_parallel_group()`` and treats the TP
group as the model-parallel group. Under context parallelism the data-parallel group handed to
DeepSpeed is DP x CP: it averages gradients over it, and the trainer multiplies the loss by CP
so that the partial gradients of the CP ranks add up (megatron's scheme).

It must NOT have ``initialize_sequence_parallel``: when present, DeepSpeed ignores the mpu's
groups (CPU-FACTS.md).
"""

from __future__ import annotations

import torch.distributed as dist

from megatron_apt.parallel.state import ParallelState


class DeepSpeedMPU:
    def __init__(self, ps: ParallelState):
        self.ps = ps

    # model (= tensor) parallel
    def get_model_parallel_rank(self) -> int:
        return self.ps.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.ps.tp_size

    def get_model_parallel_group(self):
        return self.ps.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_rank() - self.ps.tp_rank  # TP ranks are adjacent (tp-cp-dp order)

    # data parallel, as far as gradients and ZeRO are concerned: DP x CP (context-parallel
    # ranks hold partial gradients of the same replica; megatron reduces over the same group)
    def get_data_parallel_rank(self) -> int:
        return self.ps.grad_rank

    def get_data_parallel_world_size(self) -> int:
        return self.ps.dp_cp_size

    def get_data_parallel_group(self):
        return self.ps.grad_group
