import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# gloo even where CUDA is visible: the CPU tests' tensors live on the CPU (tests/gpu build
# their models on CUDA without process groups)
os.environ.setdefault("MEGATRON_APT_BACKEND", "gloo")
os.environ.setdefault("PYTHONWARNINGS", "ignore")
