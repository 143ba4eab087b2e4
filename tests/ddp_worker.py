"""`rbridge train` as torchrun launches it, recording the token rows each rank trains on.

Run by tests/test_ddp.py: ``torchrun --nproc_per_node 2 tests/ddp_worker.py RECORD_DIR train ...``.
Each batch a rank pulls is saved as ``RECORD_DIR/rank{r}_{i:05d}.npy`` before training uses it.
"""

import os
import sys
from pathlib import Path

import numpy as np

from rbridge_core import proxy
from rbridge_core.cli import main

record_dir = Path(sys.argv.pop(1))
real_iter = proxy.CorpusBatches.__iter__


def recording_iter(self):
    for i, batch in enumerate(real_iter(self)):
        np.save(record_dir / f"rank{self.rank}_{i:05d}.npy", batch.numpy())
        yield batch


proxy.CorpusBatches.__iter__ = recording_iter
sys.argv[0] = "rbridge"
os.environ.setdefault("OMP_NUM_THREADS", "1")
main()
