"""Serving-engine replay: vLLM's and SGLang's attention call patterns under a simulated scheduler.

A seeded scheduler admits requests, runs chunked prefill and decode steps (vLLM: prefill chunks and
single-token decodes in one batch; SGLang: extend and decode batches), shares full prefix pages
between requests (prefix / radix cache hits) and frees finished requests, whose pages go back to the
free list NaN-poisoned. Each step writes the new tokens' K/V into the cache with a plain index_put
(vLLM's reshape_and_cache, SGLang's set_kv_buffer), calls triflash as the engine's FlashAttention
backend does, and compares every output row with attention_ref on each request's own keys (kept apart
from the cache) under SPEC.md §6. Poisoned pages, the NaN null page and -1 / stale page-table entries
past each sequence's used pages must never reach an output.

- vLLM: one tensor per layer with K and V interleaved per block, ``(num_blocks, 2, block_size, Hk, D)``
  (or HND within a block), seen as vLLM's ``(2, num_blocks, ...)`` and unbound into non-contiguous
  k/v caches; block 0 is the null block; a persistent block table whose rows are reused and condensed
  (stale tails), q a strided view of the qkv projection, ``out=`` a slice of a larger buffer.
- SGLang: separate K and V token pools, page size 1 (a shuffled token-slot table, ``req_to_token``)
  or 16 (the strided page table), through ``flash_attn_with_kvcache`` or ``flash_attn_varlen_func``.

CPU tier: tiny shapes through the interpreter, a few steps. GPU tier: 200 steps at batch 1, 16 and 64
with Hk 8 and 1, and decode CUDA graphs for batch sizes 1..256 captured once and replayed.
"""

import random
from collections import Counter, deque
from dataclasses import dataclass, field

import pytest
import torch
from tolerance import assert_close

from triflash import attention_ref, flash_attn_varlen_func, flash_attn_with_kvcache
from triflash.compat import vllm

NAN = float("nan")
SENTINEL = 3.0  # output rows past the step's tokens: must stay untouched


@dataclass(frozen=True)
class Case:
    """One attention layer and the traffic that drives it."""

    h: int
    hk: int
    d: int
    dtype: torch.dtype
    steps: int
    max_batch: int  # max running requests (vLLM max_num_seqs)
    token_budget: int  # tokens per step (max_num_batched_tokens)
    chunk: int  # most prompt tokens of one request per step (chunked prefill)
    prompt: tuple  # prompt length range
    decode: tuple  # generated tokens range
    page_size: int = 16
    window: int = 0  # sliding window in tokens (0 = none): window_size (window - 1, 0)
    sink: bool = False
    softcap: float = 0.0
    scale: float = 0.0  # 0 = 1 / sqrt(d)
    prefix_prob: float = 0.5
    splits: int = 0  # vLLM: max_num_splits for batches of at most `graph_tokens` tokens (its CUDA-graph sizes)
    graph_tokens: int = 0
    layout: str = "nhd"  # vLLM: "nhd" (num_blocks, 2, bs, Hk, D) or "hnd" (num_blocks, 2, Hk, bs, D)
    api: str = "kvcache"  # SGLang: "kvcache" or "varlen"
    seed: int = 0

    @property
    def softmax_scale(self):
        return self.scale or self.d ** -0.5

    @property
    def window_size(self):
        return (self.window - 1, 0) if self.window else (-1, -1)

    @property
    def max_total(self):
        return self.prompt[1] + self.decode[1]


@dataclass
class Req:
    rid: int
    prompt: int
    total: int
    k: torch.Tensor  # (total, Hk, D): every key this request writes, the reference's source
    v: torch.Tensor
    computed: int = 0  # tokens whose K/V are in the cache
    pages: list = field(default_factory=list)
    row: int = -1  # SGLang req_to_token row


class PagePool:
    """Pages 1..n-1 (page 0 is the null / padding page, never handed out), shuffled, ref-counted for
    shared prefixes; a page whose last reference goes is NaN-poisoned and queued at either end."""

    def __init__(self, num_pages, rng, poison):
        free = list(range(1, num_pages))
        rng.shuffle(free)
        self.free = deque(free)
        self.refs = [0] * num_pages
        self.freed_once = set()
        self.poison = poison
        self.rng = rng
        self.reused = 0

    def alloc(self, n):
        assert len(self.free) >= n, "page pool exhausted: the test sized the cache too small"
        pages = [self.free.popleft() for _ in range(n)]
        for p in pages:
            self.refs[p] = 1
            self.reused += p in self.freed_once
        return pages

    def share(self, pages):
        for p in pages:
            self.refs[p] += 1

    def release(self, pages):
        dead = []
        for p in pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                dead.append(p)
        if dead:
            self.poison(dead)
            self.freed_once.update(dead)
            self.rng.shuffle(dead)
            for p in dead:  # vLLM's queue reuses freed blocks last, SGLang's allocator may reuse them first
                if self.rng.random() < 0.5:
                    self.free.appendleft(p)
                else:
                    self.free.append(p)


