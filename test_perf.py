"""Tests for the speed work of issue 7: the static-cache decoder (VLM.generate / StaticDecoder), GPU-side
sampling, bench.py's CPU smoke run, and (on a CUDA machine only) the csrc kernels and the CUDA-graph
decode step against float64 / eager references.

Oracles: a cache-free greedy loop over the full forward (no KV cache at all), torch.multinomial for the
sampling rule, float64 references for the kernels. No timing assertions.
Naming: helpers start with `_perf_` (this file is merged into test_skinflow.py).
"""
import json

import pytest
import torch

import skinflow as sf


def _perf_tiny(seed=0):
    return sf.VLM(sf.Config.preset("tiny"), seed=seed).eval()


def _perf_batch(cfg, seed, B=4, T=11, pads=(0, 3, 0, 6)):
    """Left-padded random text prompts [B, T] (ordinary tokens only) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 700, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads[:B]):
        mask[b, :p] = 0
    ids[mask == 0] = cfg.pad_token_id
    return ids, mask


def _perf_greedy_oracle(model, ids, mask, n, stops):
    """Greedy decoding WITHOUT any cache: every step runs the full causal forward over prompt + tokens so
    far. Returns tokens, mask, log-probs (at temperature 1) in the Generation layout."""
    B = ids.shape[0]
    toks = torch.full((B, n), model.cfg.pad_token_id)
    m = torch.zeros(B, n)
    lps = torch.zeros(B, n)
    done = torch.zeros(B, dtype=torch.bool)
    cur, cur_mask = ids, mask
    for k in range(n):
        with torch.no_grad():
            logits = model(cur, cur_mask)[:, -1].float()                     # [B, V]
        lp = torch.log_softmax(logits.double(), -1)
        tok = logits.argmax(-1)
        live = ~done
        toks[:, k] = torch.where(live, tok, torch.full_like(tok, model.cfg.pad_token_id))
        m[:, k] = live.float()
        lps[:, k] = torch.where(live, lp.gather(1, tok[:, None])[:, 0].float(), torch.zeros(B))
        done |= live & torch.isin(tok, torch.tensor(stops))
        if bool(done.all()):
            return toks[:, :k + 1], m[:, :k + 1], lps[:, :k + 1]
        cur = torch.cat([cur, toks[:, k:k + 1]], 1)
        cur_mask = torch.cat([cur_mask, torch.ones(B, 1, dtype=cur_mask.dtype)], 1)
    return toks, m, lps


# ---------------------------------------------------------------------------------------------------
# CPU: the graph-free static decoder
# ---------------------------------------------------------------------------------------------------
def test_perf_static_decoder_equals_cache_free_greedy():
    """Greedy tokens, mask and log-probs of the static decoder equal a cache-free full-recompute loop,
    including a row that stops early (stop token kept with mask 1, pads after) and early exit of the loop."""
    model = _perf_tiny(seed=4)
    ids, mask = _perf_batch(model.cfg, seed=1)
    free = model.generate(ids, mask, max_new_tokens=9, greedy=True)
    stop = int(free.tokens[1, 2])                                            # row 1 stops at step <= 2
    stops = [model.cfg.eos_token_id, stop]
    want = _perf_greedy_oracle(model, ids, mask, 9, stops)
    got = model.generate(ids, mask, max_new_tokens=9, greedy=True, stop_ids=[stop])
    assert got.mask[1].sum() <= 3 and got.mask[1, int(got.mask[1].sum()) - 1] == 1
    assert torch.equal(got.tokens, want[0]) and torch.equal(got.mask, want[1])
    assert (got.logprobs - want[2]).abs().max() <= 1e-5


def test_perf_sync_every_does_not_change_results():
    """Checking "all stopped?" only every k steps (fewer host syncs) runs extra pad-only steps; the
    returned Generation must be identical to checking every step, sampled and greedy, with early stops."""
    model = _perf_tiny(seed=5)
    ids, mask = _perf_batch(model.cfg, seed=2)
    probe = model.generate(ids, mask, max_new_tokens=12, greedy=True)
    stops = sorted({int(probe.tokens[b, 1]) for b in range(ids.shape[0])})  # every row stops by step 1
    for kw in (dict(greedy=True), dict(temperature=0.8, top_p=0.9)):
        outs = [model.generate(ids, mask, max_new_tokens=12, stop_ids=stops, sync_every=k,
                               generator=torch.Generator().manual_seed(3), **kw) for k in (1, 5, 64)]
        for o in outs[1:]:
            assert torch.equal(o.tokens, outs[0].tokens) and torch.equal(o.mask, outs[0].mask)
            assert torch.equal(o.logprobs, outs[0].logprobs)
        if kw.get("greedy"):
            assert outs[0].tokens.shape[1] <= 2      # the early exit really happened (L < max_new_tokens)


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_perf_gpu_sampling_rule_equals_multinomial(top_p):
    """VLM._choose draws with the exponential race (no host sync); with the same generator state it must
    pick exactly what torch.multinomial picks (over the top-p-truncated, sorted distribution)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=g) * 2.5
    for seed in range(4):
        tok, lp = sf.VLM._choose(logits, 0.9, top_p, False, torch.Generator().manual_seed(seed))
        ref_gen = torch.Generator().manual_seed(seed)
        logp = torch.log_softmax(logits / 0.9, -1)
        p = logp.exp()
        if top_p < 1.0:
            sp, si = p.sort(-1, descending=True)
            sp = sp * ((sp.cumsum(-1) - sp) < top_p)
            ref = si.gather(1, torch.multinomial(sp, 1, generator=ref_gen))[:, 0]
        else:
            ref = torch.multinomial(p, 1, generator=ref_gen)[:, 0]
        assert torch.equal(tok, ref)
        torch.testing.assert_close(lp, logp.gather(1, ref[:, None])[:, 0])


