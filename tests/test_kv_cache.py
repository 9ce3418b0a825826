"""The KV block allocator and its prefix cache (server/engine/kv_cache.py): blocks of computed
tokens are found again by a later sequence of the same tenant and adapter, never across them;
the last prompt token is always computed; free space is used before cached blocks, and cached
ones are evicted oldest first, a sequence's tail before its head. VTC charges only computed tokens. The engine over
it: tests/test_prefix_cache_engine.py."""

from __future__ import annotations

import pytest

from server.adapters.registry import AdapterRef
from server.engine.kv_cache import BlockAllocator
from server.engine.request import GenerationRequest, SamplingParams, Sequence

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BS = 4


def seq(tokens: list[int], tenant: str = "default", adapter: AdapterRef | None = None) -> Sequence:
    return Sequence.from_request(GenerationRequest("r", tokens, SamplingParams(), adapter=adapter, tenant=tenant))


def computed(alloc: BlockAllocator, s: Sequence) -> Sequence:
    """`s` admitted with its cached prefix, the rest of its prompt computed and registered."""
    alloc.take_prefix(s, alloc.cached_prefix(s))
    n = s.num_tokens - s.num_computed_tokens
    alloc.grow(s, n)
    s.num_computed_tokens += n
    alloc.cache_computed(s)
    return s


def test_a_computed_prefix_is_found_in_its_namespace_only():
    alloc = BlockAllocator(16, BS, prefix_caching=True)
    prompt = list(range(10, 21))  # 11 tokens: blocks [0, 4), [4, 8) full, 3 tokens in a third
    first = computed(alloc, seq(prompt))
    assert first.num_cached_blocks == 2 and alloc.num_cached == 2

    same = seq(prompt[:9] + [99, 98])  # the same two full blocks, then other tokens
    assert alloc.cached_prefix(same) == first.block_table[:2]
    assert alloc.cached_prefix(seq(prompt[:3] + [7] + prompt[4:])) == []  # differs in block 0
    assert alloc.cached_prefix(seq(prompt[:5] + [7] + prompt[6:])) == first.block_table[:1]
    v1, v2 = AdapterRef(None, "a", 1), AdapterRef(None, "a", 2)
    assert alloc.cached_prefix(seq(prompt, tenant="other")) == []
    assert alloc.cached_prefix(seq(prompt, adapter=v1)) == []
    computed(alloc, seq(prompt, adapter=v1))
    assert len(alloc.cached_prefix(seq(prompt, adapter=v1))) == 2
    assert alloc.cached_prefix(seq(prompt, adapter=v2)) == []  # a reloaded adapter's K/V differ

    # the last token is always computed: a prompt of exactly two blocks reuses one
    exact = seq(prompt[:8])
    assert alloc.cached_prefix(exact) == first.block_table[:1]
    alloc.take_prefix(exact, alloc.cached_prefix(exact))
    assert exact.num_computed_tokens == BS and exact.num_uncomputed_tokens == BS


def test_shared_blocks_are_held_until_their_last_holder_frees_them():
    alloc = BlockAllocator(8, BS, prefix_caching=True)
    a = computed(alloc, seq(list(range(9))))  # 3 blocks, 2 cached
    b = seq(list(range(8)) + [50, 51, 52, 53])
    prefix = alloc.cached_prefix(b)
    assert alloc.blocks_to_admit(b, prefix, 4) == 1  # held by a: only the third block is new
    computed(alloc, b)
    assert b.block_table[:2] == a.block_table[:2] and alloc.num_used == 4
    alloc.free(a)
    assert alloc.num_used == 3  # a's third block is free; the two shared ones b still holds
    alloc.free(b)
    assert alloc.num_used == 0 and alloc.num_free == 8 and alloc.num_cached == 3  # b's third block too
    c = seq(list(range(8)) + [50, 51, 52, 53, 54])
    prefix = alloc.cached_prefix(c)
    assert len(prefix) == 3 and alloc.blocks_to_admit(c, prefix, 1) == 3 + 1  # cached, held by none: used up


def test_empty_blocks_go_first_then_cached_ones_oldest_first_tail_before_head():
    alloc = BlockAllocator(6, BS, prefix_caching=True)
    a = computed(alloc, seq(list(range(9))))  # blocks a0 a1 cached, a2 not
    a_blocks = list(a.block_table)
    b = computed(alloc, seq(list(range(100, 109))))
    b_blocks = list(b.block_table)
    alloc.free(a)
    alloc.free(b)
    assert alloc.num_cached == 4 and alloc.num_free == 6
    s = seq(list(range(200, 224)))

    def take(blocks: int) -> None:  # `blocks` more blocks for s
        s.num_computed_tokens = len(s.block_table) * BS
        alloc.grow(s, blocks * BS)
    take(2)  # the two blocks holding nothing, before any cached one
    assert sorted(s.block_table) == sorted([a_blocks[2], b_blocks[2]]) and alloc.num_cached == 4
    take(1)  # a's tail cached block (a was freed first; its tail before its head)
    assert s.block_table[-1] == a_blocks[1] and alloc.num_cached == 3
    assert alloc.cached_prefix(seq(list(range(9)))) == a_blocks[:1]
    take(2)
    assert s.block_table[-2:] == [a_blocks[0], b_blocks[1]]
    assert alloc.cached_prefix(seq(list(range(9)))) == [] and alloc.num_cached == 1


