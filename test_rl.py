"""Tests for rl.py (issues 6 and 7): selective log-softmax (extension + PyTorch twin), GRPO math,
rewards, LoRA, trainer plumbing. Oracles: float64 references written here, hand-computed cases.

Naming: every helper / fixture starts with `_rl_` / `rl_` (the file is merged into test_skinflow.py).
"""
import math

import pytest
import torch

import rl
import skinflow


def _rl_ext_or_skip():
    """The compiled CPU twin, or skip with the build error (CI installs a compiler + ninja, so it builds)."""
    ext = rl._logprob_ext()
    if ext is None:
        pytest.skip(f"logprob extension not built: {skinflow.EXTENSION_ERRORS.get('logprob')}")
    return ext


def _rl_logprob_reference(logits, index):
    """float64 oracle: logp = log_softmax(x)[y]; dlogp/dx = onehot(y) - softmax(x)."""
    x = logits.detach().double()
    logp = torch.log_softmax(x, -1).gather(-1, index[:, None]).squeeze(-1)
    grad = torch.nn.functional.one_hot(index, x.shape[1]).double() - torch.softmax(x, -1)
    return logp, grad


# ---------------------------------------------------------------------------------------------------
# 1. selective_log_softmax
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["ext", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rl_selective_log_softmax_matches_float64(impl, dtype):
    if impl == "ext":
        _rl_ext_or_skip()
    gen = torch.Generator().manual_seed(11)
    N, V = 29, 4099  # odd sizes: no accidental alignment
    logits = (torch.randn(N, V, generator=gen) * 4.0 + 2.0).to(dtype)
    logits[0, :7] = float("-inf")  # masked vocabulary entries must add exactly 0
    logits[1, 5] = 60.0  # one dominant logit: tests the online max rescaling
    index = torch.randint(7, V, (N,), generator=gen)
    g = torch.randn(N, generator=gen)
    x = logits.clone().requires_grad_(True)
    logp = rl.selective_log_softmax(x, index, impl=impl)
    (logp * g).sum().backward()
    ref_logp, ref_dlogp = _rl_logprob_reference(logits, index)
    assert logp.dtype == torch.float32 and x.grad.dtype == dtype
    # forward: fp32 math on the exact (possibly bf16-rounded) inputs -> fp32 accuracy in both cases
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-4)
    # backward: written in the logits' dtype, so bf16 carries its 8-bit mantissa rounding
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), ref_dlogp * g.double()[:, None], **tol)


def test_rl_selective_log_softmax_ext_equals_torch_and_naive():
    _rl_ext_or_skip()
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 777, generator=gen) * 3
    index = torch.randint(0, 777, (16,), generator=gen)
    a = rl.selective_log_softmax(logits, index, impl="ext")
    b = rl.selective_log_softmax(logits, index, impl="torch")
    c = rl.selective_log_softmax_naive(logits, index)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernel: needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rl_selective_log_softmax_cuda_kernel(dtype):
    _rl_ext_or_skip()
    gen = torch.Generator().manual_seed(5)
    for V in (151936, 1001):  # aligned (vectorised) and ragged (scalar) paths
        logits = (torch.randn(33, V, generator=gen) * 3).to(dtype)
        index = torch.randint(0, V, (33,), generator=gen)
        g = torch.randn(33, generator=gen)
        x = logits.cuda().requires_grad_(True)
        logp = rl.selective_log_softmax(x, index.cuda(), impl="ext")
        (logp * g.cuda()).sum().backward()
        ref_logp, ref_d = _rl_logprob_reference(logits, index)
        torch.testing.assert_close(logp.double().cpu(), ref_logp, rtol=1e-5, atol=1e-4)
        tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
        torch.testing.assert_close(x.grad.double().cpu(), ref_d * g.double()[:, None], **tol)


