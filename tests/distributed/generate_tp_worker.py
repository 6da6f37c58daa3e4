"""Worker for test_generate_tp: tools/generate.py's ``main`` on every rank under torchrun (the
DiT tensor-parallel over all ranks; rank 0 encodes, decodes and writes)."""

import importlib.util
import sys

from megatron_apt.testing.launch import REPO_ROOT


def load_tool():
    spec = importlib.util.spec_from_file_location("generate_tool", REPO_ROOT / "tools/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    rc = load_tool().main(sys.argv[1:])
    if rc == 0:
        print("GENERATE-TP-DONE", flush=True)
    sys.exit(rc)
