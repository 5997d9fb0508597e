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

import contextlib
import math
import os

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

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


# ===================================================================================================
# 2. The GRPO objective (DeepSeekMath, Shao et al. 2024; the clip-higher of DAPO; Dr.GRPO aggregation)
#
# For one prompt, G completions are sampled from pi_old and scored r_1..r_G. GRPO needs no value
# network: the baseline is the group mean, so the advantage of completion i (shared by all its tokens) is
# how much better it did than its siblings. The per-token loss is PPO's clipped surrogate plus a KL
# penalty to the reference policy; the last choice is how token losses are averaged (see grpo_loss).
# ===================================================================================================
ADV_EPS = 1e-4  # epsilon in the std normalisation (TRL's value; verl uses 1e-6)
LOG_RATIO_CLAMP = 20.0  # |log ratio| clamp before exp(): keeps one wild token from overflowing (verl, TRL)


def group_advantages(rewards: torch.Tensor, G: int, scale: str = "std", return_stats: bool = False):
    """Group-normalised advantages, one per completion.

        scale="std":   A_i = (r_i - mean_g r) / (std_g r + eps),   std with ddof = 1 (Bessel), eps = 1e-4
        scale="none":  A_i =  r_i - mean_g r                        (Dr.GRPO: no std division)

    rewards: [B*G] laid out prompt-major (completions of prompt b at b*G .. b*G+G-1). Returns [B*G]
    float32 (plus a stats dict when return_stats). ddof = 1 follows TRL / verl / EasyR1; at G = 4 it is
    sqrt(4/3) smaller than numpy's ddof = 0, so advantages are a bit smaller in magnitude.

    A group whose G rewards are all equal carries no learning signal (every completion is "average"):
    its advantages are set to exactly 0 and it is counted in stats["zero_std_groups"]. Watch that number:
    if most groups are flat the batch teaches nothing (too easy or too hard prompts, G too small).
    """
    if scale not in ("std", "none"):
        raise ValueError(f"group_advantages: scale must be 'std' or 'none', got {scale!r}")
    if rewards.dim() != 1 or G < 1 or rewards.numel() % G != 0:
        raise ValueError(f"group_advantages: need rewards [B*G] with G={G} dividing {tuple(rewards.shape)}")
    if scale == "std" and G < 2:
        raise ValueError("group_advantages: scale='std' needs G >= 2 (a group of one has no spread)")
    r = rewards.detach().double().view(-1, G)  # [B, G], float64 so tiny spreads are not rounded away
    centred = r - r.mean(dim=1, keepdim=True)  # [B, G]
    if scale == "std":
        adv = centred / (r.std(dim=1, unbiased=True, keepdim=True) + ADV_EPS)  # [B, G]
    else:
        adv = centred
    flat = (r.max(dim=1).values - r.min(dim=1).values) <= 1e-12  # [B] groups with equal rewards
    adv = torch.where(flat[:, None], torch.zeros_like(adv), adv)  # exactly 0, not 1e-17 noise
    adv = adv.reshape(-1).to(torch.float32)  # [B*G]
    if return_stats:
        return adv, {"groups": int(r.shape[0]), "zero_std_groups": int(flat.sum())}
    return adv