class Scheduler:
    """Admits requests, schedules chunked prefill and decode under a token budget, frees finished ones.

    ``mixed=True`` is vLLM v1 (running requests first, then new ones, all in one batch);
    ``mixed=False`` is SGLang (an extend batch or a decode batch each step).
    """

    def __init__(self, case, pool, device, mixed):
        self.case, self.pool, self.device, self.mixed = case, pool, device, mixed
        self.rng = random.Random(case.seed)
        self.gen = torch.Generator(device=device).manual_seed(case.seed)
        self.running = []
        self.next_rid = 0
        self.stats = Counter()

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.float32).to(self.case.dtype)

    def _new_request(self):
        c, ps = self.case, self.case.page_size
        prompt = self.rng.randint(*c.prompt)
        total = prompt + self.rng.randint(*c.decode)
        req = Req(self.next_rid, prompt, total, self.randn(total, c.hk, c.d), self.randn(total, c.hk, c.d))
        self.next_rid += 1
        donors = [r for r in self.running if r.computed >= ps]
        if donors and self.rng.random() < c.prefix_prob:
            donor = self.rng.choice(donors)
            most = min(donor.computed // ps, (prompt - 1) // ps)  # at least one prompt token is computed
            if most > 0:
                m = self.rng.randint(1, most)
                req.k[:m * ps], req.v[:m * ps] = donor.k[:m * ps], donor.v[:m * ps]
                req.pages = donor.pages[:m]
                self.pool.share(req.pages)
                req.computed = m * ps
                self.stats["shared"] += 1
        return req

    def schedule(self):
        c = self.case
        prefill_work = len(self.running) < c.max_batch or any(r.computed < r.prompt for r in self.running)
        decode_work = any(r.computed >= r.prompt for r in self.running)
        extend = prefill_work and (not decode_work or self.rng.random() < 0.5)
        budget, batch = c.token_budget, []
        for r in self.running:
            in_prefill = r.computed < r.prompt
            if budget == 0:
                break
            if not self.mixed and in_prefill != extend:
                continue
            n = min(r.prompt - r.computed, c.chunk, budget) if in_prefill else 1
            batch.append((r, n))
            budget -= n
        if self.mixed or extend:
            while budget > 0 and len(self.running) < c.max_batch:
                r = self._new_request()
                self.running.append(r)
                n = min(r.prompt - r.computed, c.chunk, budget)
                batch.append((r, n))
                budget -= n
        for r, n in batch:
            need = -(-(r.computed + n) // c.page_size) - len(r.pages)
            if need > 0:
                r.pages = r.pages + self.pool.alloc(need)
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(batch))
        kinds = {n > 1 or r.computed + n <= r.prompt for r, n in batch}  # True: a prefill chunk
        self.stats["mixed"] += len(kinds) == 2
        self.stats["decode_only"] += kinds == {False}
        return batch

    def complete(self, batch):
        """Advance the scheduled requests; returns the finished ones (their pages already released)."""
        done = []
        for r, n in batch:
            r.computed += n
            if r.computed == r.total:
                self.running.remove(r)
                self.pool.release(r.pages)
                r.pages = []
                done.append(r)
        self.stats["finished"] += len(done)
        return done


def _slots(batch, ps, start_of):
    """(pages, offsets, token-major K, V) of positions [start_of(r), computed + n) of every request."""
    pages, offs, ks, vs = [], [], [], []
    for r, n in batch:
        lo, hi = start_of(r), r.computed + n
        pos = torch.arange(lo, hi)
        pages.append(torch.tensor(r.pages, dtype=torch.long)[pos // ps])
        offs.append(pos % ps)
        ks.append(r.k[lo:hi])
        vs.append(r.v[lo:hi])
    return torch.cat(pages), torch.cat(offs), torch.cat(ks), torch.cat(vs)


def _tail_stats(stats, table, lens, ps):
    """Count page-table entries past each sequence's used pages: -1 and stale / null page ids."""
    table = table.cpu()
    used = (lens.cpu().long() + ps - 1) // ps
    tail = torch.arange(table.shape[1]).view(1, -1) >= used.view(-1, 1)
    stats["tail_neg"] += int((table[tail] < 0).sum())
    stats["tail_stale"] += int((table[tail] >= 0).sum())


def _cu(lens, device):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


class Engine:
    """The parts both engines share: NaN-poisoned pages, and a check that attention leaves the cache alone."""

    caches = ()

    def poison(self, pages):
        idx = torch.tensor(pages, device=self.device)
        for cache in self.paged_views():
            cache[idx] = NAN

    def finish(self, req):
        pass

    def call(self, fn, untouched):
        """Runs the attention call ``fn``; with ``untouched`` the caches must be bitwise unchanged by it."""
        before = [t.clone() for t in self.caches] if untouched else None
        with torch.no_grad():
            res = fn()
        for old, new in zip(before or (), self.caches):
            torch.testing.assert_close(new, old, rtol=0, atol=0, equal_nan=True, msg="the call wrote the cache")
        return res


class VllmEngine(Engine):
    """vLLM v1's FlashAttention backend (one layer): its KV layout, persistent batch and exact call."""

    def __init__(self, case, device):
        c = self.case = case
        bs = c.page_size
        self.device = device
        self.max_blocks = -(-c.max_total // bs) + 2  # block table width: past every request's last block
        self.num_pages = c.max_batch * self.max_blocks + 8
        shape = (self.num_pages, 2, c.hk, bs, c.d) if c.layout == "hnd" else (self.num_pages, 2, bs, c.hk, c.d)
        self.kv_phys = torch.full(shape, NAN, dtype=c.dtype, device=device)  # every block starts free: NaN
        self.caches = (self.kv_phys,)
        kv_cache = self.kv_phys.permute(1, 0, 2, 3, 4)  # vLLM's logical (2, num_blocks, ...) shape
        if c.layout == "hnd":
            kv_cache = kv_cache.transpose(2, 3)
        self.key_cache, self.value_cache = kv_cache.unbind(0)  # (num_blocks, bs, Hk, D), non-contiguous
        assert not self.key_cache.is_contiguous() and self.key_cache.shape == (self.num_pages, bs, c.hk, c.d)
        self.bt_cpu = torch.full((c.max_batch, self.max_blocks), -1, dtype=torch.int32)  # InputBatch.block_table
        self.bt_cpu[1::2] = 0  # rows not used yet: -1 in half of them, the null block in the other half
        self.bt_dev = torch.empty_like(self.bt_cpu, device=device)
        self.rows = [None] * c.max_batch
        tokens = c.token_budget + 8  # vLLM pads a step's tokens to a CUDA-graph size
        self.qkv = torch.empty(tokens, (c.h + 2 * c.hk) * c.d, dtype=c.dtype, device=device)
        self.output = torch.empty(tokens, c.h, c.d, dtype=c.dtype, device=device)
        self.one = torch.ones(1, dtype=torch.float32, device=device)  # layer._q_scale / _k_scale / _v_scale

    def paged_views(self):
        return (self.kv_phys,)

    def _update_rows(self, batch):
        """InputBatch: drop unscheduled requests, add new ones into holes, condense, write block ids."""
        ids = {r.rid for r, _ in batch}
        self.rows = [r if r is not None and r.rid in ids else None for r in self.rows]
        present = {r.rid for r in self.rows if r is not None}
        for r, _ in batch:
            if r.rid not in present:
                self.rows[self.rows.index(None)] = r
        while None in self.rows:  # condense: the last row moves into the first hole, its used entries only
            hole = self.rows.index(None)
            last = max(i for i, r in enumerate(self.rows) if r is not None)
            if last < hole:
                break
            self.rows[hole], self.rows[last] = self.rows[last], None
        order = self.rows[:len(batch)]
        for i, r in enumerate(order):
            self.bt_cpu[i, :len(r.pages)] = torch.tensor(r.pages, dtype=torch.int32)
        n_of = {r.rid: n for r, n in batch}
        return [(r, n_of[r.rid]) for r in order]

    def step(self, batch, stats, gen, untouched):
        c, dev = self.case, self.device
        batch = self._update_rows(batch)
        num_reqs, hd, kd = len(batch), c.h * c.d, c.hk * c.d
        q_lens, seq_lens = [n for _, n in batch], [r.computed + n for r, n in batch]
        num_tokens = sum(q_lens)
        # The qkv projection's output (tokens past num_tokens are padding: NaN here); q is a strided view.
        pages, offs, k_new, v_new = _slots(batch, c.page_size, lambda r: r.computed)
        self.qkv.fill_(NAN)
        self.qkv[:num_tokens, :hd] = torch.randn(num_tokens, hd, generator=gen, device=dev).to(c.dtype)
        self.qkv[:num_tokens, hd:hd + kd] = k_new.reshape(num_tokens, kd)
        self.qkv[:num_tokens, hd + kd:] = v_new.reshape(num_tokens, kd)
        query = self.qkv[:, :hd].view(-1, c.h, c.d)
        key = self.qkv[:, hd:hd + kd].view(-1, c.hk, c.d)
        value = self.qkv[:, hd + kd:].view(-1, c.hk, c.d)
        # reshape_and_cache_flash: slot_mapping = (block, offset) of every new token.
        pages, offs = pages.to(dev), offs.to(dev)
        self.key_cache[pages, offs] = key[:num_tokens]
        self.value_cache[pages, offs] = value[:num_tokens]
        # FlashAttentionMetadataBuilder: the block table rows of this batch, copied to the device.
        self.bt_dev[:num_reqs].copy_(self.bt_cpu[:num_reqs])
        block_table = self.bt_dev[:num_reqs]
        cu_seqlens_q = _cu(q_lens, dev)
        seqused_k = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
        max_num_splits = c.splits if num_tokens <= c.graph_tokens else 0
        stats["split_steps"] += max_num_splits > 1
        descale_shape = (cu_seqlens_q.shape[0] - 1, c.hk)
        _tail_stats(stats, block_table, seqused_k, c.page_size)
        self.output.fill_(SENTINEL)
        self.output[:num_tokens] = NAN

        def attend():  # FlashAttentionImpl.forward
            return vllm.flash_attn_varlen_func(
                q=query[:num_tokens], k=self.key_cache, v=self.value_cache, out=self.output[:num_tokens],
                cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max(q_lens), seqused_k=seqused_k,
                max_seqlen_k=max(seq_lens), softmax_scale=c.softmax_scale, causal=True, alibi_slopes=None,
                window_size=c.window_size, block_table=block_table, softcap=c.softcap, scheduler_metadata=None,
                fa_version=3, q_descale=self.one.expand(descale_shape), k_descale=self.one.expand(descale_shape),
                v_descale=self.one.expand(descale_shape), num_splits=max_num_splits, s_aux=self.sinks)

        res = self.call(attend, untouched)
        assert res.data_ptr() == self.output.data_ptr(), "out= was not written in place"
        assert (self.output[num_tokens:] == SENTINEL).all(), "wrote past out[:num_tokens]"
        return batch, query[:num_tokens], self.output[:num_tokens], None


class SglangEngine(Engine):
    """SGLang's FlashAttention backend (one layer): token-slot pools, req_to_token and its call."""

    def __init__(self, case, device):
        c = self.case = case
        ps = c.page_size
        self.device = device
        self.max_ctx = (-(-c.max_total // ps) + 2) * ps
        self.num_pages = c.max_batch * (self.max_ctx // ps) + 8
        self.k_buffer = torch.full((self.num_pages * ps, c.hk, c.d), NAN, dtype=c.dtype, device=device)
        self.v_buffer = torch.full_like(self.k_buffer, NAN)
        self.caches = (self.k_buffer, self.v_buffer)
        self.req_to_token = torch.zeros(c.max_batch, self.max_ctx, dtype=torch.int32, device=device)
        self.free_rows = list(range(c.max_batch))
        self.strided = torch.arange(0, self.max_ctx, ps, device=device)

    def paged_views(self):
        c = self.case
        return (self.k_buffer.view(-1, c.page_size, c.hk, c.d), self.v_buffer.view(-1, c.page_size, c.hk, c.d))

    def finish(self, req):
        self.free_rows.append(req.row)  # its req_to_token row keeps its (now stale) slots

    def step(self, batch, stats, gen, untouched):
        c, ps, dev = self.case, self.case.page_size, self.device
        fresh = set()
        for r, _ in batch:
            if r.row < 0:
                r.row = self.free_rows.pop(0)
                fresh.add(r.rid)
        # req_to_token: the cached prefix on admission and the new tokens' slots; then set_kv_buffer.
        start = {r.rid: 0 if r.rid in fresh else r.computed for r, _ in batch}
        pages, offs, _, _ = _slots(batch, ps, lambda r: start[r.rid])
        rows = torch.cat([torch.full((r.computed + n - start[r.rid],), r.row) for r, n in batch])
        pos = torch.cat([torch.arange(start[r.rid], r.computed + n) for r, n in batch])
        self.req_to_token[rows.to(dev), pos.to(dev)] = (pages * ps + offs).to(torch.int32).to(dev)
        pages, offs, k_new, v_new = _slots(batch, ps, lambda r: r.computed)
        out_cache_loc = (pages * ps + offs).to(dev)
        self.k_buffer[out_cache_loc] = k_new
        self.v_buffer[out_cache_loc] = v_new
        # FlashAttentionBackend.init_forward_metadata.
        q_lens, seq_lens = [n for _, n in batch], [r.computed + n for r, n in batch]
        max_k = max(seq_lens)
        req_pool_indices = torch.tensor([r.row for r, _ in batch], device=dev)
        cache_seqlens = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
        cu_seqlens_q = _cu(q_lens, dev)
        page_table = self.req_to_token[req_pool_indices, :max_k]
        if ps > 1:
            page_table = page_table[:, self.strided[:-(-max_k // ps)]] // ps
        _tail_stats(stats, page_table, cache_seqlens, ps)
        q = torch.randn(sum(q_lens), c.h * c.d, generator=gen, device=dev).to(c.dtype).view(-1, c.h, c.d)
        key_cache = self.k_buffer.view(-1, ps, c.hk, c.d)
        value_cache = self.v_buffer.view(-1, ps, c.hk, c.d)
        flags = dict(softmax_scale=c.softmax_scale, causal=True, window_size=c.window_size, softcap=c.softcap,
                     learnable_sink=self.sinks, return_lse=True)
        if c.api == "kvcache":
            def attend():
                return flash_attn_with_kvcache(q, key_cache, value_cache, page_table=page_table,
                                               cache_seqlens=cache_seqlens, cu_seqlens_q=cu_seqlens_q,
                                               max_seqlen_q=max(q_lens), **flags)
        else:
            def attend():
                return flash_attn_varlen_func(q, key_cache, value_cache, cu_seqlens_q=cu_seqlens_q,
                                              max_seqlen_q=max(q_lens), seqused_k=cache_seqlens,
                                              max_seqlen_k=max_k, page_table=page_table, **flags)
        out, lse = self.call(attend, untouched)
        return batch, q, out, lse


def check_step(case, batch, q, out, lse, sinks, ref_fp64):
    """One step's output (and LSE) vs attention_ref on each request's own keys, SPEC §6.

    Decodes and prefill chunks are referenced as two packed batches (one padded batch would blow the
    decodes up to the longest chunk); the rule is applied to the whole step at once.
    """
    assert not torch.isnan(out).any(), "NaN in the output: a poisoned page or a bad table entry was read"
    dev = q.device
    starts = [0, *torch.tensor([n for _, n in batch]).cumsum(0).tolist()]
    work = torch.float64 if ref_fp64 else torch.float32
    ref_out, pt_out = torch.empty(out.shape, dtype=work, device=dev), torch.empty_like(out)
    ref_lse = torch.empty(case.h, out.shape[0], dtype=torch.float32, device=dev)
    pt_lse = torch.empty_like(ref_lse)
    kw = dict(softmax_scale=case.softmax_scale, causal=True, window_size=case.window_size, softcap=case.softcap,
              learnable_sink=sinks)
    for group in ([i for i, (_, n) in enumerate(batch) if n == 1], [i for i, (_, n) in enumerate(batch) if n > 1]):
        if not group:
            continue
        reqs = [batch[i] for i in group]
        tok = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in group]).to(dev)
        ctx = [r.computed + n for r, n in reqs]
        k = torch.cat([r.k[:m] for (r, _), m in zip(reqs, ctx)])
        v = torch.cat([r.v[:m] for (r, _), m in zip(reqs, ctx)])
        seq = dict(cu_seqlens_q=_cu([n for _, n in reqs], dev), cu_seqlens_k=_cu(ctx, dev),
                   max_seqlen_q=max(n for _, n in reqs), max_seqlen_k=max(ctx))
        r_out, r_lse = attention_ref(q[tok], k, v, **seq, **kw, fp64=ref_fp64)
        p_out, p_lse = attention_ref(q[tok], k, v, **seq, **kw, upcast=False, reorder_ops=True)
        ref_out[tok], pt_out[tok], ref_lse[:, tok], pt_lse[:, tok] = r_out, p_out, r_lse, p_lse.float()
    assert_close("out", out, ref_out, pt_out)
    if lse is not None:
        assert_close("lse", lse, ref_lse, pt_lse)


def replay(engine_cls, case, device):
    """Runs the scheduler for ``case.steps`` steps, checking every step; returns the coverage counters."""
    engine = engine_cls(case, device)
    pool = PagePool(engine.num_pages, random.Random(case.seed + 1), engine.poison)
    sched = Scheduler(case, pool, device, mixed=engine_cls is VllmEngine)
    gen = torch.Generator(device=device).manual_seed(case.seed + 2)
    engine.sinks = torch.randn(case.h, generator=gen, device=device) + 1.0 if case.sink else None
    cpu = device == "cpu"
    for step in range(case.steps):
        batch = sched.schedule()
        assert batch, f"step {step}: nothing scheduled"
        batch, q, out, lse = engine.step(batch, sched.stats, gen, untouched=cpu)
        try:
            check_step(case, batch, q, out, lse, engine.sinks, ref_fp64=cpu)
        except AssertionError as e:
            raise AssertionError(f"step {step}: q lens {[n for _, n in batch]}, kv lens "
                                 f"{[r.computed + n for r, n in batch]}: {e}") from e
        for r in sched.complete(batch):
            engine.finish(r)
    sched.stats["reused_pages"] = pool.reused
    return sched.stats


# ---------------------------------------------------------------- CPU tier (interpreter, tiny shapes)

def _cpu(**kw):
    base = dict(h=4, d=32, dtype=torch.float16, steps=10, token_budget=20, chunk=12, prompt=(1, 36), decode=(1, 3),
                splits=3, graph_tokens=4)
    return Case(**{**base, **kw})


VLLM_CPU = {
    "b1-hk2-plain": _cpu(hk=2, max_batch=1, seed=3),
    "b4-hk2-window-sink-softcap": _cpu(hk=2, max_batch=4, window=8, sink=True, softcap=4.0, scale=0.5, seed=2),
    "b4-hk1-plain": _cpu(hk=1, max_batch=4, seed=3),
    "b3-hk1-window-sink": _cpu(hk=1, max_batch=3, window=6, sink=True, seed=4),
    "b2-hk2-softcap-hnd-bf16": _cpu(hk=2, max_batch=2, softcap=3.0, scale=0.4, layout="hnd", dtype=torch.bfloat16,
                                    seed=12),
}

SGLANG_CPU = {
    "ps1-b4-hk2-kvcache-window-sink": _cpu(hk=2, max_batch=4, page_size=1, window=7, sink=True, seed=6),
    "ps1-b3-hk1-varlen-softcap": _cpu(hk=1, max_batch=3, page_size=1, softcap=4.0, scale=0.5, api="varlen", seed=7),
    "ps16-b4-hk2-kvcache-plain": _cpu(hk=2, max_batch=4, page_size=16, seed=12),
    "ps16-b2-hk1-varlen-window-sink-softcap": _cpu(hk=1, max_batch=2, page_size=16, window=9, sink=True,
                                                   softcap=4.0, scale=0.5, api="varlen", seed=12),
}


def _assert_coverage(stats, case, engine):
    """The replay exercised what it claims: full batches, finished requests whose poisoned pages came
    back, stale table entries, prefix sharing, and prefill chunks mixed with decodes (vLLM) or decode
    batches next to extend batches (SGLang)."""
    assert stats["peak_batch"] == case.max_batch, stats
    assert stats["finished"] > 0 and stats["reused_pages"] > 0, stats
    assert stats["tail_stale"] > 0, stats
    if engine == "vllm":
        assert stats["tail_neg"] > 0 and stats["split_steps"] > 0, stats
    if case.max_batch > 1:
        assert stats["shared"] > 0, stats
        assert stats["mixed" if engine == "vllm" else "decode_only"] > 0, stats


@pytest.mark.parametrize("name", list(VLLM_CPU))
def test_vllm_replay(name, device):
    case = VLLM_CPU[name]
    _assert_coverage(replay(VllmEngine, case, device), case, "vllm")


@pytest.mark.parametrize("name", list(SGLANG_CPU))
def test_sglang_replay(name, device):
    case = SGLANG_CPU[name]
    _assert_coverage(replay(SglangEngine, case, device), case, "sglang")


# ---------------------------------------------------------------- GPU tier (200 steps, model sizes)

def _gpu(**kw):
    base = dict(d=128, dtype=torch.bfloat16, steps=200, token_budget=512, chunk=128, prompt=(1, 640),
                decode=(1, 96), splits=32, graph_tokens=128, prefix_prob=0.3)
    return Case(**{**base, **kw})


GPU_FEATURES = {"plain": {}, "window-sink-softcap": dict(window=128, sink=True, softcap=10.0, scale=0.2)}
GPU_HEADS = {8: 32, 1: 8}  # Hk -> H: GQA 4 (Llama-3-8B) and MQA 8


@pytest.mark.gpu
@pytest.mark.parametrize("features", list(GPU_FEATURES))
@pytest.mark.parametrize("hk", [8, 1], ids=lambda hk: f"hk{hk}")
@pytest.mark.parametrize("batch", [1, 16, 64], ids=lambda b: f"b{b}")
def test_vllm_replay_gpu(batch, hk, features, device):
    case = _gpu(h=GPU_HEADS[hk], hk=hk, max_batch=batch, seed=batch + hk, **GPU_FEATURES[features])
    _assert_coverage(replay(VllmEngine, case, device), case, "vllm")


SGLANG_GPU = {
    "ps1-b64-hk8-kvcache-window-sink-softcap": dict(page_size=1, max_batch=64, hk=8, seed=39,
                                                    **GPU_FEATURES["window-sink-softcap"]),
    "ps1-b16-hk1-varlen-plain": dict(page_size=1, max_batch=16, hk=1, api="varlen", seed=24),
    "ps16-b16-hk8-varlen-plain": dict(page_size=16, max_batch=16, hk=8, api="varlen", seed=25),
    "ps16-b64-hk1-kvcache-window-sink-softcap": dict(page_size=16, max_batch=64, hk=1, seed=40,
                                                     **GPU_FEATURES["window-sink-softcap"]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SGLANG_GPU))
def test_sglang_replay_gpu(name, device):
    kw = SGLANG_GPU[name]
    case = _gpu(h=GPU_HEADS[kw["hk"]], **kw)
    _assert_coverage(replay(SglangEngine, case, device), case, "sglang")


# ---------------------------------------------------------------- decode with persistent buffers, CUDA graphs

class DecodeBuffers:
    """vLLM-style persistent decode inputs sized for the largest batch; batch b reads their first b rows.

    The cache is one tensor with K and V interleaved per page (page 0 the null page), NaN everywhere
    except each sequence's first ``lens[i]`` tokens; table entries past a sequence's pages are -1 or
    stale ids (some of them pages of other sequences).
    """

    def __init__(self, max_batch, h, hk, d, page_size, max_pages, num_splits, device, dtype):
        self.page_size, self.max_pages, self.num_splits = page_size, max_pages, num_splits
        self.num_pages = max_batch * max_pages + 1
        self.kv = torch.full((self.num_pages, 2, page_size, hk, d), NAN, dtype=dtype, device=device)
        self.k_cache, self.v_cache = self.kv[:, 0], self.kv[:, 1]
        self.q = torch.zeros(max_batch, 1, h, d, dtype=dtype, device=device)
        self.k = torch.zeros(max_batch, 1, hk, d, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.table = torch.zeros(max_batch, max_pages, dtype=torch.int32, device=device)
        self.out = torch.zeros_like(self.q)

    def decode(self, b, out=None):
        """One decode step of the first b sequences: append k/v at lens, attend over lens + 1 keys."""
        return flash_attn_with_kvcache(self.q[:b], self.k_cache, self.v_cache, self.k[:b], self.v[:b],
                                       cache_seqlens=self.lens[:b], page_table=self.table[:b], causal=True,
                                       num_splits=self.num_splits, out=self.out[:b] if out is None else out)

    def refill(self, b, gen):
        """New lengths, page tables, cache contents and q/k/v for the first b rows, all in place."""
        dev, ps, mp = self.kv.device, self.page_size, self.max_pages
        lens = torch.randint(0, mp * ps, (b,), generator=gen, device=dev)  # room for the appended token
        lens[0] = mp * ps - 1  # a full row
        if b > 1:
            lens[1] = 0  # an empty one
        need = (lens + ps) // ps  # pages for lens + 1 tokens
        pages = (torch.randperm(self.num_pages - 1, generator=gen, device=dev)[:b * mp] + 1).view(b, mp)
        stale = torch.randint(0, self.num_pages, (b, mp), generator=gen, device=dev)
        neg = torch.rand(b, mp, generator=gen, device=dev) < 0.5
        tail = torch.arange(mp, device=dev).view(1, -1) >= need.view(-1, 1)
        table = torch.where(tail, torch.where(neg, -1, stale), pages).to(torch.int32)
        self.kv.fill_(NAN)
        pos = torch.arange(mp * ps, device=dev).view(1, -1)
        valid = pos < lens.view(-1, 1)
        page_of = table.long().gather(1, (pos // ps).expand(b, -1))[valid]
        slot_of = (pos % ps).expand(b, -1)[valid]
        hk, d = self.k_cache.shape[-2:]
        for cache in (self.k_cache, self.v_cache):
            cache[page_of, slot_of] = torch.randn(len(page_of), hk, d, generator=gen, device=dev).to(cache.dtype)
        self.lens[:b].copy_(lens)
        self.table[:b].copy_(table)
        for x in (self.q, self.k, self.v):
            x[:b].normal_(generator=gen)

    def check(self, b, out, ref_fp64):
        """``out`` (b, 1, H, D) of a decode step vs attention_ref on the gathered cache; the append landed."""
        assert not torch.isnan(out).any(), "NaN in the output: a poisoned page or a bad table entry was read"
        ps = self.page_size
        lens, table = self.lens[:b].long(), self.table[:b].long()
        rows = torch.arange(b, device=lens.device)
        page, slot = table[rows, lens // ps], lens % ps
        assert torch.equal(self.k_cache[page, slot], self.k[:b, 0]), "k not appended at cache_seqlens"
        assert torch.equal(self.v_cache[page, slot], self.v[:b, 0]), "v not appended at cache_seqlens"
        used = lens + 1
        width = -(-int(used.max()) // ps) * ps
        pos = torch.arange(width, device=lens.device).view(1, -1)
        valid = pos < used.view(-1, 1)
        page_of = torch.where(valid, table.gather(1, (pos // ps).expand(b, -1)), 0)
        kd, vd = (torch.where(valid[..., None, None], c[page_of, (pos % ps).expand(b, -1)], 0)
                  for c in (self.k_cache, self.v_cache))
        kw = dict(seqused_k=used.to(torch.int32), causal=True)
        ref, _ = attention_ref(self.q[:b], kd, vd, **kw, fp64=ref_fp64)
        pt, _ = attention_ref(self.q[:b], kd, vd, **kw, upcast=False, reorder_ops=True)
        assert_close("out", out, ref, pt)


def test_decode_buffers_rerun(device):
    """The CUDA-graph test's decode step, eager: persistent buffers sliced per batch size, lengths and
    tables changed in place between calls, identical calls bitwise equal, rows past b untouched."""
    gen = torch.Generator(device=device).manual_seed(0)
    buf = DecodeBuffers(4, 4, 2, 32, 16, 3, 2, device, torch.float16)
    for b in (4, 1, 3):
        buf.refill(b, gen)
        rest = buf.out[b:].clone()
        buf.decode(b)
        first = buf.out[:b].clone()
        buf.check(b, first, ref_fp64=True)
        buf.decode(b)
        assert torch.equal(buf.out[:b], first), f"b={b}: rerun differs"
        assert torch.equal(buf.out[b:], rest), f"b={b}: wrote rows past the batch"


GRAPH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def _graph_round(buf, graph, b, gen, eager):
    """Refill the inputs in place, replay, check; replay again (bitwise equal); optionally vs eager."""
    buf.refill(b, gen)
    rest = buf.out[b:].clone()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    graph.replay()
    assert torch.cuda.memory_allocated() == before and torch.cuda.max_memory_allocated() == before, \
        f"b={b}: the replay allocated memory"
    first = buf.out[:b].clone()
    buf.check(b, first, ref_fp64=False)
    graph.replay()  # identical inputs: the append rewrites the same slots with the same values
    assert torch.equal(buf.out[:b], first), f"b={b}: two replays on identical inputs differ"
    assert torch.equal(buf.out[b:], rest), f"b={b}: the replay wrote rows past its batch"
    if eager:
        out = torch.empty_like(first)
        buf.decode(b, out=out)
        assert torch.equal(out, first), f"b={b}: eager call differs from the replay"


@pytest.mark.gpu
def test_cuda_graph_decode_replay(device):
    """Decode graphs for batch sizes 1..256 captured once (largest first, one memory pool, as vLLM does)
    over shared persistent buffers, then replayed in shuffled order while cache_seqlens, the page table,
    the cache and q/k/v change in place: every replay within SPEC §6 of attention_ref, two replays on
    identical inputs bitwise equal (and equal to the eager call), device memory flat across replays."""
    gen = torch.Generator(device=device).manual_seed(0)
    buf = DecodeBuffers(max(GRAPH_SIZES), 32, 8, 128, 16, 32, 4, device, torch.bfloat16)
    buf.refill(max(GRAPH_SIZES), gen)
    torch.cuda.set_sync_debug_mode("error")  # the step must not sync the host (capture would break)
    try:
        for b in GRAPH_SIZES:  # warm-up: compiles every kernel outside the capture
            buf.decode(b)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    pool = torch.cuda.graph_pool_handle()
    graphs = {}
    for b in sorted(GRAPH_SIZES, reverse=True):
        graphs[b] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[b], pool=pool):
            buf.decode(b)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    order = GRAPH_SIZES + GRAPH_SIZES
    random.Random(0).shuffle(order)
    seen = set()
    for b in order:
        assert torch.cuda.memory_allocated() == base, f"memory grew before the replay of b={b}"
        _graph_round(buf, graphs[b], b, gen, eager=b not in seen)
        seen.add(b)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == base, "memory grew across replays"
