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
