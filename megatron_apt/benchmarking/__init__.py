"""The library behind ``tools/benchmark.py``: timing harness (:mod:`.timing`), the workloads
timed (:mod:`.workloads`) and FLOP accounting + report (:mod:`.report`)."""
