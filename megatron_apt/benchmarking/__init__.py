"""The library behind ``tools/benchmark.py``: timing harness (:mod:`.timing`), the workloads
timed (:mod:`.workloads`), FLOP accounting + report (:mod:`.report`) and the device it runs on
(:mod:`.device`: a CUDA device always with its index)."""