def test_perf_generate_argument_errors():
    model = _perf_tiny()
    ids, mask = _perf_batch(model.cfg, seed=3)
    with pytest.raises(ValueError, match="CUDA"):
        model.generate(ids, mask, max_new_tokens=2, cuda_graph=True)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, mask, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ids, mask[:, 1:], max_new_tokens=2)


def test_perf_bench_cpu_smoke(tmp_path, monkeypatch):
    """`python bench.py --cpu-smoke` runs every section at tiny shapes, all its correctness checks pass,
    and it writes the JSON and the table (this keeps the GPU benchmark from rotting on CPU-only CI)."""
    import bench

    monkeypatch.setenv("SKINFLOW_NO_EXT", "1")   # no compile inside this test; the kernels have their own tests
    assert bench.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    assert set(res["sections"]) == set(bench.Bench.SECTIONS) and not res["errors"]
    assert res["checks"] and all(c["ok"] for c in res["checks"])
    assert res["sections"]["decode"]["b4"]["eager_ms"] > 0
    assert "| decode step" in (tmp_path / "bench.md").read_text()


# ---------------------------------------------------------------------------------------------------
# CUDA only (skipped on CPU): kernels vs float64, CUDA-graph decoding vs eager
# ---------------------------------------------------------------------------------------------------
_perf_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@_perf_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_perf_cuda_logprob_kernel_vs_float64(dtype):
    """csrc/logprob_cuda.cu forward and backward vs float64 at Qwen's vocabulary (and a ragged one), with
    a masked (-inf) entry and a dominant logit; output buffers are checked for NaN (unwritten memory)."""
    import rl

    if rl._logprob_ext() is None:
        pytest.fail("logprob extension did not build on this CUDA machine: "
                    + str(sf.EXTENSION_ERRORS.get("logprob")))
    g = torch.Generator(device="cuda").manual_seed(7)
    for N, V in ((67, 151936), (9, 1001)):
        x = (torch.randn(N, V, generator=g, device="cuda") * 4).to(dtype)
        x[0, :3] = float("-inf")
        x[1, 11] = 50.0
        y = torch.randint(3, V, (N,), generator=g, device="cuda")
        gout = torch.randn(N, generator=g, device="cuda")
        xl = x.clone().requires_grad_(True)
        lp = rl.selective_log_softmax(xl, y, impl="ext")
        (lp * gout).sum().backward()
        xd = x.double()
        ref = torch.log_softmax(xd, -1).gather(1, y[:, None])[:, 0]
        dref = (torch.nn.functional.one_hot(y, V).double() - torch.softmax(xd, -1)) * gout.double()[:, None]
        assert torch.isfinite(lp).all() and torch.isfinite(xl.grad).all()
        assert float((lp.double() - ref).norm() / ref.norm()) < 1e-5
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        assert float((xl.grad.double() - dref).norm() / dref.norm()) < tol


