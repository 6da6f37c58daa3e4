"""Process-group set-up: launcher environment parsing and errors before any collective."""

import pytest

from megatron_apt.parallel import state


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1)),
        (
            {
                "OMPI_COMM_WORLD_RANK": "2",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            },
            (2, 4, 0),
        ),
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, (1, 2, 0)),
        ({}, None),
    ],
)
def test_rank_discovery_from_launcher_env(monkeypatch, env, expected):
    for var in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "PMI_RANK",
        "PMI_SIZE",
        "MPI_LOCALRANKID",
    ):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert state._rank_env() == expected


@pytest.mark.parametrize(
    "tp, cp, match",
    [(2, 1, "world size 1 is not divisible by tensor_parallel_size=2"), (0, 1, "must be >= 1")],
)
def test_impossible_parallel_sizes_fail_before_any_collective(tp, cp, match):
    with pytest.raises(ValueError, match=match):
        state.initialize_parallel(tensor_parallel_size=tp, context_parallel_size=cp)


def test_single_process_state_is_world_of_one():
    ps = state.single_process_state()
    assert (ps.tp_size, ps.dp_size, ps.cp_size, ps.world_size) == (1, 1, 1, 1)
    assert ps.tp_group.size() == 1 and not ps.sequence_parallel