@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_rl_selective_log_softmax_saves_no_fp32_copy(impl):
    """The point of the kernel: autograd must not keep an fp32 [N, V] tensor for bf16 logits."""
    if impl == "ext":
        _rl_ext_or_skip()
    N, V = 8, 5000
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    x = torch.randn(N, V).bfloat16().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rl.selective_log_softmax(x * 1.0, torch.randint(0, V, (N,)), impl=impl)
    big_fp32 = [s for s in saved if s[0] == torch.float32 and s[1] >= N * V]
    assert not big_fp32, saved
    # the naive reference, by contrast, does keep one (this is what the test would catch)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rl.selective_log_softmax_naive(x * 1.0, torch.randint(0, V, (N,)))
    assert any(s[0] == torch.float32 and s[1] >= N * V for s in saved)


def test_rl_selective_log_softmax_errors(monkeypatch):
    x = torch.randn(4, 10)
    with pytest.raises(IndexError):
        rl.selective_log_softmax(x, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError):
        rl.selective_log_softmax(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        rl.selective_log_softmax(x, torch.tensor([0, 1, 2, 3]), impl="cuda")
    # SKINFLOW_NO_EXT=1: "auto" falls back to PyTorch, "ext" raises a clear error naming the reason
    monkeypatch.setenv("SKINFLOW_NO_EXT", "1")
    monkeypatch.setattr(skinflow, "_EXTENSIONS", {})
    monkeypatch.setattr(skinflow, "EXTENSION_ERRORS", {})
    idx = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(rl.selective_log_softmax(x, idx), rl.selective_log_softmax_naive(x, idx))
    with pytest.raises(RuntimeError, match="SKINFLOW_NO_EXT"):
        rl.selective_log_softmax(x, idx, impl="ext")


# ---------------------------------------------------------------------------------------------------
# 2. GRPO math
# ---------------------------------------------------------------------------------------------------
def _rl_adv_reference(rewards, G, scale):
    """Plain-Python float64 advantages, ddof = 1, flat groups -> 0."""
    out = []
    r = [float(v) for v in rewards]
    for b in range(0, len(r), G):
        grp = r[b:b + G]
        mean = sum(grp) / G
        if max(grp) - min(grp) == 0:
            out += [0.0] * G
            continue
        std = math.sqrt(sum((v - mean) ** 2 for v in grp) / (G - 1))
        out += [(v - mean) / (std + rl.ADV_EPS) if scale == "std" else v - mean for v in grp]
    return out


def _rl_loss_reference(logp, old, ref, adv, mask, eps_low, eps_high, beta, agg, num_tokens=None):
    """Element-by-element float64 GRPO loss written from the equations (no tensor ops)."""
    N, T = len(logp), len(logp[0])
    tok = [[0.0] * T for _ in range(N)]
    for i in range(N):
        for t in range(T):
            rho = math.exp(logp[i][t] - old[i][t])
            s = min(rho * adv[i], min(max(rho, 1 - eps_low), 1 + eps_high) * adv[i])
            d = ref[i][t] - logp[i][t]
            tok[i][t] = -s + beta * (math.exp(d) - d - 1)
    if agg == "token-mean":
        tot = sum(tok[i][t] * mask[i][t] for i in range(N) for t in range(T))
        return tot / (num_tokens if num_tokens is not None else sum(map(sum, mask)))
    if agg == "seq-mean":
        return sum(sum(tok[i][t] * mask[i][t] for t in range(T)) / sum(mask[i]) for i in range(N)) / N
    return sum(tok[i][t] * mask[i][t] for i in range(N) for t in range(T)) / (N * T)


def _rl_random_batch(seed, N=6, T=7):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, T, generator=gen, dtype=torch.float64) * 3
    old = logp + torch.randn(N, T, generator=gen, dtype=torch.float64) * 0.4  # ratios on both clip sides
    ref = logp + torch.randn(N, T, generator=gen, dtype=torch.float64) * 0.5
    adv = torch.randn(N, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (N,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("scale", ["std", "none"])
def test_rl_group_advantages_matches_reference(scale):
    gen = torch.Generator().manual_seed(1)
    G = 4
    rewards = torch.rand(5 * G, generator=gen)
    rewards[8:12] = 0.37  # one flat group
    adv, st = rl.group_advantages(rewards, G, scale=scale, return_stats=True)
    torch.testing.assert_close(adv.double(), torch.tensor(_rl_adv_reference(rewards, G, scale), dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    assert st == {"groups": 5, "zero_std_groups": 1}
    assert torch.all(adv[8:12] == 0)
    assert abs(float(adv.view(-1, G).sum(1).abs().max())) < 1e-5  # advantages sum to 0 in every group
    with pytest.raises(ValueError):
        rl.group_advantages(rewards, 3)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean", "dr-grpo"])
def test_rl_grpo_loss_matches_float64_reference(agg):
    for seed in range(3):
        logp, old, ref, adv, mask = _rl_random_batch(seed)
        loss, st = rl.grpo_loss(logp, old, ref, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.04, agg=agg)
        want = _rl_loss_reference(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
                                  0.2, 0.28, 0.04, agg)
        assert abs(float(loss) - want) < 1e-10
        assert st["clip_low"] + st["clip_high"] > 0  # the random ratios do reach the clip
    # token-mean with a global normaliser (gradient accumulation): halves -> same total as one batch
    logp, old, ref, adv, mask = _rl_random_batch(7, N=8)
    full, _ = rl.grpo_loss(logp, old, ref, adv, mask, beta=0.04)
    n = mask.sum()
    parts = sum(rl.grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], beta=0.04, num_tokens=n)[0]
                for s in (slice(0, 3), slice(3, 8)))
    assert abs(float(full) - float(parts)) < 1e-12
    want = _rl_loss_reference(logp[:3].tolist(), old[:3].tolist(), ref[:3].tolist(), adv[:3].tolist(),
                              mask[:3].tolist(), 0.2, 0.28, 0.04, "token-mean", num_tokens=float(n))
    assert abs(float(rl.grpo_loss(logp[:3], old[:3], ref[:3], adv[:3], mask[:3], beta=0.04, num_tokens=n)[0]) - want) < 1e-12


def test_rl_kl_zero_at_reference_and_nonnegative():
    logp, old, ref, adv, mask = _rl_random_batch(3)
    _, st = rl.grpo_loss(logp, old, logp.clone(), adv, mask, beta=0.1)
    assert st["kl"] == 0.0 and st["kl_loss"] == 0.0
    for seed in range(5):
        logp, old, ref, adv, mask = _rl_random_batch(10 + seed)
        _, st = rl.grpo_loss(logp, old, ref, adv, mask, beta=0.1)
        assert st["kl"] > 0
        d = ref - logp
        assert torch.all(torch.exp(d) - d - 1 >= 0)


def test_rl_on_policy_gradient_identity():
    """mu = 1: old = current policy, so grad(loss) = -(1/num_tokens) sum m A grad log pi (beta = 0)."""
    gen = torch.Generator().manual_seed(4)
    N, T, V, D = 6, 5, 11, 7
    W = torch.randn(V, D, generator=gen, dtype=torch.float64, requires_grad=True)  # toy policy
    h = torch.randn(N, T, D, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, V, (N, T), generator=gen)
    adv = torch.randn(N, generator=gen, dtype=torch.float64)
    mask = (torch.rand(N, T, generator=gen) > 0.2).double()
    logp = torch.log_softmax(h @ W.T, -1).gather(-1, tokens[..., None]).squeeze(-1)  # [N, T]
    loss, st = rl.grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0)
    (g_loss,) = torch.autograd.grad(loss, W, retain_graph=True)
    (g_pg,) = torch.autograd.grad(-(adv[:, None] * logp * mask).sum() / mask.sum(), W)
    torch.testing.assert_close(g_loss, g_pg, rtol=1e-12, atol=1e-14)
    assert g_loss.abs().max() > 1e-3  # a real gradient ...
    assert abs(st["ratio_mean"] - 1) < 1e-12 and st["clip_region"] == 0  # ... with ratio 1, no clip


def test_rl_one_step_raises_positive_advantage_logprob():
    gen = torch.Generator().manual_seed(9)
    G, T, V = 8, 6, 13
    policy = torch.nn.Linear(T, V)  # logits for position t from a one-hot position code
    torch.nn.init.normal_(policy.weight, std=0.5, generator=gen)
    pos = torch.eye(T)  # [T, T]

    def logprobs(tokens):  # [G, T] -> [G, T]
        logits = policy(pos).expand(tokens.shape[0], T, V)  # [G, T, V]
        return rl.selective_log_softmax(logits.reshape(-1, V), tokens.reshape(-1), impl="torch").view(-1, T)

    with torch.no_grad():
        probs = torch.softmax(policy(pos), -1)  # [T, V]
        tokens = torch.stack([torch.multinomial(probs, 1, generator=gen).squeeze(-1) for _ in range(G)])
        old = logprobs(tokens)
    rewards = (tokens == 3).float().sum(1) + 0.1 * torch.arange(G).float()  # arbitrary but spread out
    adv = rl.group_advantages(rewards, G)
    mask = torch.ones(G, T)
    opt = torch.optim.SGD(policy.parameters(), lr=0.05)
    loss, _ = rl.grpo_loss(logprobs(tokens), old, None, adv, mask, beta=0.0)
    loss.backward()
    opt.step()
    with torch.no_grad():
        new = logprobs(tokens)
    seq_gain = (new - old).sum(1)  # [G] change of log pi(completion)
    assert seq_gain[adv > 0].sum() > 0 and seq_gain[adv < 0].sum() < 0


# ---------------------------------------------------------------------------------------------------
# 3. Rewards, on hand-made generations
# ---------------------------------------------------------------------------------------------------
_rl_fields = {"colour": "erythematous, salmon", "location": "trunk", "shape": "round", "lesion type": "plaque",
              "size": "large", "border": "well-demarcated, regular", "surface": "coarse silvery scale",
              "distribution": "scattered"}


def _rl_need_eval():
    ev = pytest.importorskip("eval")
    if not all(hasattr(ev, n) for n in ("parse_caption", "parse_ranked_list", "judge")):
        pytest.skip("eval.py parsers / judge not written yet")
    return ev


def _rl_caption(fields):
    order = ("colour", "location", "shape", "lesion type", "size", "border", "surface", "distribution")
    return "\n".join(f"{k}: {fields[k]}" for k in order if k in fields)


def test_rl_caption_field_score_cases():
    s = rl.caption_field_score
    assert s("salmon, erythematous", "erythematous, salmon") == 1.0  # order-free set match
    assert s("red", "erythematous") == 1.0  # synonym
    assert s("None", "none") == 1.0
    assert s("oval", "round") == 0.0
    assert s("scale", "none") == 0.0 and s("none", "scale") == 0.0
    assert abs(s("well-demarcated, irregular", "well-demarcated, regular") - 0.5) < 1e-12
    # token F1 by hand: pred {silvery, scale} vs ref {coarse, silvery, scale}: P = 1, R = 2/3, F1 = 0.8
    assert abs(s("silvery scale", "coarse silvery scale") - 0.8) < 1e-12


def test_rl_reward_caption_cases():
    _rl_need_eval()
    perfect, info = rl.reward_caption(_rl_caption(_rl_fields), _rl_fields)
    assert abs(perfect - 1.0) < 1e-9 and not info["malformed"] and info["format"] == 1.0
    partial_fields = dict(_rl_fields, shape="oval", surface="silvery scale", colour="red, salmon")
    partial, info = rl.reward_caption(_rl_caption(partial_fields), _rl_fields)
    want = 0.9 * (1 + 1 + 0 + 1 + 1 + 1 + 0.8 + 1) / 8 + 0.1  # by hand: shape 0, surface F1 0.8, red = erythematous
    assert abs(partial - want) < 1e-9 and info["field/shape"] == 0.0
    missing = {k: v for k, v in _rl_fields.items() if k not in ("size", "border")}
    r_missing, info = rl.reward_caption(_rl_caption(missing), _rl_fields)
    assert abs(r_missing - (0.9 * 6 / 8 + 0.1 * 6 / 8)) < 1e-9 and info["field/size"] == 0.0
    wrong_fields = {k: "none" if v != "none" else "x" for k, v in _rl_fields.items()}
    wrong, _ = rl.reward_caption(_rl_caption(wrong_fields), _rl_fields)
    assert abs(wrong - 0.1) < 1e-9  # format only
    for bad in ("", "the lesion looks red and angry", "!!!!!!!!", None):
        r, info = rl.reward_caption(bad, _rl_fields)
        assert r == 0.0 and info["malformed"]
    assert perfect > partial > r_missing > wrong > 0.0


def test_rl_reward_differential_cases():
    _rl_need_eval()
    truth = "psoriasis"
    perfect, info = rl.reward_differential("1. psoriasis\n2. eczema\n3. lichen planus", truth)
    assert abs(perfect - 1.0) < 1e-9 and info["rank"] == 1 and info["format"] == 1.0
    third, info = rl.reward_differential("1. vitiligo\n2. acne\n3. psoriasis\n4. eczema", truth)
    assert info["rank"] == 3 and abs(third - (0.9 * 0.7 ** 2 + 0.1)) < 1e-9
    sixth, _ = rl.reward_differential("1. vitiligo\n2. acne\n3. milia\n4. tuberous sclerosis\n5. scabies\n6. psoriasis",
                                      truth)
    assert abs(sixth - (0.9 * 0.7 ** 5 + 0.1)) < 1e-9
    near, info = rl.reward_differential("1. eczema", truth)  # same nine group (inflammatory), not psoriasis
    assert info["verdicts"] == ["near_miss"] and abs(near - (0.9 * 0.25 + 0.1)) < 1e-9
    danger, info = rl.reward_differential("1. melanoma\n2. eczema", truth)  # malignant top-1 for a benign truth
    assert info["safety_top1"] and abs(danger - (0.9 * 0.25 * 0.7 + 0.1 - 0.3)) < 1e-9
    for bad in ("", "I am not sure.", "@@@@ ####", None):
        r, info = rl.reward_differential(bad, truth)
        assert info["malformed"] and r == 0.0
    bare, info = rl.reward_differential("it looks like psoriasis to me", truth)  # found, but not a list
    assert info["rank"] == 1 and info["format"] == 0.0 and abs(bare - 0.9) < 1e-9
    assert perfect > third > near > sixth > danger


# ---------------------------------------------------------------------------------------------------
# 4. LoRA, reference policy, master weights, chunked completion log-probs
# ---------------------------------------------------------------------------------------------------
def _rl_tiny(seed=0):
    cfg = skinflow.Config.preset("tiny")
    return skinflow.VLM(cfg, seed=seed)


def _rl_prompt(seed=0, B=3, T=9):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 300, (B, T), generator=gen)  # plain text ids (no image placeholders)
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # one left-padded row
    return {"input_ids": ids, "attention_mask": attn}