@_perf_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perf_cuda_fdlinear_op_vs_float64(dtype):
    """csrc/fdlinear_cuda.cu (mix on load) forward, dx, da, dbases vs a float64 per-image loop, at the
    real d_in 1280 / d_out 3420 with ragged images (one of a single token) and K = 4."""
    import dve

    ext = dve._extension()
    if ext is None or not (hasattr(ext, "has_cuda") and ext.has_cuda()):
        pytest.fail("fdlinear extension with CUDA did not build: " + str(sf.EXTENSION_ERRORS.get("fdlinear")))
    g = torch.Generator(device="cuda").manual_seed(3)
    K, d_in, d_out = 4, 1280, 3420
    lengths = [70, 1, 133]
    cu = torch.tensor([0, 70, 71, 204], device="cuda")
    x = torch.randn(204, d_in, generator=g, device="cuda", dtype=torch.float64)
    a = torch.rand(3, K, generator=g, device="cuda", dtype=torch.float64) * 2
    bases = torch.randn(K, d_out, d_in, generator=g, device="cuda", dtype=torch.float64) * 0.03
    dy = torch.randn(204, d_out, generator=g, device="cuda", dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, bases)]
    W = torch.einsum("nk,koi->noi", leaves[1], leaves[2])                      # [n, d_out, d_in]
    want = torch.cat([leaves[0][s:s + n] @ W[b].T for b, (s, n) in enumerate(zip([0, 70, 71], lengths))])
    want_grads = torch.autograd.grad((want * dy).sum(), leaves)
    xx, aa, bb = (t.to(dtype).requires_grad_(True) for t in (x, a, bases))
    y = dve.mix_apply(xx, cu, aa, bb, impl="kernel")
    got_grads = torch.autograd.grad((y * dy.to(dtype)).sum(), [xx, aa, bb])
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for name, got, ref in zip(("y", "dx", "da", "dbases"), [y, *got_grads], [want, *want_grads]):
        assert torch.isfinite(got).all(), name
        err = float((got.double() - ref).norm() / ref.norm())
        assert err < tol, f"{name}: rel err {err:.3g}"


@_perf_cuda
def test_perf_cuda_graph_decode_equals_eager():
    """On the GPU the decode step replayed from a CUDA graph gives the same greedy tokens and log-probs
    as the eager static decoder, and sampled graph runs are reproducible under the same seed with
    log-probs that match a cache-free forward."""
    model = _perf_tiny(seed=6).cuda()
    ids, mask = _perf_batch(model.cfg, seed=8)
    ids, mask = ids.cuda(), mask.cuda()
    a = model.generate(ids, mask, max_new_tokens=20, greedy=True, cuda_graph=True)
    b = model.generate(ids, mask, max_new_tokens=20, greedy=True, cuda_graph=False)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    assert (a.logprobs - b.logprobs).abs().max() <= 1e-5
    s1 = model.generate(ids, mask, max_new_tokens=20, temperature=0.9, top_p=0.8, cuda_graph=True,
                        generator=torch.Generator(device="cuda").manual_seed(1))
    s2 = model.generate(ids, mask, max_new_tokens=20, temperature=0.9, top_p=0.8, cuda_graph=True,
                        generator=torch.Generator(device="cuda").manual_seed(1))
    assert torch.equal(s1.tokens, s2.tokens)
    # the steps must not all draw the same noise (a graph that did not track the generator would)
    assert len({tuple(s1.tokens[:, k].tolist()) for k in range(s1.tokens.shape[1])}) > 3
    with torch.no_grad():
        full = model(torch.cat([ids, s1.tokens], 1), torch.cat([mask, s1.mask.long()], 1)).float()
    T0, L = ids.shape[1], s1.tokens.shape[1]
    ref = torch.log_softmax(full[:, T0 - 1:T0 - 1 + L] / 0.9, -1).gather(2, s1.tokens[..., None])[..., 0]
    live = s1.mask.bool()
    assert (s1.logprobs - ref)[live].abs().max() <= 1e-4
