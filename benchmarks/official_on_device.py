"""The reference runner (../shared/anchors/run_official.py) on a CUDA device, as the reference's own
bin/run_patchcore.py runs with --gpu 0 and without --faiss_on_gpu: backbone, patch features and coreset on the GPU,
the k-NN in faiss on the CPU.

    python benchmarks/official_on_device.py cuda ../shared/anchors/run_official.py DATA_ROOT CATEGORY P [options]

The runner asks the reference for its device with ``patchcore.utils.set_torch_device([])``, which means the CPU;
this wrapper makes that call return DEVICE and then runs the runner unchanged, so every other step is its own.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    device, runner, *arguments = sys.argv[1:]
    sys.path.insert(0, str(Path(runner).resolve().parent / "patchcore-inspection" / "src"))
    import patchcore.utils  # noqa: PLC0415  (the reference's package, found through the path above)

    patchcore.utils.set_torch_device = lambda gpu_ids: torch.device(device)
    sys.argv = [runner, *arguments]
    runpy.run_path(runner, run_name="__main__")


if __name__ == "__main__":
    main()
