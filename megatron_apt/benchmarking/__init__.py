"""The library behind ``tools/benchmark.py``: timing harness (:mod:`.timing`), the workloads
timed (:mod:`.workloads`), diffusers' twin of each model family (:mod:`.twins`: SD3 of the same
size, Wan2.1 with our weights), FLOP accounting + report (:mod:`.report`) and the device it runs
on (:mod:`.device`: a CUDA device always with its index)."""
