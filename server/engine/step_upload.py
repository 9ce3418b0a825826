"""An eager step's integer inputs, host -> device in one copy.

The runner's host lists (token ids, positions, rows, block tables, sample rows) are packed into
one int32 buffer and copied once; the device tensors are views of that one copy. On CUDA the
buffer is pinned and reused, and the copy is asynchronous: the host queues the forward right
behind it instead of waiting for the GPU, as a copy from pageable memory would (one per list).
(Decode steps that replay a CUDA graph have their own static buffers: cuda_graphs.py.)
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from itertools import chain

import torch


class StepUpload:
    def __init__(self, device: torch.device):
        self.device = device
        self._cuda = device.type == "cuda"
        self._host = torch.empty(0, dtype=torch.int32)
        # the last copy out of `_host`: the next step refills it only after that copy has run
        self._copied = torch.cuda.Event() if self._cuda else None

    def __call__(self, parts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """parts: lists of ints, each in int32 range (OverflowError otherwise) -> one int32 device
        tensor [len(part)] per part, in order (views of one buffer). Host work O(total length)."""
        flat = array("i", chain.from_iterable(parts))
        sizes = [len(p) for p in parts]
        if not self._cuda:  # nothing to copy: the tensors are the packed buffer itself
            return list(torch.frombuffer(flat, dtype=torch.int32).split(sizes)) if flat else \
                [torch.empty(0, dtype=torch.int32) for _ in parts]
        n = len(flat)
        if not self._copied.query():  # normally done: it leads its step, whose predecessor was read back
            self._copied.synchronize()
        if self._host.numel() < n:
            self._host = torch.empty(max(n, 2 * self._host.numel()), dtype=torch.int32, pin_memory=True)
        if n:
            self._host[:n].copy_(torch.frombuffer(flat, dtype=torch.int32))
        dev = self._host[:n].to(self.device, non_blocking=True)
        self._copied.record()
        return list(dev.split(sizes))
