"""An eager step's inputs in one host -> device copy (server/engine/step_upload.py)."""

from __future__ import annotations

import pytest
import torch

from server.engine.step_upload import StepUpload


def test_parts_come_back_in_order_as_int32_views():
    up = StepUpload(torch.device("cpu"))
    ids, empty, tables, rows = up([[5, 6, 7], [], [1, 2, 3, 4, 5, 6], [2]])
    assert ids.tolist() == [5, 6, 7] and empty.numel() == 0 and rows.tolist() == [2]
    assert tables.view(2, 3).tolist() == [[1, 2, 3], [4, 5, 6]]
    assert {t.dtype for t in (ids, empty, tables, rows)} == {torch.int32}
    assert [t.numel() for t in up([[], []])] == [0, 0]


def test_a_value_out_of_int32_range_is_refused():
    with pytest.raises(OverflowError):
        StepUpload(torch.device("cpu"))([[1], [2 ** 31]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_upload_is_one_copy_from_a_reused_pinned_buffer():
    """Each step's tensors hold its own values even when the next step refills the pinned
    buffer at once (the copy out of it is waited for first). Each copy is queued behind ~5 ms
    of GPU work (as behind a step's forward), so the host is ahead of it when it refills."""
    up = StepUpload(torch.device("cuda"))
    up([list(range(4096))])  # grows the pinned buffer once
    buffer = up._host
    got = []
    for step in range(5):
        torch.cuda._sleep(10_000_000)  # cycles: the copy below waits behind it on the stream
        got.append(up([[step] * 1000, list(range(step, step + 7))]))
    assert up._host is buffer and buffer.is_pinned()
    for step, (a, b) in enumerate(got):
        assert a.device.type == "cuda" and a.dtype == torch.int32
        assert a.tolist() == [step] * 1000 and b.tolist() == list(range(step, step + 7))


def test_an_eager_steps_kv_slots_are_int64_past_int32():
    """Block ids and positions travel as int32; each token's cache slot (block * block_size +
    offset) is computed from them on the device, where it must be int64: a cache of more than
    2^31 slots' worth of block ids (ids near 2^27 at 16 tokens a block) would wrap otherwise."""
    from types import SimpleNamespace

    from server.engine.model_runner import ModelRunner
    from server.engine.request import GenerationRequest, SamplingParams, Sequence
    from server.engine.scheduler import ScheduledChunk

    class Prepared(Exception):
        pass

    class Attention:  # stops the step where the runner hands its batch to the attention backend
        def prepare(self, batch):
            raise Prepared(batch)

    bs, far = 16, 2 ** 27 + 5  # far * bs > 2^31 - 1
    seqs = [Sequence.from_request(GenerationRequest(f"s{i}", list(range(2, 2 + n)), SamplingParams()))
            for i, n in enumerate((20, 3))]
    seqs[0].block_table, seqs[1].block_table = [far, far + 1], [7]
    runner = ModelRunner(SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(block_size=bs), None,
                         attention=Attention())
    with pytest.raises(Prepared) as got:
        runner.execute([ScheduledChunk(seqs[0], 0, 20), ScheduledChunk(seqs[1], 1, 2)])
    slots = got.value.args[0].slot_mapping
    assert slots.dtype == torch.int64
    assert slots.tolist() == [far * bs + p for p in range(16)] + [(far + 1) * bs + p for p in range(4)] \
        + [7 * bs + 1, 7 * bs + 2]
