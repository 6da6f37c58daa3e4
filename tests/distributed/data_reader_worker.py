"""Worker for test_data_pipeline: LatentShardReader on 2 data-parallel ranks.

Launched with ``torchrun --nproc-per-node 2``. Every rank reads its part of the data set: two
epochs with seed 0 (twice, with and without prefetch), one epoch with seed 1, and resumed runs
from states saved after k micro-batches. Rank 0 gathers every rank's sample ids and batch shapes
and writes them as JSON, then each rank prints the success marker.
"""

import argparse
import json

import torch.distributed as dist

from megatron_apt.data import LatentShardReader

MARKER = "DATA-READER-DONE"


def read_epochs(reader: LatentShardReader, epochs: int) -> list[list[dict]]:
    """Per epoch, per micro-batch: sample ids, latent shape and captions."""
    return [
        [
            {
                "ids": b["sample_ids"].tolist(),
                "shape": list(b["latents"].shape),
                "text": list(b["text"].shape),
                "captions": b["captions"],
            }
            for b in reader
        ]
        for _ in range(epochs)
    ]


def resumed(index: str, rank: int, world: int, batch: int, k: int) -> list[list[int]]:
    """Ids of the batches after a state saved at step ``k`` (rest of epoch 0, then epoch 1)."""
    first = LatentShardReader(index, batch, dp_rank=rank, dp_size=world, seed=0, prefetch=2)
    it = iter(first)
    head = [next(it)["sample_ids"].tolist() for _ in range(k)]
    state = json.loads(json.dumps(first.state_dict()))
    second = LatentShardReader(index, batch, dp_rank=rank, dp_size=world, seed=0)
    second.load_state_dict(state)
    tail = [b["sample_ids"].tolist() for _ in range(2 - state["epoch"]) for b in second]
    return head + tail


def main(index: str, out: str, batch: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    make = lambda seed, **kw: LatentShardReader(
        index, batch, dp_rank=rank, dp_size=world, seed=seed, **kw
    )
    steps = len(make(0))
    result = {
        "rank": rank,
        "steps": steps,
        "seed0": read_epochs(make(0), 2),
        "seed0_again": read_epochs(make(0, prefetch=0), 2),
        "seed1": read_epochs(make(1, prefetch=4, num_workers=3), 1),
        "resumed": {k: resumed(index, rank, world, batch, k) for k in range(1, steps)},
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "ranks": gathered}, f)
    dist.barrier()
    dist.destroy_process_group()
    print(MARKER, flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("index")
    p.add_argument("out")
    p.add_argument("--batch-size", type=int, default=2)
    a = p.parse_args()
    main(a.index, a.out, a.batch_size)
