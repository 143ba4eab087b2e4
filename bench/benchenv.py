"""What every benchmark script shares: offline mode, import paths, and the machine it ran on.

Import it before transformers or tokenizers: it sets the offline variables they read at import,
and puts the repository (rbridge_core, flows, tasks) and tests/ (tinylm) on the path.
"""

import os
import platform
import sys
from pathlib import Path

# Everything runs offline: no hub look-ups from transformers, datasets or lm-eval.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT / "tests", REPO_ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def machine_info() -> dict:
    """Python, torch and its threads, the GPU if any, CPUs and the 1-minute load average."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "load_average_1m": os.getloadavg()[0],
    }