def grpo_loss(logp, old_logp, ref_logp, adv, mask, eps_low: float = 0.2, eps_high: float = 0.28,
              beta: float = 0.01, agg: str = "token-mean", num_tokens=None, num_seqs=None, max_len=None):
    """The GRPO loss of a (micro-)batch of completions, and the numbers worth logging.

    Inputs ([N, T] = completions x completion positions, float32): logp = log pi_theta(o_t) (with grad),
    old_logp = log pi_old(o_t) from the sampler, ref_logp = log pi_ref(o_t) (or None when beta = 0),
    adv [N] from group_advantages, mask [N, T] = 1 on real completion tokens (incl. the stop token).

    Per token (i, t):
        rho     = exp(logp - old_logp)                                    importance ratio (log space,
                                                                          log-ratio clamped to +-20)
        S       = min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i)   clipped surrogate
        D       = exp(ref - logp) - (ref - logp) - 1                      k3 KL estimate, >= 0, unbiased
                                                                          for KL(pi_theta || pi_ref)
        l       = -S + beta * D
    Aggregation over tokens (m = mask):
        "token-mean" (DAPO, default): sum_{i,t} m l / num_tokens, num_tokens = sum m by default. Under
                     gradient accumulation pass the GLOBAL token count of the whole batch so every token
                     weighs the same whatever micro-batch it fell in.
        "seq-mean"   (original GRPO): sum_i [sum_t m l / sum_t m] / num_seqs (num_seqs = N by default);
                     short completions get larger per-token weight (length bias).
        "dr-grpo"    (Dr.GRPO):       sum_{i,t} m l / (num_seqs * max_len), max_len = T by default: a
                     constant normaliser, no length bias.
    eps_high > eps_low is DAPO's "clip-higher": lets unlikely good tokens grow a bit more before the clip.

    Returns (loss scalar, stats) with stats floats: clip_low / clip_high / clip_region (fraction of tokens
    whose gradient the clip switched off, below / above / either), kl (mean D), ratio_mean/min/max,
    pg_loss, kl_loss.

    Why the loss is ~0 at mu = 1: on-policy, logp == old_logp numerically, so rho = 1 and the clip is
    inactive, and sum A_i over a group is 0 - the logged value is ~beta*KL. The GRADIENT is not zero:
    d(rho A)/d theta = A * grad log pi_theta. Judge training by the reward curve, not the loss.
    """
    if agg not in ("token-mean", "seq-mean", "dr-grpo"):
        raise ValueError(f"grpo_loss: agg must be 'token-mean', 'seq-mean' or 'dr-grpo', got {agg!r}")
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape or adv.shape != logp.shape[:1]:
        raise ValueError(f"grpo_loss: need logp/old_logp/mask [N, T] and adv [N]; got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(mask.shape)}, {tuple(adv.shape)}")
    if beta != 0 and (ref_logp is None or ref_logp.shape != logp.shape):
        raise ValueError("grpo_loss: beta != 0 needs ref_logp of the same shape as logp")
    m = mask.to(logp.dtype)  # [N, T]
    A = adv.to(logp.dtype)[:, None]  # [N, 1] one advantage for all tokens of a completion
    old = old_logp.detach()
    ratio = torch.exp((logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [N, T]
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # [N, T]
    surrogate = torch.minimum(ratio * A, clipped * A)  # [N, T]
    per_token = -surrogate  # [N, T]
    if ref_logp is not None:
        d = (ref_logp.detach() - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [N, T] log(pi_ref/pi)
        kl = torch.exp(d) - d - 1.0  # [N, T] k3 >= 0
    else:
        kl = torch.zeros_like(logp)
    if beta != 0:
        per_token = per_token + beta * kl

    def aggregate(x):  # x [N, T] -> scalar, the chosen normalisation
        if agg == "token-mean":
            denom = m.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=x.dtype)
            return (x * m).sum() / denom.clamp(min=1)
        n_seq = x.shape[0] if num_seqs is None else num_seqs
        if agg == "seq-mean":
            return ((x * m).sum(1) / m.sum(1).clamp(min=1)).sum() / max(n_seq, 1)
        L = x.shape[1] if max_len is None else max_len
        return (x * m).sum() / (max(n_seq, 1) * max(L, 1))

    loss = aggregate(per_token)
    with torch.no_grad():  # diagnostics only
        n_tok = m.sum().clamp(min=1)
        low = ((ratio < 1.0 - eps_low) & (A < 0)).to(m.dtype) * m  # clip zeroed the gradient (A < 0)
        high = ((ratio > 1.0 + eps_high) & (A > 0)).to(m.dtype) * m  # clip zeroed the gradient (A > 0)
        on = m > 0
        stats = {
            "clip_low": float(low.sum() / n_tok),
            "clip_high": float(high.sum() / n_tok),
            "clip_region": float((low + high).sum() / n_tok),
            "kl": float((kl * m).sum() / n_tok),
            "ratio_mean": float((ratio * m).sum() / n_tok),
            "ratio_min": float(ratio[on].min()) if on.any() else 1.0,
            "ratio_max": float(ratio[on].max()) if on.any() else 1.0,
            "pg_loss": float(aggregate(-surrogate)),
            "kl_loss": float(beta * aggregate(kl)),
        }
    return loss, stats


# ===================================================================================================
# 3. REWARDS (all of them live here)
#
# The paper says only: Stage I scores the caption "field by field" against the reference; Stage II's
# reward "depends on the first position at which an evaluator accepts a diagnosis". The weights, the
# matching rules and the decay below are OUR choices (documented, unit-tested). Both functions are pure
# string -> (float, info) maps and never raise on model output: malformed text gets reward 0 and
# info["malformed"] = True, which the trainer counts and logs.
# Parsing and the clinical judge come from eval.py, so training and evaluation read answers identically.
# ===================================================================================================
CAPTION_W_FIELDS = 0.9  # weight of the mean field agreement
CAPTION_W_FORMAT = 0.1  # weight of the format term (all 8 fields present, nothing else)

# Small synonym table for caption VALUES (diagnosis synonyms are eval.canonical's job). Keys are mapped
# to the value on the right, for whole phrases and for single words alike.
CAPTION_SYNONYMS = {
    "red": "erythematous", "erythema": "erythematous", "purple": "violaceous", "purplish": "violaceous",
    "grey": "gray", "blue-grey": "blue-gray", "skin-coloured": "skin-colored", "flesh-colored": "skin-colored",
    "flesh-coloured": "skin-colored", "skin colored": "skin-colored", "well-defined": "well-demarcated",
    "sharp": "well-demarcated", "sharply demarcated": "well-demarcated", "well defined": "well-demarcated",
    "well demarcated": "well-demarcated", "ill-defined": "poorly-demarcated", "poorly defined": "poorly-demarcated",
    "poorly-defined": "poorly-demarcated", "ill defined": "poorly-demarcated", "oval-shaped": "oval",
    "circular": "round", "single": "solitary", "widespread": "generalized", "generalised": "generalized",
    "ulcer": "central ulcer", "ulceration": "central ulcer", "none": "none", "absent": "none", "-": "none",
}


def _caption_value_tokens(value: str) -> tuple[frozenset, list]:
    """'Erythematous, Salmon' -> ({'erythematous', 'salmon'}, ['erythematous', 'salmon']).

    Returns (set of synonym-normalised phrases, bag of synonym-normalised words); "none" is the empty set.
    """
    phrases = []
    for p in str(value).lower().replace(";", ",").replace(" and ", ",").split(","):
        p = " ".join(p.strip(" .").split())
        if p:
            phrases.append(CAPTION_SYNONYMS.get(p, p))
    phrases = [p for p in phrases if p != "none"]
    words = [CAPTION_SYNONYMS.get(w, w) for p in phrases for w in p.split()]
    return frozenset(phrases), words


def caption_field_score(pred: str, ref: str) -> float:
    """Agreement of one caption field, in [0, 1].

        s = 1                        if the sets of (synonym-normalised) values are equal, order-free
                                     ("none" == "none"; categorical exact / synonym match);
        s = F1(words(pred), words(ref))   otherwise: token F1 = 2 P R / (P + R) over word multisets,
                                     partial credit for free text and multi-value fields
                                     ("well-demarcated, irregular" vs "well-demarcated, regular" = 0.5).
    One side "none" and the other not -> 0.
    """
    ps, pw = _caption_value_tokens(pred)
    rs, rw = _caption_value_tokens(ref)
    if ps == rs:
        return 1.0
    if not pw or not rw:
        return 0.0
    common = 0
    pool = list(rw)
    for w in pw:  # multiset intersection
        if w in pool:
            pool.remove(w)
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(pw), common / len(rw)
    return 2 * precision * recall / (precision + recall)


def reward_caption(text: str, fields: dict) -> tuple[float, dict]:
    """Stage I reward: field-by-field agreement of a generated caption with the reference fields.

        r = 0.9 * (1/8) sum_f s_f(pred_f, ref_f) + 0.1 * format
        format = (#fields parsed / 8) * (1 if every non-empty line is a parsed field line, else 0.5)

    s_f is caption_field_score (exact/synonym set match, else token F1); a field the caption omits
    scores 0. Why mostly content: the format is learned in a few steps, after that it only adds noise to
    the group comparison; 0.1 keeps a gradient towards parseable output when nothing else differs.
    Malformed (no field parsed, empty, not a string) -> r = 0, info["malformed"] = True.
    Returns (r, info) with info: per-field scores ("field/<name>"), "format", "malformed".
    """
    import data
    import eval as skin_eval  # the project's evaluation module (shadows the builtin only here)

    names = data.CAPTION_FIELDS
    info = {"malformed": True, "format": 0.0}
    try:
        parsed = skin_eval.parse_caption(text) if isinstance(text, str) else {}
    except Exception:  # a parser bug must not kill a training run: count it as malformed
        parsed = {}
    parsed = {k: v for k, v in (parsed or {}).items() if k in names}
    if not parsed:
        info.update({f"field/{f}": 0.0 for f in names})
        return 0.0, info
    scores = {f: caption_field_score(parsed[f], fields.get(f, "none")) if f in parsed else 0.0 for f in names}
    lines = [ln for ln in text.splitlines() if ln.strip()]
    tidy = 1.0 if len(lines) == len(parsed) else 0.5
    fmt = len(parsed) / len(names) * tidy
    r = CAPTION_W_FIELDS * sum(scores.values()) / len(names) + CAPTION_W_FORMAT * fmt
    info.update({f"field/{f}": s for f, s in scores.items()})
    info.update({"malformed": False, "format": fmt})
    return float(r), info


DIFF_DECAY = 0.7  # position credit c_k = 0.7**(k-1): 1, .70, .49, .34, .24, .17 for ranks 1..6
DIFF_NEAR_MISS = 0.25  # a same-group (near-miss) diagnosis earns 0.25 * c_k when nothing is accepted
DIFF_SAFETY_PENALTY = 0.3  # top-1 crosses the malignant <-> benign boundary
DIFF_W_CONTENT = 0.9
DIFF_W_FORMAT = 0.1


def reward_differential(text: str, truth: str) -> tuple[float, dict]:
    """Stage II reward: position-dependent credit for a ranked differential (up to 6 lines "k. label").

        k*    = first rank whose diagnosis eval.judge accepts ("correct" or "subtype")
        c_k   = 0.7 ** (k - 1)                          (1 at rank 1, 0.17 at rank 6)
        hit   = c_{k*}                                  if some rank is accepted
              = 0.25 * c_{k'}                           else, k' = first "near_miss" rank (same nine group)
              = 0                                       else
        r     = 0.9 * hit + 0.1 * format - 0.3 * [judge(rank 1) == "safety_critical"]
        format = 1 for 1..6 numbered lines "1. ..", "2. .." and nothing else; 0.5 for a looser list
                 (bullets, extra text, repeats); 0 for bare names in prose that the parser still found.

    Why this shape: the paper's reward depends on the first accepted rank; a geometric decay makes rank 1
    clearly best (Top-1 is the headline metric) while a correct answer anywhere in the top 6 still beats
    a plain miss (Top-6 is the second metric). One deliberate exception: a near miss at rank 1 (0.25)
    outranks a hit at rank 6 (0.17), since a treatment-consistent first guess is clinically more useful
    than the right name buried last. The safety penalty discourages a top-1 that
    misses a cancer (or calls a benign lesion malignant); it can push r below 0, below the malformed 0,
    so the format weight stays small and malformed output gets no format credit.
    Malformed (nothing parsed, empty, not a string, or prose naming no known diagnosis) -> r = 0,
    info["malformed"] = True.
    Returns (r, info): "rank" (first accepted rank or 0), "verdicts" (per item), "format", "malformed",
    "safety_top1".
    """
    import re

    import eval as skin_eval

    info = {"malformed": True, "format": 0.0, "rank": 0, "verdicts": [], "safety_top1": False}
    try:
        ranked, listed = skin_eval.parse_ranked_list_ex(text) if isinstance(text, str) else ([], False)
    except Exception:
        ranked, listed = [], False
    ranked = list(ranked or [])[:6]
    verdicts = []
    for label in ranked:
        try:
            verdicts.append(skin_eval.judge(label, truth))
        except Exception:
            verdicts.append("unknown")
    if not ranked or (not listed and all(v == "unknown" for v in verdicts)):
        return 0.0, info  # nothing parsed, or prose that names no diagnosis at all
    hit = 0.0
    accepted = [k for k, v in enumerate(verdicts, 1) if v in ("correct", "subtype")]
    near = [k for k, v in enumerate(verdicts, 1) if v == "near_miss"]
    if accepted:
        hit = DIFF_DECAY ** (accepted[0] - 1)
        info["rank"] = accepted[0]
    elif near:
        hit = DIFF_NEAR_MISS * DIFF_DECAY ** (near[0] - 1)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    numbered = all(re.match(rf"{k}\.\s+\S", ln) for k, ln in enumerate(lines, 1)) and 1 <= len(lines) <= 6
    fmt = 1.0 if numbered and len(lines) == len(ranked) else (0.5 if listed else 0.0)
    safety = verdicts[0] == "safety_critical"
    r = DIFF_W_CONTENT * hit + DIFF_W_FORMAT * fmt - DIFF_SAFETY_PENALTY * float(safety)
    info.update({"malformed": False, "format": fmt, "verdicts": verdicts, "safety_top1": safety})
    return float(r), info


# ===================================================================================================
# 4. What is trained, and how the reference policy comes for free
#
# LoRA (Hu et al. 2021): a frozen linear W gets a trainable low-rank delta, y = W x + (alpha/r) B A x,
# A [r, d_in], B [d_out, r], B = 0 at start so training begins exactly at the pretrained model.
# GRPO's KL term needs pi_ref = the policy before RL. With LoRA that is simply "adapters off", and with
# DVE it is "gates forced to 1" (dve.dve_static): the SAME weights serve as policy and reference, so no
# second 3B/7B copy sits in memory. Only full fine-tuning of the LLM needs a frozen copy.
# ===================================================================================================
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """nn.Linear + low-rank delta:  y = x W^T + b + (alpha / r) * (x A^T) B^T.

    Subclasses nn.Linear and keeps the base `weight` / `bias` under their own names, so the state-dict
    keys of the base weights stay Hub-shaped. A, B are float32 even when W is bf16 (see MasterWeights for
    why): the delta is computed in fp32 and cast to the activation dtype.
    `enabled = False` turns the adapter off (the reference policy).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)  # skip nn.Linear.__init__: reuse the base tensors, allocate nothing
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # like nn.Linear's init; B = 0 -> delta = 0
        self.enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # [..., d_out] frozen path, in the model dtype
        if not self.enabled:
            return y
        delta = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)  # [..., d_out] fp32
        return y + (self.scaling * delta).to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W' = W + (alpha / r) B A, in W's dtype (for export)."""
        return (self.weight.float() + self.scaling * (self.lora_B @ self.lora_A)).to(self.weight.dtype)

    def extra_repr(self):
        return f"{self.in_features} -> {self.out_features}, rank={self.rank}, alpha={self.alpha}"


def apply_lora(model, rank: int = 16, alpha: float = 32.0, targets=LORA_TARGETS) -> dict:
    """Wrap the chosen projections of the LANGUAGE model (model.model.layers.*) in LoRALinear, in place.

    The vision tower's MLP also has gate/up/down_proj; it is not touched (DVE is its trainable part).
    Freezes nothing else: call `set_trainable` for that. Returns {"layers": n, "params": n_lora_params}.
    """
    bad = set(targets) - set(LORA_TARGETS)
    if bad or rank < 1:
        raise ValueError(f"apply_lora: rank must be >= 1 and targets among {LORA_TARGETS}; got {rank}, {sorted(bad)}")
    n_layers = n_params = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                lin = getattr(parent, name, None)
                if isinstance(lin, nn.Linear) and not isinstance(lin, LoRALinear):
                    wrapped = LoRALinear(lin, rank, alpha)
                    setattr(parent, name, wrapped)
                    n_layers += 1
                    n_params += wrapped.lora_A.numel() + wrapped.lora_B.numel()
    return {"layers": n_layers, "params": n_params}


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_disabled(model):
    """Inside the block every LoRALinear computes only its frozen base: pi_ref for the LoRA part."""
    layers = lora_layers(model)
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(layers, before):
            m.enabled = e


@contextlib.contextmanager
def reference_policy(model):
    """pi_ref = the same weights with every trainable delta off: LoRA adapters off AND DVE gates = 1."""
    import dve

    with adapters_disabled(model), dve.dve_static(model):
        yield model


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight and put plain nn.Linear layers back (Hub layout again,
    so VLM.save_pretrained writes a checkpoint any Qwen2.5-VL loader reads). In place; returns model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device=child.weight.device, dtype=child.weight.dtype)
                lin.weight.copy_(child.merged_weight() if child.enabled else child.weight)
                if child.bias is not None:
                    lin.bias.copy_(child.bias)
                setattr(parent, name, lin)
    return model


class MasterWeights:
    """fp32 master copies of low-precision trainable parameters (mixed-precision training).

    Why: bf16 has 8 significant bits, so a weight w can only move in steps of about |w| * 2**-8. Adam's
    step is ~lr per element: with the paper's lr = 1e-6 (Stage I) / 5e-7 (Stage II) and |w| ~ 0.02,
    lr / |w| = 5e-5 << 2**-9, and `w - lr * u` rounds back to w - in bf16 the update simply vanishes.
    So the optimizer owns an fp32 copy, accumulates the tiny steps there, and after each step the
    model's bf16 weight is refreshed from it (rounding once, not losing the sum).
    Parameters that already are fp32 (LoRA A/B, fp32 models) are used directly, at no extra cost.

    Usage: mw = MasterWeights(params); opt = AdamW(mw.params); loss.backward(); mw.grads_to_master();
           opt.step(); mw.master_to_model(); mw.zero_grad().
    """

    def __init__(self, params):
        self.model_params = [p for p in params if p.requires_grad]
        self.params = [p if p.dtype == torch.float32 else
                       nn.Parameter(p.detach().float().clone()) for p in self.model_params]

    def grads_to_master(self):
        for p, m in zip(self.model_params, self.params):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()

    @torch.no_grad()
    def master_to_model(self):
        for p, m in zip(self.model_params, self.params):
            if m is not p:
                p.copy_(m)

    def zero_grad(self):
        for p in self.model_params + self.params:
            p.grad = None


def set_trainable(model, lora: bool = True, dve_layers: bool = True, llm: bool = False) -> dict:
    """Freeze everything, then unfreeze the chosen sets; returns trainable-parameter counts per set.

    lora: the LoRA A/B matrices; dve_layers: the KSM gate heads of every FDLinear (dve.dve_parameters;
    the spectrum it is built from stays frozen so "gates = 1" is still the reference); llm: the whole
    language model (full fine-tuning, which then needs a frozen reference copy).
    """
    import dve

    for p in model.parameters():
        p.requires_grad_(False)
    counts = {"lora": 0, "dve": 0, "llm": 0}
    if llm:
        for p in model.model.parameters():
            p.requires_grad_(True)
            counts["llm"] += p.numel()
        if model.lm_head is not None:
            for p in model.lm_head.parameters():
                p.requires_grad_(True)
                counts["llm"] += p.numel()
    if lora:
        for m in lora_layers(model):
            for p in (m.lora_A, m.lora_B):
                p.requires_grad_(True)
                counts["lora"] += p.numel()
    if dve_layers:
        for p in dve.dve_parameters(model):  # the KSM gate heads; the spectrum stays frozen (see dve.py)
            p.requires_grad_(True)
            counts["dve"] += p.numel()
    return counts


def completion_logprobs(model, batch: dict, completion_ids: torch.Tensor, mask: torch.Tensor,
                        chunk: int = 1024, temperature: float = 1.0, impl: str = "auto", image_embeds=None):
    """log pi(o_t | q, o_<t) / T for every completion token -> [B, L] float32 (0 where mask = 0).

    batch: the prompt (make_batch output: input_ids [B, T0] LEFT-padded, attention_mask, pixel_values,
    image_grid_thw); completion_ids / mask: [B, L] from VLM.generate. The hidden state that predicts
    completion token j sits at position T0 - 1 + j of prompt+completion.

    Memory: the decoder runs once over [B, T0 + L]; then only the rows of REAL completion tokens go
    through lm_head, `chunk` rows at a time, and each chunk is checkpointed: its [chunk, V] logits are
    recomputed in backward instead of kept. So at no time do [B*L, V] logits exist, in any dtype.
    `temperature` must match the sampler's (the sampler's log-probs are log softmax(logits / T)).
    """
    ids = batch["input_ids"].to(model.device)  # [B, T0]
    T0 = ids.shape[1]
    comp = completion_ids.to(ids.device)  # [B, L]
    m = mask.to(ids.device) > 0  # [B, L]
    attn = batch.get("attention_mask")
    attn = torch.ones_like(ids) if attn is None else attn.to(ids.device)
    full = torch.cat([ids, comp], 1)  # [B, T0 + L]
    full_attn = torch.cat([attn, m.to(attn.dtype)], 1)  # [B, T0 + L]
    h = model.hidden_states(full, full_attn, batch.get("pixel_values"), batch.get("image_grid_thw"),
                            image_embeds=image_embeds)  # [B, T0 + L, D]
    h = h[:, T0 - 1:T0 - 1 + comp.shape[1]]  # [B, L, D] states that predict o_1..o_L
    rows = h[m]  # [n, D] real completion tokens only
    targets = comp[m]  # [n]
    W = model.lm_head_weight  # [V, D]

    def chunk_logp(h_c, y_c):
        logits = F.linear(h_c, W)  # [c, V] in the model dtype
        if temperature != 1.0:
            logits = logits / temperature
        return selective_log_softmax(logits, y_c, impl=impl)  # [c] float32

    out = []
    for s in range(0, rows.shape[0], chunk):
        h_c, y_c = rows[s:s + chunk], targets[s:s + chunk]
        if torch.is_grad_enabled() and h_c.requires_grad:
            out.append(torch.utils.checkpoint.checkpoint(chunk_logp, h_c, y_c, use_reentrant=False))
        else:
            out.append(chunk_logp(h_c, y_c))
    flat = torch.cat(out) if out else torch.zeros(0, device=ids.device)  # [n]
    logp = torch.zeros(comp.shape, dtype=torch.float32, device=ids.device)  # [B, L]
    return logp.masked_scatter(m, flat)
