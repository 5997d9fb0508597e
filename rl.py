"""rl.py: the two-stage GRPO of SkinFlow (arXiv 2601.09136, Sec. 3.2-3.3), written from scratch.

The paper trains with GRPO in two stages (lrs 1e-6 then 5e-7, verl): Stage I rewards a structured
caption of the lesion (8 fields), Stage II rewards a ranked differential diagnosis by the position of
the first accepted answer. This file holds everything one rollout touches, in reading order:

  1. log-probabilities of sampled tokens (`selective_log_softmax`, with the fused C++/CUDA kernel of
     csrc/logprob*.{cpp,cu}) - the memory hot spot of GRPO with a 151,936-token vocabulary;
  2. the GRPO objective (`group_advantages`, `grpo_loss`) with its equations;
  3. the rewards of both stages (`reward_caption`, `reward_differential`), in ONE marked section;
  4. LoRA written from scratch, the reference policy without a second model copy, fp32 master weights,
     chunked completion log-probs;
  5. the trainer (`python rl.py warmup|stage1|stage2 ...`) with checkpoint / resume.

Notation used throughout: a prompt q (image + question) gets G sampled completions o_1..o_G; token t
of completion i is o_{i,t}; pi_theta is the policy being trained, pi_old the policy that sampled the
completions, pi_ref the frozen reference.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

# ===================================================================================================
# 1. Log-probabilities of the sampled tokens
#
# GRPO needs log pi(o_t | q, o_<t) for every completion token: ONE number per row of the [N, V] logits
# (N = completion tokens in the batch, V = vocabulary). The obvious `log_softmax(logits).gather(...)`
# builds a second [N, V] tensor (and in fp32, twice the size of bf16 logits) and autograd keeps it for
# backward. With N = 8 x 512 and V = 151,936 that is 2.5 GB per copy. All paths below return float32
# and keep only O(N) extra state; the gradient is written in the logits' dtype.
# ===================================================================================================

# Rows per chunk in the PyTorch path: about 2**26 fp32 values (256 MB) of temporaries at a time.
_TORCH_CHUNK_ELEMS = 1 << 26


def selective_log_softmax_naive(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Readable reference: logp[n] = log_softmax(logits[n])[index[n]] = x[n, y_n] - log sum_v exp(x[n, v]).

    Materialises the full fp32 log-softmax [N, V]; use it for tests and for reading, not for training.
    """
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, index[:, None]).squeeze(-1)  # [N]


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for bf16/fp16/fp32 inputs (logsumexp in bf16 loses ~2 digits), fp64 kept for tests."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _SelectiveLogSoftmaxTorch(torch.autograd.Function):
    """PyTorch twin of the fused kernel, chunked over rows.

    forward:  logp_n = x_{n, y_n} - lse_n           (lse computed chunk by chunk in fp32)
    backward: dx_{n, v} = g_n * (1[v = y_n] - exp(x_{n, v} - lse_n))

    Written as an autograd.Function on purpose: if we let autograd trace `logsumexp(chunk.float())`,
    it would SAVE every fp32 chunk for backward, i.e. a full fp32 copy of the logits after all. Here
    only lse [N] is saved and softmax is recomputed chunk by chunk in backward.
    """

    @staticmethod
    def forward(ctx, logits, index):
        N, V = logits.shape
        rows = max(1, _TORCH_CHUNK_ELEMS // max(V, 1))
        lse = torch.empty(N, dtype=_math_dtype(logits.dtype), device=logits.device)  # [N]
        for s in range(0, N, rows):
            lse[s:s + rows] = torch.logsumexp(logits[s:s + rows].to(lse.dtype), dim=-1)  # [rows]
        picked = logits.gather(-1, index[:, None]).squeeze(-1).to(lse.dtype)  # [N] x_{n, y_n}
        ctx.save_for_backward(logits, index, lse)
        return (picked - lse).float()  # [N]

    @staticmethod
    def backward(ctx, grad):
        logits, index, lse = ctx.saved_tensors
        N, V = logits.shape
        rows = max(1, _TORCH_CHUNK_ELEMS // max(V, 1))
        g = grad.to(lse.dtype)  # [N]
        dx = torch.empty_like(logits)  # [N, V] in the logits' dtype
        for s in range(0, N, rows):
            e = s + min(rows, N - s)
            p = torch.exp(logits[s:e].to(lse.dtype) - lse[s:e, None])  # [rows, V] softmax of this chunk
            d = -p * g[s:e, None]  # [rows, V]
            d.scatter_add_(-1, index[s:e, None], g[s:e, None])  # + g on the sampled token (one-hot)
            dx[s:e] = d.to(logits.dtype)
        return dx, None


class _SelectiveLogSoftmaxExt(torch.autograd.Function):
    """The fused kernel (csrc/logprob.cpp on CPU, csrc/logprob_cuda.cu on CUDA), same equations.

    The extension's forward returns (logp, lse) in one read of each row (online max/sum); backward
    reads the logits once more and writes (onehot - softmax) * g in the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits, index):
        ext = _logprob_ext(required=True)
        logp, lse = ext.forward(logits, index)  # [N] f32, [N] f32
        ctx.save_for_backward(logits, index, lse)
        return logp

    @staticmethod
    def backward(ctx, grad):
        logits, index, lse = ctx.saved_tensors
        return _logprob_ext(required=True).backward(grad.float().contiguous(), logits, index, lse), None


def _logprob_ext(required: bool = False):
    """The compiled csrc/logprob extension, or None (or a clear RuntimeError when `required`)."""
    import skinflow  # local import: skinflow is the one place that compiles csrc/ kernels

    ext = skinflow.build_extension("logprob")
    if ext is None and required:
        why = skinflow.EXTENSION_ERRORS.get("logprob", "unknown reason")
        raise RuntimeError(
            f"selective_log_softmax(impl='ext'): the csrc/logprob extension could not be built ({why}). "
            "Install a C++ compiler and ninja (requirements-dev.txt), unset SKINFLOW_NO_EXT, or use impl='torch'."
        )
    return ext


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """log pi(y_n) = x[n, y_n] - logsumexp_v x[n, v] for each row n, as float32, differentiable.

    logits: [N, V] float32 / bfloat16 / float16 (float64 allowed, for tests); index: [N] int64 in [0, V).
    impl: "ext" = fused kernel (error if it cannot be built), "torch" = chunked PyTorch twin,
          "auto" = the extension when it builds (and SKINFLOW_NO_EXT is not set), else PyTorch.
    Returns logp [N] float32. The gradient w.r.t. logits has the logits' dtype.
    """
    if impl not in ("auto", "torch", "ext"):
        raise ValueError(f"selective_log_softmax: impl must be 'auto', 'torch' or 'ext', got {impl!r}")
    if logits.dim() != 2 or index.dim() != 1 or index.shape[0] != logits.shape[0]:
        raise ValueError(f"selective_log_softmax: need logits [N, V] and index [N], got "
                         f"{tuple(logits.shape)} and {tuple(index.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"selective_log_softmax: logits must be floating point, got {logits.dtype}")
    index = index.long()
    if index.device.type == "cpu" and index.numel() and (int(index.min()) < 0 or int(index.max()) >= logits.shape[1]):
        raise IndexError(f"selective_log_softmax: index outside [0, {logits.shape[1]})")
    use_ext = impl == "ext" or (impl == "auto" and _logprob_ext() is not None)
    fn = _SelectiveLogSoftmaxExt if use_ext else _SelectiveLogSoftmaxTorch
    return fn.apply(logits, index)
