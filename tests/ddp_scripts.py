"""Shared pieces of the scripts that the DDP tests run in a subprocess (2 gloo processes)."""

#: Appended to every DDP test script. Without an explicit teardown, gloo's threads can abort a
#: process at interpreter exit ("terminate called without an active exception", exit code -6)
#: after all of its work is done, which fails the test on the return code alone.
DDP_TEARDOWN = """

import torch.distributed as _dist

if _dist.is_available() and _dist.is_initialized():
    _dist.barrier()
    _dist.destroy_process_group()
"""
