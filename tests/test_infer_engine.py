"""The inference runtime against the model definition; the engine; batching and continuous batching."""

from __future__ import annotations

import pytest
import torch

from geb.infer.engine import Engine
from geb.infer.runtime import SlotCache, runtime_from_model
from geb.infer.sampling import SamplingParams
from geb.model import GEB


def peaky_model(cfg, seed=0):
    """A random model whose next-token distributions are sharp (trained models' are): top-2 logit gaps
    are then far above the rounding of any format, so greedy comparisons test logic, not ties."""
    torch.manual_seed(seed)
    m = GEB(cfg)
    m.init_weights(seed=seed)
    with torch.no_grad():
        m.lm_head.weight.mul_(40.0)
        m.tok_emb.weight.mul_(20.0)
    return m.eval()


def greedy_reference(model, prompt, n, stop_ids=()):
    """Greedy decoding by full forward passes of the GEB module (no cache at all)."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids]))[0, -1].argmax())
            if t in stop_ids:
                break
            out.append(t)
            ids.append(t)
    return out


@pytest.mark.parametrize("kw", [{}, {"rope_style": "interleaved", "rope_dims": 8}, {"tie_embeddings": True}])
def test_runtime_matches_model_prefill_and_decode(tiny_cfg, kw):
    cfg = tiny_cfg.replace(**kw)
    m = peaky_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (30,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(ids[None])[0]
    rt = runtime_from_model(m, "fp32")
    torch.testing.assert_close(rt.forward_logits(ids), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # prefill 7, decode the rest one at a time: cached decode equals the full forward
    cache = SlotCache(cfg, 2, 40)
    got = [rt.prefill(ids[:7], cache, 0)]
    for t in range(7, 30):
        got.append(rt.decode(ids[t : t + 1], cache)[0])
    torch.testing.assert_close(torch.stack(got), ref[6:], rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # chunked prefill (later chunks attend to the cached part) equals one pass
    cache = SlotCache(cfg, 1, 40)
    chunked = rt.prefill(ids, cache, 0, all_logits=True, chunk=8)
    torch.testing.assert_close(chunked, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4"])
def test_prefill_rows_equals_each_row_alone(tiny_cfg, fmt):
    """Several rows in one pass (the scorer's batch), each continuing its own slot after a shared prefix
    (or none), give each row's logits as that row prefilled alone does."""
    rt = runtime_from_model(peaky_model(tiny_cfg), fmt)
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, tiny_cfg.vocab_size, (6,), generator=g).tolist()
    rows = [torch.randint(0, tiny_cfg.vocab_size, (n,), generator=g).tolist() for n in (9, 3, 14, 1)]
    for pre in ([], prefix):
        alone = []
        for r in rows:
            cache = SlotCache(tiny_cfg, 1, 40)
            if pre:
                rt.prefill(pre, cache, 0)
            alone.append(rt.prefill(r, cache, 0, all_logits=True))
        cache = SlotCache(tiny_cfg, len(rows), 40)
        for slot in range(len(rows)):
            if pre:
                rt.prefill(pre, cache, slot)
        positions = [list(range(len(r))) if i % 2 == 0 else [len(r) - 1] for i, r in enumerate(rows)]
        got = rt.prefill_rows(rows, cache, list(range(len(rows))), positions)
        assert cache.lengths == [len(pre) + len(r) for r in rows]
        for a, b, pos in zip(alone, got, positions):
            if fmt != "fp32" and rt.backend == "native":  # the core's integer kernels: each row alike
                assert torch.equal(b, a[pos])  # whatever the row count
            else:  # one GEMM over all rows: BLAS blocking may reorder sums
                torch.testing.assert_close(b, a[pos], rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_batched_decode_rows_at_different_depths(tiny_cfg):
    m = peaky_model(tiny_cfg)
    rt = runtime_from_model(m, "fp32")
    ids = torch.randint(0, tiny_cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(ids[None])[0]
    cache = SlotCache(tiny_cfg, 3, 32)
    for slot, n in enumerate((5, 12, 2)):
        rt.prefill(ids[:n], cache, slot)
    out = rt.decode(torch.stack([ids[5], ids[12], ids[2]]), cache)
    torch.testing.assert_close(out, ref[[5, 12, 2]], rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert cache.lengths == [6, 13, 3]
    cache.swap(0, 1)  # sequences change slots (the scheduler does this): decode follows them
    out = rt.decode(torch.stack([ids[13], ids[6]]), cache)
    torch.testing.assert_close(out, ref[[13, 6]], rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_engine_greedy_equals_full_forward_loop(tiny_cfg, tokenizer):
    m = peaky_model(tiny_cfg)
    eng = Engine(m, tokenizer)
    prompt = tokenizer.encode("The capital of France")
    p = SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.0)
    got = list(eng.generate_ids(prompt, p))
    assert got == greedy_reference(m, prompt, 12, set(tokenizer.stop_ids))
    assert len(got) > 0


@pytest.mark.parametrize("fmt,tol", [("bf16", 0.02), ("int8", 0.02), ("int4", 0.12)])
def test_formats_close_to_fp32(tiny_cfg, tokenizer, fmt, tol):
    """Stated tolerances, relative to the largest |logit|: bf16 and int8 2%, int4 (group 32) 12%."""
    m = peaky_model(tiny_cfg)
    ids = tokenizer.encode("水在海平面上一百摄氏度沸腾。The capital of France is Paris.")
    ref = runtime_from_model(m, "fp32").forward_logits(ids)
    got = runtime_from_model(m, fmt).forward_logits(ids)
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert err < tol, f"{fmt}: max logit error {err:.4f} of the logit scale"
    # and the format really is in use (not silently fp32)
    assert err > 0


def test_int8_greedy_equals_fp32(tiny_cfg, tokenizer):
    m = peaky_model(tiny_cfg)
    p = SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=1.0)
    for text in ("The capital of France", "北京是中国的首都"):
        prompt = tokenizer.encode(text)
        ref = Engine(m, tokenizer).generate(prompt, p)
        got = Engine(m, tokenizer, format="int8").generate(prompt, p)
        assert got.ids == ref.ids and len(ref.ids) > 0


def _alone(eng, prompt, p):
    return eng.generate(prompt, p)


def test_batch_generation_equals_one_by_one(tiny_cfg, tokenizer):
    m = peaky_model(tiny_cfg)
    eng = Engine(m, tokenizer)
    prompts = ["The capital of France", "北京是中国的首都。长城", "Water", "def add(a, b):\n    return"]
    ps = [SamplingParams(max_new_tokens=10, temperature=0, repetition_penalty=1.0),
          SamplingParams(max_new_tokens=14, temperature=0.8, top_k=0, top_p=1.0, seed=3),
          SamplingParams(max_new_tokens=6, temperature=0, repetition_penalty=1.3),
          SamplingParams(max_new_tokens=9, temperature=1.0, seed=11)]
    batch = eng.generate_batch(prompts, ps)
    queued = eng.generate_batch(prompts, ps, max_batch=2)  # later prompts wait for a free slot
    for prompt, p, b, q in zip(prompts, ps, batch, queued):
        one = _alone(eng, prompt, p)
        assert (b.ids, b.text, b.finish_reason) == (one.ids, one.text, one.finish_reason)
        assert q.ids == one.ids
    assert any(len(b.ids) > 1 for b in batch)


def test_request_joining_running_batch_matches_alone(tiny_cfg, tokenizer):
    m = peaky_model(tiny_cfg)
    eng = Engine(m, tokenizer)
    pa = SamplingParams(max_new_tokens=20, temperature=0, repetition_penalty=1.0, stop_ids=[])
    pb = SamplingParams(max_new_tokens=8, temperature=0.7, seed=5, stop_ids=[])
    pc = SamplingParams(max_new_tokens=30, temperature=0, stop_ids=[])
    a_ids, b_ids, c_ids = (tokenizer.encode(t) for t in ("Water boils at", "春眠不觉晓", "In 2024, 3 cats"))
    be = eng.batch_engine(max_batch=3, max_len=64)
    ra = be.submit(a_ids, pa)
    rc = be.submit(c_ids, pc)
    for _ in range(4):
        be.step()
    assert len(ra.ids) == 5 and not ra.done  # step 1: prefill token + one decode; then one each
    rb = be.submit(b_ids, pb)  # joins at the next step, while a and c are mid-generation
    be.step()
    assert rb.slot >= 0 and len(rb.ids) >= 1
    be.cancel(rc.id)  # c leaves mid-way: its slot is reused, the others must not notice
    seen_streams = {ra.id: "", rb.id: ""}
    while be.has_work:
        for ev in be.step():
            if ev.request.id in seen_streams:
                seen_streams[ev.request.id] += ev.text
    assert rc.finish_reason == "cancelled" and len(rc.ids) < 30
    assert ra.ids == list(eng.generate_ids(a_ids, pa))
    assert rb.ids == list(eng.generate_ids(b_ids, pb))
    assert ra.finish_reason == rb.finish_reason == "length"
    assert be.cache.lengths == [0, 0, 0] and not be.active


def test_stop_strings_and_utf8_in_stream(tiny_cfg, tokenizer):
    from geb.infer.batch import TextStream

    ids = tokenizer.encode("春眠不觉晓，处处闻啼鸟。The end. More")
    ts = TextStream(tokenizer, stop=["The end"])
    pieces = [ts.push(t) for t in ids]
    assert ts.stopped
    assert "".join(pieces) == "春眠不觉晓，处处闻啼鸟。"
    assert not any("\ufffd" in p for p in pieces)
    ts = TextStream(tokenizer)
    text = "".join(ts.push(t) for t in ids) + ts.finish()
    assert text == tokenizer.decode(ids)


def test_engine_restores_thread_count(tiny_cfg, tokenizer):
    """Generation (one sequence or a batch) gives the process back its torch thread count: the runtime
    drops torch to one thread during decode steps, and training after a batched evaluation (the
    quickstart's SFT and DPO) ran at half speed when that leaked."""
    m = peaky_model(tiny_cfg)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # anything but the 1 thread decode steps use
        eng = Engine(m, tokenizer, threads=1)
        eng.generate("Water", SamplingParams(max_new_tokens=3, temperature=0))
        assert torch.get_num_threads() == 2
        eng.generate_batch(["Water", "The sun"], SamplingParams(max_new_tokens=3, temperature=0))
        assert torch.get_num_threads() == 2
        be = eng.batch_engine(max_batch=2)
        be.submit(tokenizer.encode("Water"), SamplingParams(max_new_tokens=3, temperature=0))
        be.run()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_chunked_prefill_in_the_scheduler_matches_alone(tiny_cfg, tokenizer):
    """Prompts prefilled a few tokens per step, while others decode; one is cancelled mid-prefill."""
    m = peaky_model(tiny_cfg)
    eng = Engine(m, tokenizer)
    texts = ["The capital of France is Paris. Paris is known for", "Water", "北京是中国的首都。长城是世界上最长的",
             "def add(a, b):\n    return a + b  # code", "In 2024, 3 cats and 12 dogs lived on"]
    ps = [SamplingParams(max_new_tokens=n, temperature=t, seed=i, stop_ids=[])
          for i, (n, t) in enumerate([(9, 0), (12, 0.9), (7, 0), (10, 0.5), (8, 0)])]
    prompts = [tokenizer.encode(t) for t in texts]
    be = eng.batch_engine(max_batch=3, max_len=64, prefill_chunk=3)
    reqs = [be.submit(prompts[0], ps[0]), be.submit(prompts[1], ps[1])]
    be.step()
    assert reqs[0]._prefilled == 3 and not reqs[0].ids  # a 3-token slice of the long prompt, no token yet
    reqs += [be.submit(x, p) for x, p in zip(prompts[2:], ps[2:])]  # two wait in the queue
    victim = be.submit(prompts[0], ps[0])
    be.step()
    be.cancel(victim.id)
    be.run()
    assert victim.finish_reason == "cancelled"
    for r, x, p in zip(reqs, prompts, ps):
        assert r.ids == list(eng.generate_ids(x, p)), r.id
        assert r.finish_reason == "length"
    assert not be.active and not be.prefilling and be.cache.lengths == [0, 0, 0]


@pytest.mark.parametrize("fmt", ["fp32", "int4"])
def test_a_prompt_is_cut_at_the_same_positions_under_load(tiny_cfg, tokenizer, fmt):
    """Batch invariance of prefill: where a prompt's chunks start must not depend on the requests queued
    before it (chunk products depend on their row count), so its tokens equal the server's answer alone."""
    eng = Engine(peaky_model(tiny_cfg), tokenizer, format=fmt)
    p = SamplingParams(max_new_tokens=6, temperature=0, stop_ids=[])
    first, second = tokenizer.encode("Water boils at 100 C"), tokenizer.encode("The capital of France is Paris and")
    assert len(first) % 4 and len(second) > 8  # the first prompt ends mid-chunk

    def run(prompts):
        be = eng.batch_engine(max_batch=2, max_len=64, prefill_chunk=4)
        slices: list[list[int]] = []
        prefill = be.rt.prefill

        def spy(ids, cache, slot=0, **kw):
            slices.append(list(ids))
            return prefill(ids, cache, slot, **kw)

        be.rt.prefill = spy
        try:
            reqs = [be.submit(x, p) for x in prompts]
            be.run()
        finally:
            del be.rt.prefill
        cuts, pos = [], 0  # the lengths of the slices that make up the last prompt, in order
        for sl in slices:
            if sl == second[pos : pos + len(sl)]:
                cuts.append(len(sl))
                pos += len(sl)
        assert pos == len(second)
        return reqs[-1].ids, cuts

    alone_ids, alone_cuts = run([second])
    loaded_ids, loaded_cuts = run([first, second])
    assert alone_cuts[:-1] == [4] * (len(alone_cuts) - 1)
    assert loaded_cuts == alone_cuts
    assert loaded_ids == alone_ids
