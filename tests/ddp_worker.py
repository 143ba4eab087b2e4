"""`rbridge train` as torchrun launches it, recording what each rank trains on and ends with.

Run by tests/test_ddp.py: ``torchrun --nproc_per_node 2 tests/ddp_worker.py RECORD_DIR train ...``.
Each batch a rank pulls is saved as ``RECORD_DIR/rank{r}_{i:05d}.npy`` before training uses it,
and each rank's weights after training as ``RECORD_DIR/rank{r}_final.safetensors``.
"""

import os
import sys
from pathlib import Path

import numpy as np
import safetensors.torch

from rbridge_core import proxy
from rbridge_core.checkpoints import unwrap
from rbridge_core.cli import main

record_dir = Path(sys.argv.pop(1))
real_iter = proxy.CorpusBatches.__iter__
real_train = proxy.train


def recording_iter(self):
    for i, batch in enumerate(real_iter(self)):
        np.save(record_dir / f"rank{self.rank}_{i:05d}.npy", batch.numpy())
        yield batch


def saving_train(model, *args, rank: int = 0, **kwargs):
    result = real_train(model, *args, rank=rank, **kwargs)
    safetensors.torch.save_model(unwrap(model), str(record_dir / f"rank{rank}_final.safetensors"))
    return result


proxy.CorpusBatches.__iter__ = recording_iter
proxy.train = saving_train
sys.argv[0] = "rbridge"
os.environ.setdefault("OMP_NUM_THREADS", "1")
main()