def test_rl_lora_identity_disable_and_merge():
    torch.manual_seed(0)
    model = _rl_tiny()
    batch = _rl_prompt()
    with torch.no_grad():
        base = model(**batch)
    rep = rl.apply_lora(model, rank=4, alpha=8.0)
    assert rep["layers"] == 7 * len(model.model.layers)
    assert not any(isinstance(m, rl.LoRALinear) for m in model.visual.modules())  # LLM only
    counts = rl.set_trainable(model)
    assert counts["lora"] == rep["params"] > 0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
           {n for n, _ in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), base)  # B = 0: starts at the pretrained model
        for m in rl.lora_layers(model):
            m.lora_B.normal_(0, 0.05)
        adapted = model(**batch)
        assert (adapted - base).abs().max() > 1e-3
        with rl.adapters_disabled(model):
            torch.testing.assert_close(model(**batch), base)  # pi_ref without a second copy
        torch.testing.assert_close(model(**batch), adapted)  # adapters back on after the block
        rl.merge_lora(model)
        assert not rl.lora_layers(model)
        assert not any("lora_" in k for k in model.state_dict())  # Hub-layout keys again
        torch.testing.assert_close(model(**batch), adapted, rtol=1e-4, atol=1e-5)


def test_rl_master_weights_keep_tiny_updates():
    """lr * grad far below bf16's resolution: a bf16 weight never moves, the fp32 master does."""
    w0 = torch.full((64,), 0.02) + torch.rand(64) * 1e-3
    plain = torch.nn.Parameter(w0.bfloat16())
    mixed = torch.nn.Parameter(w0.bfloat16())
    mw = rl.MasterWeights([mixed])
    opt_plain = torch.optim.SGD([plain], lr=1e-6)
    opt_mixed = torch.optim.SGD(mw.params, lr=1e-6)
    ref = w0.bfloat16().double()  # the master starts from the bf16 weight it shadows
    for _ in range(300):
        for p in (plain, mixed):
            p.grad = torch.ones_like(p)
        opt_plain.step()
        mw.grads_to_master()
        opt_mixed.step()
        mw.master_to_model()
        mw.zero_grad()
        ref -= 1e-6
    assert torch.equal(plain.detach(), w0.bfloat16())  # every update rounded away
    assert torch.equal(mixed.detach(), ref.bfloat16())  # the sum of 300 steps survived
    assert not torch.equal(mixed.detach(), w0.bfloat16())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rl_completion_logprobs_match_sampler_and_naive(temperature):
    torch.manual_seed(1)
    model = _rl_tiny(seed=1)
    rl.apply_lora(model, rank=4, alpha=8.0)
    rl.set_trainable(model)
    for m in rl.lora_layers(model):
        torch.nn.init.normal_(m.lora_B, std=0.02)
    batch = _rl_prompt(seed=1)
    gen = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=10, temperature=temperature,
                         generator=torch.Generator().manual_seed(3))
    mask = gen.mask.clone()
    mask[1, 6:] = 0  # a shorter completion: masked tokens must come out as 0
    logp = rl.completion_logprobs(model, batch, gen.tokens, mask, chunk=4, temperature=temperature)
    torch.testing.assert_close(logp, gen.logprobs * mask, rtol=1e-4, atol=1e-4)  # = what the sampler saw
    # gradients equal the plain (full-logits) computation
    full = torch.cat([batch["input_ids"], gen.tokens], 1)
    attn = torch.cat([batch["attention_mask"], (mask > 0).long()], 1)
    T0 = batch["input_ids"].shape[1]
    logits = model(full, attn)[:, T0 - 1:-1].float() / temperature  # [B, L, V]
    naive = torch.log_softmax(logits, -1).gather(-1, gen.tokens[..., None]).squeeze(-1) * mask
    w = torch.randn(mask.shape)
    params = [p for p in model.parameters() if p.requires_grad]
    g1 = torch.autograd.grad((logp * w).sum(), params)
    g2 = torch.autograd.grad((naive * w).sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert max(float(a.abs().max()) for a in g1) > 0


def test_rl_completion_logprobs_never_keep_full_logits():
    model = _rl_tiny(seed=2)
    rl.apply_lora(model, rank=2, alpha=4.0)
    rl.set_trainable(model)
    batch = _rl_prompt(seed=2)
    comp = torch.randint(10, 300, (3, 12))
    mask = torch.ones(3, 12)
    V = model.cfg.vocab_size
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        rl.completion_logprobs(model, batch, comp, mask, chunk=8)
    assert shapes and not [s for s in shapes if len(s) >= 2 and s[-1] == V], shapes


# ---------------------------------------------------------------------------------------------------
# 5. Trainer: smoke run of every stage, resume gives identical numbers, Ctrl-C leaves a checkpoint
# ---------------------------------------------------------------------------------------------------
def _rl_cfg(tmp_path, stage, **kw):
    base = dict(stage=stage, init="tiny", out=str(tmp_path / "run"), steps=2, prompts=2, G=3, max_new_tokens=8,
                image_size=56, max_pixels=56 * 56, n_data=16, save_every=1, eval_n=0, lr=1e-3)
    base.update(kw)
    return rl.TrainConfig(**base)


def _rl_fake_reward(stage, text, item):
    """Deterministic, non-trivial reward for garbage text of a random model: share of vowels."""
    vow = sum(c in "aeiou" for c in text)
    return vow / max(len(text), 1), {"malformed": False, "format": 1.0, "rank": 0,
                                     **{f"field/{f}": 0.0 for f in rl._rl_caption_fields()}}


def _rl_log(path):
    import json

    return [json.loads(line) for line in open(path)]


def test_rl_trainer_smoke_all_stages(tmp_path, monkeypatch):
    rl.Trainer(_rl_cfg(tmp_path, "warmup", steps=2)).run()
    warm = tmp_path / "run" / "warmup" / "model"
    assert (warm / "model.safetensors").exists() and (warm / "tokenizer.json").exists()
    for stage in ("stage1", "stage2"):
        out = rl.Trainer(_rl_cfg(tmp_path, stage, init=str(warm), dve=True, train="lora,dve", beta=0.02)).run()
        log = _rl_log(tmp_path / "run" / stage / "log.jsonl")
        assert [r["step"] for r in log] == [1, 2]
        for key in ("reward_mean", "kl", "clip_low", "zero_std_groups", "format_failures", "completion_len"):
            assert key in log[-1]
        assert (out / "model.safetensors").exists()
    # the exported model (DVE recorded in config.json, LoRA merged) loads back
    model, _ = skinflow.load(str(out))
    import dve

    assert dve.fdlinears(model) and not rl.lora_layers(model)


@pytest.mark.parametrize("stage", ["warmup", "stage2"])
def test_rl_resume_continues_identically(tmp_path, monkeypatch, stage):
    monkeypatch.setattr(rl, "_stage_reward", _rl_fake_reward)
    kw = dict(mu=2, beta=0.05) if stage != "warmup" else {}
    rl.Trainer(_rl_cfg(tmp_path / "a", stage, steps=4, **kw)).run()
    rl.Trainer(_rl_cfg(tmp_path / "b", stage, steps=2, **kw)).run()  # "interrupted" after step 2 ...
    rl.Trainer(_rl_cfg(tmp_path / "b", stage, steps=4, **kw)).run()  # ... and resumed
    a = _rl_log(tmp_path / "a" / "run" / stage / "log.jsonl")
    b = _rl_log(tmp_path / "b" / "run" / stage / "log.jsonl")
    drop = ("step_s", "rollout_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
           [{k: v for k, v in r.items() if k not in drop} for r in b]
    assert len({r["loss"] for r in a}) > 1  # the numbers do move (the comparison is not vacuous)


def test_rl_ctrl_c_writes_resumable_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(rl, "_stage_reward", _rl_fake_reward)
    tr = rl.Trainer(_rl_cfg(tmp_path, "stage2", steps=5, save_every=100))
    real = tr._rl_step
    calls = []

    def interrupted():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real()

    tr._rl_step = interrupted
    with pytest.raises(SystemExit) as exc:
        tr.run()
    assert exc.value.code == 130
    again = rl.Trainer(_rl_cfg(tmp_path, "stage2", steps=5, save_every=100))
    assert again.step == 2 and again.position == 4
    # a first Ctrl-C (the SIGINT handler's flag) lets the running step finish, then checkpoints
    real2 = again._rl_step

    def flagged():
        out = real2()
        again._stop_requested = True
        return out

    again._rl_step = flagged
    with pytest.raises(SystemExit):
        again.run()
    assert rl.Trainer(_rl_cfg(tmp_path, "stage2", steps=5, save_every=100)).step == 3


def test_rl_nonfinite_loss_skips_step(tmp_path, monkeypatch):
    monkeypatch.setattr(rl, "_stage_reward", _rl_fake_reward)
    tr = rl.Trainer(_rl_cfg(tmp_path, "stage2", steps=1))
    before = [p.detach().clone() for p in tr.master.params]
    real_loss = rl.grpo_loss
    monkeypatch.setattr(rl, "grpo_loss", lambda *a, **k: (real_loss(*a, **k)[0] * float("nan"), real_loss(*a, **k)[1]))
    tr.run()
    log = _rl_log(tmp_path / "run" / "stage2" / "log.jsonl")
    assert log[0]["skipped"] == 1
    assert all(torch.equal(p, q) for p, q in zip(before, tr.master.params))


# ---------------------------------------------------------------------------------------------------
# 6. The tiny warm start's knobs and train.sh
# ---------------------------------------------------------------------------------------------------
def test_rl_lr_schedule_hand_values():
    """lr_at against values worked out by hand (W = 2 warm-up steps, S = 10 steps, floor 0.1)."""
    cfg = rl.TrainConfig(steps=10, lr=2.0, lr_warmup=2, lr_schedule="cosine", min_lr_ratio=0.1)
    # warm-up: 2 * 1/2, 2 * 2/2; then 2 * (0.1 + 0.9 * 0.5 * (1 + cos(pi * (s - 2) / 8)))
    assert rl.lr_at(cfg, 0) == pytest.approx(1.0) and rl.lr_at(cfg, 1) == pytest.approx(2.0)
    assert rl.lr_at(cfg, 2) == pytest.approx(2.0)
    assert rl.lr_at(cfg, 6) == pytest.approx(2 * (0.1 + 0.9 * 0.5))  # half way: cos(pi/2) = 0
    assert rl.lr_at(cfg, 10) == pytest.approx(0.2)
    const = rl.TrainConfig(steps=10, lr=2.0, lr_warmup=4)
    assert [rl.lr_at(const, s) for s in (0, 3, 4, 9)] == pytest.approx([0.5, 2.0, 2.0, 2.0])
    with pytest.raises(ValueError):
        rl.lr_at(rl.TrainConfig(lr_schedule="linear"), 0)


def test_rl_warmup_target_shuffled_keeps_entries_changes_order():
    import data
    import eval as skin_eval

    ds = data.SynthDerm(60, seed=3, image_size=56, split="val")
    moved = 0
    for it in ds:
        looks = skin_eval.parse_ranked_list(rl._warmup_target(it, "stage2", "looks"))
        shuf = skin_eval.parse_ranked_list(rl._warmup_target(it, "stage2", "shuffled"))
        assert looks[0] == it.looks_like  # the reference starts with what the lesion looks like
        assert sorted(shuf) == sorted(looks)  # same six entries ...
        cluster = data.CLUSTERS[data.CLASS_RULES[it.looks_like]["cluster"]]
        assert set(shuf[:len(cluster)]) == set(cluster)  # ... the look's cluster still opens the list
        assert shuf == skin_eval.parse_ranked_list(rl._warmup_target(it, "stage2", "shuffled"))  # fixed per item
        moved += shuf[0] != it.looks_like
    assert moved > 10  # the order really is shuffled for many items
    assert rl._warmup_target(ds[0], "stage1") == data.format_caption(ds[0].fields)
    with pytest.raises(ValueError):
        rl._warmup_target(ds[0], "stage2", "alphabetical")


def test_rl_warmup_probe_trains_and_is_not_exported(tmp_path):
    from safetensors import safe_open

    tr = rl.Trainer(_rl_cfg(tmp_path, "warmup", steps=2, aux_weight=1.0))
    assert "aux_head.weight" in tr.names  # trained (and checkpointed) like any parameter
    before = tr.model.aux_head.weight.detach().clone()
    out = tr.run()
    log = _rl_log(tmp_path / "run" / "warmup" / "log.jsonl")
    assert all(r["aux_loss"] > 0 for r in log)
    assert not torch.equal(before, tr.master.params[tr.names.index("aux_head.weight")])
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "aux_head" in k]  # the exported VLM has the plain Hub layout


def test_rl_cli_dry_run(capsys):
    import json

    assert rl.main(["stage2", "--lr", "5e-7", "--dtype", "bf16", "--train", "lora,dve", "--dve", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cfg["lr"] == 5e-7 and cfg["dve"] is True and cfg["stage"] == "stage2"
    with pytest.raises(SystemExit):
        rl.main(["stage2", "--lr-schedule", "cosine", "--no-such-flag", "--dry-run"])


def test_rl_train_sh_dry_run_parses(tmp_path):
    """DRY_RUN=1 prints the whole 7B chain and checks each rl.py command's flags (runs no model)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(rl.__file__).resolve().parent
    env = dict(os.environ, DRY_RUN="1", PRESET="7b", OUT=str(tmp_path / "run"), PY=sys.executable)
    res = subprocess.run(["bash", str(root / "train.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    cmds = [ln for ln in res.stdout.splitlines() if ln.startswith("+ ")]
    assert any("rl.py stage1" in c and "--lr 1e-6" in c for c in cmds)
    assert any("rl.py stage2" in c and "--lr 5e-7" in c for c in cmds)
    assert any("eval.py summary" in c for c in cmds) and not any("rl.py warmup" in c for c in cmds)
    assert "preset 7b" in res.stdout
