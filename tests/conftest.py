import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# gloo even where CUDA is visible: the CPU tests' tensors live on the CPU (tests/gpu build
# their models on CUDA without process groups)
os.environ.setdefault("MEGATRON_APT_BACKEND", "gloo")
os.environ.setdefault("PYTHONWARNINGS", "ignore")
# the fault-injection hooks (MEGATRON_APT_TEST_*) act only in the test suite's processes
os.environ.setdefault("MEGATRON_APT_TESTING", "1")
