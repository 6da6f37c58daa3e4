"""Helpers shared by the tests, the benchmarks and the tools: tiny inputs and seeded weights."""

from megatron_apt.testing.fixtures import dummy_inputs, randomize_parameters

__all__ = ["dummy_inputs", "randomize_parameters"]