def test_off_nothing_is_cached():
    alloc = BlockAllocator(8, BS)
    a = computed(alloc, seq(list(range(9))))
    assert alloc.num_cached == 0 and alloc.cached_prefix(seq(list(range(9)))) == []
    alloc.free(a)
    assert alloc.num_free == 8



def test_random_operations_keep_the_books_and_never_serve_another_content():
    """Random admissions (with their cached prefix), decodes, frees and cache resets over tiny
    pools: after each, reference counts equal the block tables holding each block, every idle block
    is free or evictable once, the digest maps are each other's inverse, a decode never writes a
    shared block, and a block found in the cache holds exactly the tokens (and tenant) asked for."""
    import random
    from collections import Counter

    for seed in range(300):
        rnd = random.Random(seed)
        bs = rnd.choice([1, 2, 4])
        alloc = BlockAllocator(rnd.randint(1, 12), bs, prefix_caching=True)
        written: dict[int, tuple] = {}  # block -> (tenant, the tokens whose K/V it holds)
        live: list[Sequence] = []
        common = [rnd.randint(0, 3) for _ in range(20)]
        for _ in range(150):
            r = rnd.random()
            if r < 0.3 and len(live) < 6:
                n = rnd.randint(1, 20)
                shared = common[:rnd.randint(0, n)]
                s = seq(shared + [rnd.randint(0, 3) for _ in range(n - len(shared))], tenant=rnd.choice("ab"))
                s.cache_epoch = alloc.epoch
                prefix = alloc.cached_prefix(s)
                need = alloc.blocks_to_admit(s, prefix, n - len(prefix) * bs)
                if not alloc.can_allocate(need):
                    continue
                free_before = alloc.num_free
                alloc.take_prefix(s, prefix)
                for i, b in enumerate(prefix):
                    assert written[b] == (s.request.tenant, tuple(s.token_ids[i * bs:(i + 1) * bs]))
                alloc.grow(s, n - s.num_computed_tokens)
                assert free_before - alloc.num_free == need
                for i in range(len(prefix), len(s.block_table)):
                    written[s.block_table[i]] = (s.request.tenant, tuple(s.token_ids[i * bs:(i + 1) * bs]))
                s.num_computed_tokens = n
                alloc.cache_computed(s)
                live.append(s)
            elif r < 0.5 and live:  # a decode: one more token computed
                s = rnd.choice(live)
                if not alloc.can_allocate(alloc.blocks_needed(s, 1)):
                    continue
                s.token_ids.append(rnd.randint(0, 3))
                alloc.grow(s, 1)
                i = s.num_computed_tokens // bs
                assert alloc._refs[s.block_table[i]] == 1
                written[s.block_table[i]] = (s.request.tenant, tuple(s.token_ids[i * bs:s.num_computed_tokens + 1]))
                s.num_computed_tokens += 1
                alloc.cache_computed(s)
            elif r < 0.8 and live:
                alloc.free(live.pop(rnd.randrange(len(live))))
            elif r < 0.82:
                alloc.forget_cached()
            holders = Counter(b for s in live for b in s.block_table)
            assert alloc._refs == [holders[b] for b in range(alloc.num_blocks)]
            assert sorted([*alloc._free, *alloc._evictable]) == [b for b in range(alloc.num_blocks) if not holders[b]]
            assert set(alloc._evictable) <= set(alloc._digest_of) and not set(alloc._free) & set(alloc._digest_of)
            assert {b: d for d, b in alloc._cached.items()} == alloc._digest_of


def test_vtc_charges_the_prompt_tokens_computed_not_those_the_cache_held():
    """A hit is not computed: VTC charges its tenant only the prompt tokens after the cached prefix
    (and the sampled token), as docs/architecture.md says; after a preemption nothing again."""
    from server.engine.policies import VTCPolicy
    from server.engine.scheduler import Scheduler, SchedulerOutput

    alloc = BlockAllocator(16, BS, prefix_caching=True)
    policy = VTCPolicy(input_weight=1.0, output_weight=2.0)
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=64, policy=policy)
    prompt = list(range(10, 21))  # 11 tokens: two full blocks
    computed(alloc, seq(prompt))  # computed before, by another sequence of the tenant
    s = seq(prompt)
    sched.add(s)
    chunk, = sched.schedule().chunks
    assert (chunk.start, chunk.num_tokens) == (2 * BS, 3)
    assert policy.counter["default"] == 3 * 1.0 + 2.0
    s.num_computed_tokens += 3  # the step ran
    sched._preempt(s, SchedulerOutput())
    chunk, = sched.schedule().chunks  # back, past the same cached prefix: its prompt was paid for
    assert (chunk.start, chunk.num_tokens) == (2 * BS, 3) and policy.counter["default"] == 5.0 + 2.0
