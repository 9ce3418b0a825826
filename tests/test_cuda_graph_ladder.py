"""CUDA graphs' choices that need no model (server/engine/cuda_graphs.py): the ladder of batch
sizes, the padding choice, --cuda-graph-sizes and --enforce-eager, when graphs are off, and the
int32 guard; the graphs themselves: tests/test_cuda_graphs.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from server.cli import build_config, make_parser
from server.engine import cuda_graphs
from server.engine.cuda_graphs import batch_ladder, graph_size


def test_ladder_is_powers_to_eight_then_multiples_of_eight_capped():
    assert batch_ladder(1) == (1,)
    assert batch_ladder(3) == (1, 2, 3)
    assert batch_ladder(8) == (1, 2, 4, 8)
    assert batch_ladder(30) == (1, 2, 4, 8, 16, 24, 30)
    assert batch_ladder(128)[-3:] == (112, 120, 128) and len(batch_ladder(128)) == 4 + 15
    with pytest.raises(ValueError):
        batch_ladder(0)


def test_cuda_graph_sizes_replace_the_ladder_within_max_num_seqs():
    cfg = build_config(make_parser().parse_args(["serve", "--cuda-graph-sizes", "64, 1,8 8,256"]))
    assert cfg.model.cuda_graph_sizes == (1, 8, 64, 256)
    ladder = batch_ladder(256, cfg.model.cuda_graph_sizes)
    assert ladder == (1, 8, 64, 256)
    assert [graph_size(ladder, b) for b in (1, 2, 9, 64, 65, 256, 257)] == [1, 8, 64, 64, 256, 256, None]
    for bad in ((1, 512), (0, 8), ()):
        with pytest.raises(ValueError, match="each size must be between 1 and --max-num-seqs"):
            batch_ladder(256, bad)
    for text in ("0,8", "eight", ""):
        with pytest.raises(ValueError):
            build_config(make_parser().parse_args(["serve", "--cuda-graph-sizes", text]))


def test_a_batch_replays_the_smallest_size_that_holds_it():
    ladder = batch_ladder(30)
    assert [graph_size(ladder, b) for b in (1, 2, 3, 5, 8, 9, 17, 24, 25, 30)] == [1, 2, 4, 8, 8, 16, 24, 24, 30, 30]
    assert graph_size(ladder, 31) is None


def test_graphs_are_off_unless_cuda_with_graph_safe_backends():
    class B:
        def __init__(self, name):
            self.name = name

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert cuda_graphs.unavailable(cuda, B("triton"), B("triton"), False) is None
    assert cuda_graphs.unavailable(cuda, B("triton"), None, False) is None  # --no-lora
    assert cuda_graphs.unavailable(cuda, B("triton"), B("triton"), True) == "--enforce-eager"
    assert "not CUDA" in cuda_graphs.unavailable(cpu, B("triton"), B("triton"), False)
    assert "torch attention backend is not graph-safe" in cuda_graphs.unavailable(cuda, B("torch"), None, False)
    assert "torch LoRA backend is not graph-safe" in cuda_graphs.unavailable(cuda, B("triton"), B("torch"), False)


def test_a_cache_with_more_slots_than_int32_indexes_is_refused():
    """A graph's inputs travel as int32 (KV slots included, cast to int64 inside the graph): a
    cache whose scratch slot is past int32 must be refused at start, not wrap at a replay."""
    model = SimpleNamespace(device=torch.device("cpu"))
    with pytest.raises(ValueError, match="int32"):
        cuda_graphs.DecodeGraphs(model, SimpleNamespace(block_size=16), None, None, None, ladder=(1,),
                                 max_model_len=64, scratch_block=2 ** 27, capture=False)


def test_enforce_eager_flag_reaches_the_config(monkeypatch):
    parser = make_parser()
    assert build_config(parser.parse_args(["serve"])).model.enforce_eager is False
    assert build_config(parser.parse_args(["serve", "--enforce-eager"])).model.enforce_eager is True
    monkeypatch.setenv("LORAMUX_ENFORCE_EAGER", "1")
    assert build_config(parser.parse_args(["serve"])).model.enforce_eager is True
