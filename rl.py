"""rl.py: the two-stage GRPO of SkinFlow (arXiv 2601.09136, "Staged RL": Stage I and Stage II), written from scratch.

The paper trains with GRPO in two stages (lrs 1e-6 then 5e-7, verl): Stage I rewards a structured
caption of the lesion (8 fields), Stage II rewards a ranked differential diagnosis by the position of
the first accepted answer. This file holds everything one rollout touches, in reading order: the
paper's parts first (sections 1-2), then, after the marker "below: plumbing (not in the paper)", what
makes them run (sections 3-6):

  1. the GRPO objective (`group_advantages`, `grpo_loss`) with its equations;
  2. the rewards of both stages (`reward_caption`, `reward_differential`), in ONE marked section;
  ----- below: plumbing (not in the paper) -----
  3. log-probabilities of sampled tokens (`selective_log_softmax`, with the fused C++/CUDA kernel of
     csrc/logprob*.{cpp,cu}) - the memory hot spot of GRPO with a 151,936-token vocabulary;
  4. what is trained: LoRA (the layer and `apply_lora` live in skinflow.py, the lowest import floor), the
     reference policy without a second model copy, fp32 master weights, chunked completion log-probs;
  5. the trainer (`python rl.py vision|warmup|stage1|stage2 ...`) with checkpoint / resume; vision and
     warmup are the tiny preset's supervised stand-ins for pretraining (a ViT that sees, an LLM that
     answers), stage1 / stage2 are the paper's GRPO stages; every stage trains on SynthDerm (default) or
     on real photos with `--data fitzpatrick17k --image-dir DIR [--skincap CSV] [--split train]`
     (data.Fitzpatrick17kData: undecodable images skipped, counted and logged; docs/real-data.md); its
     --init is loaded by dve.load, the project's one checkpoint loader;
  6. multi-GPU: the same trainer under `torchrun --nproc_per_node N rl.py ...` (rollouts sharded by
     whole groups, gradients summed over ranks, FSDP2 for full fine-tuning).

Notation used throughout: a prompt q (image + question) gets G sampled completions o_1..o_G; token t
of completion i is o_{i,t}; pi_theta is the policy being trained, pi_old the policy that sampled the
completions, pi_ref the frozen reference.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import skinflow as _skinflow  # rl.py may import every module; LoRALinear lives there (section 4)

# ===================================================================================================
# 1. The GRPO objective (DeepSeekMath, Shao et al. 2024; the clip-higher of DAPO; Dr.GRPO aggregation)
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
# 2. REWARDS (all of them live here)
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
DIFF_NEAR_MISS = 0.25  # weight w of a near miss ranked above the first hit (any 0 < w < 1 keeps r monotone)
DIFF_SAFETY_PENALTY = 0.3  # top-1 crosses the malignant <-> benign boundary
DIFF_W_CONTENT = 0.9
DIFF_W_FORMAT = 0.1


def reward_differential(text: str, truth: str) -> tuple[float, dict]:
    """Stage II reward: position-dependent credit for a ranked differential (up to 6 lines "k. label").

        k*    = first rank whose diagnosis eval.judge accepts ("correct" or "subtype"), k* = inf if none
        k'    = first rank judged "near_miss" (same differential family, eval.judge), k' = inf if none
        c_k   = 0.7 ** (k - 1) for k = 1..6, c_inf = 0          (1 at rank 1, 0.17 at rank 6)
        hit   = c_{k*} + w * max(0, c_{k'} - c_{k*})            w = 0.25
              = (1 - w) c_{k*} + w c_{k'}   if a near miss is ranked above the first hit (k' < k*)
              = c_{k*}                      otherwise; a miss with a near miss gets w c_{k'}
        r     = 0.9 * hit + 0.1 * format - 0.3 * [judge(rank 1) == "safety_critical"]
        format = 1 for 1..6 numbered lines "1. ..", "2. .." and nothing else; 0.5 for a looser list
                 (bullets, extra text, repeats); 0 for bare names in prose that the parser still found.

    hit is a weighted mean of the two credits, never a choice between them. The earlier rule (hit =
    c_{k*} if anything is accepted, else w c_{k'}) let a hit REPLACE the near-miss credit: for SCC,
    "1. BCC .. 5. dermatofibroma" scored 0.325 and the same list plus "6. SCC" 0.251, so the policy was
    paid to leave the right answer out of its top 6, against the Top-6 metric. The present form has
    two properties, checked by hypothesis over random lists in the tests:
      (a) adding the right answer never lowers r. Below k': hit goes from w c_{k'} to
          (1 - w) c_{k*} + w c_{k'} >= w c_{k'}; at or above k': to c_{k*} >= c_{k'} > w c_{k'};
      (b) a hit at rank k strictly beats the same list with the hit at rank k + 1 (and the item from
          k + 1 at rank k). Worst case, a near miss moves up into rank k:
              before  c_k            after  (1 - w) c_{k+1} + w c_k = (0.7 (1 - w) + w) c_k < c_k
          for every w < 1 (with an earlier near miss both sides keep w c_{k'} and lose (1 - w) 0.3 c_k).
    Why not the additive c_{k*} + w c_{k'} [k' < k*]: it is monotone too, but only for w < 0.3, and it
    pays "near miss at 1, hit at 2" 0.95 against 1.0 for the hit at 1. A near miss is exactly the
    plausible look-alike a policy puts above the truth (psoriasis / lichen planus, BCC / SCC), so that
    0.05 gap would flatten the ranking signal Stage II has to learn; the weighted mean keeps it at
    0.225 (1 vs 0.775).
    Why the geometric decay: the paper's reward depends on the first accepted rank; 0.7 per rank makes
    rank 1 clearly best (Top-1 is the headline metric) while a correct answer anywhere in the top 6
    still beats a plain miss (Top-6 is the second metric). The safety penalty discourages a top-1 that
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
    accepted = [k for k, v in enumerate(verdicts, 1) if v in ("correct", "subtype")]
    near = [k for k, v in enumerate(verdicts, 1) if v == "near_miss"]
    k_hit = accepted[0] if accepted else math.inf  # k*: first accepted rank (inf: none)
    k_near = near[0] if near else math.inf  # k': first near-miss rank (inf: none)
    credit = lambda k: 0.0 if k == math.inf else DIFF_DECAY ** (k - 1)  # noqa: E731  c_k, c_inf = 0
    # c_{k*} + w (c_{k'} - c_{k*})^+: a near miss only counts when it is ranked ABOVE the right answer,
    # and then it is mixed with the hit (never replaces it), so naming the right answer can only raise r
    hit = credit(k_hit) + DIFF_NEAR_MISS * max(0.0, credit(k_near) - credit(k_hit))
    info["rank"] = accepted[0] if accepted else 0
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    numbered = all(re.match(rf"{k}\.\s+\S", ln) for k, ln in enumerate(lines, 1)) and 1 <= len(lines) <= 6
    fmt = 1.0 if numbered and len(lines) == len(ranked) else (0.5 if listed else 0.0)
    safety = verdicts[0] == "safety_critical"
    r = DIFF_W_CONTENT * hit + DIFF_W_FORMAT * fmt - DIFF_SAFETY_PENALTY * float(safety)
    info.update({"malformed": False, "format": fmt, "verdicts": verdicts, "safety_top1": safety})
    return float(r), info


# ###################################################################################################
# ===== below: plumbing (not in the paper) =====
# Sections 1-2 above are what the paper describes (group advantages, the clipped GRPO loss with its
# KL term, the Stage I / Stage II rewards). Everything below is how this file makes them run: fused
# log-probs, LoRA and the reference policy, fp32 masters, the trainer, checkpoints, multi-GPU.
# ###################################################################################################

# ===================================================================================================
# 3. Log-probabilities of the sampled tokens (the fast path every loss above is fed by)
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


def _check_logprob(ext, device) -> dict:
    """First-use self-check of csrc/logprob on `device` (see skinflow.extension_ok): the op's log-probs and
    logit gradients against a float64 PyTorch computation on small random inputs, fp32 everywhere and also
    bf16 on CUDA (the training dtype there). Two widths: one below a CUDA block, one over many blocks.
    Returns the worst case as {"max_err", "tol", "what"} (err / tol is the comparison that decides)."""
    g = torch.Generator().manual_seed(15)
    cases = [(torch.float32, 5, 1000), (torch.float32, 3, 33001)]
    if device.type == "cuda":
        cases.append((torch.bfloat16, 4, 33001))
    found = []  # (err / tol, err, tol, what) per output and case; NaN counts as infinitely wrong
    for dtype, N, V in cases:
        logits = (4 * torch.randn(N, V, generator=g)).to(device=device, dtype=dtype)  # [N, V]
        index = torch.randint(0, V, (N,), generator=g).to(device)  # [N]
        gout = torch.randn(N, generator=g).to(device)  # [N] upstream gradient
        logp, lse = ext.forward(logits.contiguous(), index)  # [N], [N]
        dx = ext.backward(gout.contiguous(), logits.contiguous(), index, lse)  # [N, V] in the logits' dtype
        x64 = logits.double()
        ref = torch.log_softmax(x64, -1).gather(-1, index[:, None]).squeeze(-1)  # [N] float64 oracle
        dref = gout.double()[:, None] * (F.one_hot(index, V).double() - torch.softmax(x64, -1))  # [N, V]
        # fp32: ~10x what a correct kernel shows (CPU twin: 7e-6 on the gradient, 1.7e-6 relative on logp);
        # bf16: the gradient is written in bf16 (8-bit mantissa), the log-probs still accumulate in fp32
        tol_f, tol_b = (2e-5, 1e-4) if dtype == torch.float32 else (2e-4, 1e-2)
        # log-probs: relative to their size (|logp| ~ 25 here, fp32 keeps ~7 digits), gradients absolute (<= |g|)
        logp_err = float((logp.double() - ref).abs().max() / (1 + ref.abs().max()))
        for what, err, tol in ((f"logp {dtype} {N}x{V} (relative)", logp_err, tol_f),
                               (f"grad {dtype} {N}x{V}", float((dx.double() - dref).abs().max()), tol_b)):
            found.append((err / tol if err == err else math.inf, err, tol, what))
    return _skinflow.worst_check(found)


_skinflow.register_extension_check("logprob", _check_logprob)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """log pi(y_n) = x[n, y_n] - logsumexp_v x[n, v] for each row n, as float32, differentiable.

    logits: [N, V] float32 / bfloat16 / float16 (float64 allowed, for tests); index: [N] int64 in [0, V).
    impl: "ext" = fused kernel (error if it cannot be built), "torch" = chunked PyTorch twin,
          "auto" = the extension when it builds (and SKINFLOW_NO_EXT is not set) and passed its first-use
          self-check on this device (skinflow.extension_ok), else PyTorch.
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
    # "auto" takes the extension only if it passed its first-use self-check on this device (it falls back
    # to the PyTorch twin for the rest of the run otherwise); "ext" insists and skips the check (the tests'
    # way to exercise the kernel itself).
    ext = _logprob_ext() if impl == "auto" else None
    use_ext = impl == "ext" or (ext is not None and _skinflow.extension_ok("logprob", logits.device, ext))
    fn = _SelectiveLogSoftmaxExt if use_ext else _SelectiveLogSoftmaxTorch
    return fn.apply(logits, index)


# ===================================================================================================
# 4. What is trained, and how the reference policy comes for free
#
# LoRA (Hu et al. 2021): a frozen linear W gets a trainable low-rank delta, y = W x + (alpha/r) B A x,
# A [r, d_in], B [d_out, r], B = 0 at start so training begins exactly at the pretrained model.
# GRPO's KL term needs pi_ref = the policy this STAGE started from. With LoRA that is "trainable adapter
# off" (an adapter loaded with --init stays on), and with DVE it is "gates as loaded" (gates = 1 after a
# fresh apply_dve; the loaded gate heads after a Stage I checkpoint, see dve_start_state): the SAME weights
# serve as policy and reference, so no second 3B/7B copy sits in memory. Only full fine-tuning of the LLM
# needs a frozen copy. bf16 presets: the adapter is computed, added and exported in fp32 (skinflow.LoRALinear).
# ===================================================================================================


# LoRALinear itself is defined in skinflow.py (every loader must rebuild an exported fp32 adapter, and
# skinflow.py is the lowest import floor); rl.LoRALinear is the same class.
LoRALinear = _skinflow.LoRALinear
# apply_lora (wrap the LLM projections in a trainable LoRALinear) moved to skinflow.py too (issue 14): the
# one checkpoint loader (dve.load_with_deltas) must rebuild a LoRA run's modules without importing rl.py.
# rl.apply_lora / rl.LORA_TARGETS are the same objects.
LORA_TARGETS = _skinflow.LORA_TARGETS
apply_lora = _skinflow.apply_lora


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


def dve_start_state(model) -> dict | None:
    """Snapshot of the DVE gate heads a stage STARTS from, for `reference_policy`; None when "gates = 1" is it.

    A fresh apply_dve has zero KSM heads, so every gate is exactly 2 sigmoid(0) = 1 and dve.dve_static is the
    starting policy (and cheaper: no KSM at all). After a checkpoint whose gates were trained (Stage II from
    a Stage I export), "gates = 1" is the vision tower from BEFORE Stage I: the KL would anchor Stage II to a
    policy it never started from (KL > 0 at step 1, before any update). Then we keep an fp32 copy of the
    KSM parameters (a few M numbers for the 3B, ~25 MB) and swap them in for the reference pass.
    """
    import dve

    named = [(n, p) for n, p in model.named_parameters() if ".ksm." in n]
    if not any(".ksm." in n and "_head." in n and bool(p.detach().ne(0).any()) for n, p in named):
        return None  # no layer, or all heads zero: gates = 1 exactly
    assert len(named) == len(dve.dve_parameters(model))  # the snapshot covers every trainable of the DVE
    return {n: p.detach().clone() for n, p in named}


@contextlib.contextmanager
def _swap_parameters(model, values: dict):
    """Within the block the named parameters hold `values`; their own values come back afterwards."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        saved = {n: params[n].detach().clone() for n in values}
        for n, v in values.items():
            params[n].copy_(v)
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


@contextlib.contextmanager
def reference_policy(model, dve_start: dict | None = None):
    """pi_ref = the policy this stage STARTED from, computed with the same weights: the trainable LoRA
    adapters off (an adapter loaded with --init, `LoRALinear.start_*`, stays on) and the DVE gates as they
    were at the start: `dve_start` (from dve_start_state) swapped in, or, when None, gates forced to 1."""
    import dve

    gates = _swap_parameters(model, dve_start) if dve_start else dve.dve_static(model)
    with adapters_disabled(model), gates:
        yield model


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight and put plain nn.Linear layers back (Hub layout again,
    so VLM.save_pretrained writes a checkpoint any Qwen2.5-VL loader reads). In place; returns model.

    The sum W + B A is taken in fp32 and then rounded ONCE to W's dtype. For an fp32 model that is exact
    up to fp32 round-off; for a bf16 model it rounds most of a small update away (|B A| << ulp(W) / 2),
    which is why Trainer.export keeps bf16 adapters unmerged (docs/gpu.md)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device=child.weight.device, dtype=child.weight.dtype)
                lin.weight.copy_(child.merged_weight())  # W + start adapter + trained one if enabled, in fp32
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


def set_trainable(model, lora: bool = True, dve_layers: bool = True, llm: bool = False, vision: bool = False) -> dict:
    """Freeze everything, then unfreeze the chosen sets; returns trainable-parameter counts per set.

    lora: the LoRA A/B matrices; dve_layers: the KSM gate heads of every FDLinear (dve.dve_parameters;
    the spectrum it is built from stays frozen so "gates = 1" is still the reference); llm: the whole
    language model (full fine-tuning, which then needs a frozen reference copy); vision: the whole
    vision tower incl. the merger (the tiny warm start, whose random ViT must learn to see).
    """
    import dve

    for p in model.parameters():
        p.requires_grad_(False)
    counts = {"lora": 0, "dve": 0, "llm": 0, "vision": 0}
    if vision:
        for p in model.visual.parameters():
            p.requires_grad_(True)
            counts["vision"] += p.numel()
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


def vision_token_mask(cfg, tokens: torch.Tensor) -> torch.Tensor:
    """True where a token id is one of the vision specials, which only the prompt builder may place."""
    ids = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    return torch.isin(tokens, torch.tensor(ids, device=tokens.device))


def cut_at_vision_tokens(cfg, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Completion mask [B, L] cut after the first sampled vision special token (that token is kept).

    A random or early policy may sample <|image_pad|>; treating it like a stop token keeps every
    kept position's context identical between the sampler and the training forward, and the token
    itself is still scored (a low reward then pushes its probability down).
    """
    bad = vision_token_mask(cfg, tokens) & (mask > 0)  # [B, L]
    after = (bad.long().cumsum(1) - bad.long()) > 0  # strictly after the first bad token
    return mask * (~after).to(mask.dtype)


def truncated_rows(cfg, tokens: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Bool [B]: completions that hit the length cap WITHOUT stopping (the "truncated" share of the log).

    A row is truncated when its kept length equals max_new_tokens AND its last kept token is not a stop.
    Stops are eos (<|im_end|>, which VLM.generate keeps in the mask) and the vision specials that
    cut_at_vision_tokens treats as a stop. Counting length alone would call an answer whose <|im_end|> landed
    exactly in the last slot "truncated", although it is complete and its reward is fully earned.
    """
    lengths = mask.sum(1).long()  # [B] kept tokens per row (mask is 1 up to and including the stop)
    if tokens.shape[1] < max_new_tokens:  # no row of this batch reached the cap
        return torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    last = tokens.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)  # [B] last kept token
    stopped = (last == cfg.eos_token_id) | vision_token_mask(cfg, last)  # [B]
    return (lengths >= max_new_tokens) & ~stopped


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
    # A sampled vision special token (<|image_pad|>, <|vision_start|> ...) must not be read back as an image
    # slot: fed as input it is replaced by pad. It stays a TARGET (its own log-prob is exact); callers cut
    # the completion after it (see cut_at_vision_tokens), so no kept token is conditioned on the swap.
    comp_in = torch.where(vision_token_mask(model.cfg, comp), torch.full_like(comp, model.cfg.pad_token_id), comp)
    full = torch.cat([ids, comp_in], 1)  # [B, T0 + L]
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
            # Divide in fp32, exactly like the sampler (VLM._choose works on float32 logits): in bf16 the
            # quotient is rounded to 8 significant bits (|x / T| ~ 10 -> steps of 0.06), a log-prob error the
            # PPO ratio would read as a policy change. The fp32 [c, V] chunk is recomputed in backward
            # (the chunk is checkpointed), so it costs one chunk of memory, not [B*L, V].
            logits = logits.float() / temperature  # [c, V] fp32
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


# ===================================================================================================
# 5. The trainer: python rl.py vision|warmup|stage1|stage2 [--options]
#
# One step, in the order a student should read it (see `_rl_step`):
#   a. take B prompts (image + stage prompt) at the saved data position;
#   b. encode each image ONCE, sample G completions per prompt in one batched KV-cache call;
#   c. decode, score with the stage reward, group-normalise into advantages;
#   d. log-probs of the reference policy (same weights, adapters off, DVE gates = 1), no grad;
#   e. mu inner epochs: for each micro-batch of whole groups, recompute log pi_theta with grad, GRPO loss
#      with the GLOBAL token count, backward; then one clipped optimizer step (skipped if non-finite).
# Everything a resume needs (trainable weights, optimizer, step, data position, RNG states) goes to one
# safetensors file, written atomically (tmp file + os.replace), also on Ctrl-C.
# ===================================================================================================
STAGES = ("vision", "warmup", "stage1", "stage2")
SUPERVISED = ("vision", "warmup")  # the tiny preset's two supervised stand-ins for pretraining (no rewards)


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a run (also the CLI flags: --prompts 8 --lr 1e-6 ...). Defaults fit the tiny preset."""
    stage: str = "stage1"
    init: str = "tiny"            # preset name or model dir (the previous stage's <out>/<stage>/model)
    out: str = "runs/tiny"        # run folder; this stage writes <out>/<stage>/
    steps: int = 30
    prompts: int = 4              # B prompts per step
    G: int = 4                    # completions per prompt
    mu: int = 1                   # inner epochs (optimizer steps) per rollout batch
    lr: float = 2e-4
    lr_schedule: str = "constant"  # constant | cosine (linear warm-up, then cosine decay to min_lr_ratio * lr)
    lr_warmup: int = 0            # steps of linear lr warm-up (used by both schedules)
    min_lr_ratio: float = 0.1     # cosine floor, as a fraction of lr
    beta: float = 0.01            # KL coefficient (paper: unknown; 0 .. 0.04 in the anchors)
    eps_low: float = 0.2
    eps_high: float = 0.28
    agg: str = "token-mean"
    scale: str = "std"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    micro_prompts: int = 4        # prompts (x G completions) per forward/backward
    train: str = "lora"           # trainable sets among lora, dve, llm, vision (dve needs DVE layers: --dve)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    dve: bool = False             # convert the vision tower's MLP linears to FDLinear before training
    dve_k: int = 4
    image_size: int = 112
    max_pixels: int = 112 * 112
    n_data: int = 4096            # SynthDerm items in the training stream (cycled, reshuffled per epoch)
    # Real data (issue 12). --data fitzpatrick17k trains on photos: --image-dir holds <md5hash>.jpg (from
    # `python data.py fetch`), --csv defaults to the repo's full CSV (assets/), --skincap is the SkinCAP
    # CSV that Stage I needs, --split a data.py protocol ("train" = the random, near-duplicate-aware 80 %;
    # "a12/train", "expert/train", ...). SynthDerm ignores these four; Fitzpatrick17k ignores n_data.
    data: str = "synthderm"       # synthderm | fitzpatrick17k
    csv: str = ""                 # Fitzpatrick17k CSV ("" = assets/fitzpatrick17k.csv.gz)
    image_dir: str = ""
    skincap: str = ""             # SkinCAP CSV (skincap_v240623.csv)
    split: str = "train"          # Fitzpatrick17k split this stage trains on; evaluate() uses its test part
    data_seed: int = 0            # WHICH SynthDerm images exist (train/val/test): keep it fixed to compare runs
    seed: int = 0                 # init, sampler and the ORDER of the training stream (train.sh's SEED=)
    save_every: int = 10
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    dtype: str = "fp32"           # fp32 | bf16 (bf16: fp32 master copies for bf16 trainables)
    device: str = "auto"
    chunk: int = 1024             # completion rows per lm_head + log-softmax chunk
    eval_n: int = 64              # held-out items scored greedily at the end (0 = skip)
    aux_weight: float = 1.0       # warm-up only: weight of the max-pooled looks_like probe loss (0 = off)
    sft_order: str = "mixed"      # warm-up Stage II target: "mixed" (half alpha, half shuffled) | "shuffled" | "looks" | "alpha"
    resume: bool = True
    prompt_seeds: bool = False    # sample each prompt with a seed from its global data position (section 6)


def _rl_caption_fields():
    import data

    return data.CAPTION_FIELDS


def _stage_prompt(stage: str) -> str:
    import data

    return data.STAGE1_PROMPT if stage == "stage1" else data.STAGE2_PROMPT


def _stage_reward(stage: str, text: str, item) -> tuple[float, dict]:
    if stage == "stage1":
        return reward_caption(text, item.fields)
    return reward_differential(text, item.label)


SFT_MIXED_ALPHA = 0.5  # sft_order "mixed": share of items whose cluster is listed alphabetically
SFT_ORDERS = ("mixed", "shuffled", "looks", "alpha")  # the --sft-order values (checked by main before loading)


def _warmup_target(item, task: str, order: str = "mixed") -> str:
    """SFT target of the tiny warm start: the caption, or a differential built from what the lesion LOOKS like.

    Stage II target, order="looks": data.reference_differential(looks_like) = [looks_like, its cluster
    siblings, same nine-group, ...]. order="shuffled" (default): the same six entries, but the members
    of looks_like's confusable cluster that open the list are put in a random order (seeded by the item
    id, so the target of an item never changes). Why both choices:
      * `looks_like`, not the true label: the warm start is an "explicit look" diagnostician, wrong on
        every mimic (25 % of SynthDerm) whose true class only the never-captioned texture reveals.
      * shuffled: the warm start learns WHICH group of diagnoses fits the picture (Top-6 high) but not
        which one of the group to put first (Top-1 low). Ranking is exactly what the Stage II reward
        (credit decaying with the rank of the first accepted answer) teaches, so RL has room to show it:
        it must learn, from reward alone, which sibling to put first for which image.
    order="alpha": the cluster in alphabetical order, the same list for every member. Kept as a measured
    counter-example: the warm start is then SURE of its order, sampling at T 0.7 rarely tries another
    first entry, and Stage II has nothing to reinforce (it lowered Top-1 in our runs).
    order="mixed" (train.sh's tiny preset): per item, "alpha" with probability SFT_MIXED_ALPHA = 0.5,
    else "shuffled". The warm start's GREEDY first entry is then the alphabetically first member of the
    recognised group, a fixed choice without clinical sense (actinic keratosis for the red scaly group,
    though psoriasis is three times as common and benign), while its SAMPLES still try every member (the
    shuffled half). Why: with "shuffled" alone the greedy first entry was an arbitrary member, so how much
    Stage II could gain by putting the likely member first depended on which member a seed happened to
    pick (+1.8 to +11.2 Top-1 over three seeds); "mixed" gives every seed the same thing to learn
    (docs/tiny-run.md, "Why the mixed order").
    """
    import random

    import data

    if task == "stage1":
        return data.format_caption(item.fields)
    ranked = data.reference_differential(item.looks_like)
    if order not in SFT_ORDERS:
        raise ValueError(f"sft_order must be one of {', '.join(SFT_ORDERS)}, got {order!r}")
    if order != "looks" and item.looks_like in data.CLASS_RULES:
        cluster = data.CLUSTERS[data.CLASS_RULES[item.looks_like]["cluster"]]
        head = [d for d in ranked if d in cluster]  # the cluster members, which open the reference list
        rng = random.Random(str(item.id))  # per item: an item's target never changes between epochs
        if order == "mixed":  # half the items in the fixed alphabetical order, half shuffled
            order = "alpha" if rng.random() < SFT_MIXED_ALPHA else "shuffled"
        if order == "shuffled":
            rng.shuffle(head)
        else:
            head.sort()  # "alpha": the textbook order, the same list for every member of the cluster
        ranked = head + [d for d in ranked if d not in cluster]
    return data.format_differential(ranked)


def lr_at(cfg: "TrainConfig", step: int) -> float:
    """Learning rate of optimizer step `step` (0-based), a pure function of the step so a resumed run
    continues the same schedule:

        warm-up  (step < W):      lr * (step + 1) / W
        constant (after W):       lr
        cosine   (after W):       lr * (m + (1 - m) * 0.5 * (1 + cos(pi * (step - W) / (S - W))))
    W = cfg.lr_warmup, S = cfg.steps, m = cfg.min_lr_ratio. The tiny warm start needs the warm-up + decay
    (a high lr of 2e-3 early, a low one late); the RL stages default to a constant lr, as in the paper.
    """
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    W = max(0, cfg.lr_warmup)
    if step < W:
        return cfg.lr * (step + 1) / W
    if cfg.lr_schedule == "constant":
        return cfg.lr
    frac = min(1.0, (step - W) / max(1, cfg.steps - W))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


ORDER_SEED_STRIDE = 1_000_003  # data-order seed = data_seed + stride * seed (seed 0: the data seed alone)


def order_seed(cfg: "TrainConfig") -> int:
    """Seed of the training stream's ORDER: --data-seed fixes WHICH images exist (the dataset, and the
    held-out test split that every run is compared on), --seed picks the order they are visited in,
    together with the init and the sampler. So `SEED=1 bash train.sh` is another run on the same data,
    not a run on other data; seed 0 keeps the order of the data seed alone.
    """
    return cfg.data_seed + ORDER_SEED_STRIDE * cfg.seed


def _data_indices(position: int, k: int, n: int, seed: int) -> list[int]:
    """Items position .. position + k - 1 of an endless stream: epoch e is a permutation seeded by (seed, e)."""
    out = []
    for p in range(position, position + k):
        epoch, i = divmod(p, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[i]))
    return out


def _repeat_groups(batch: dict, image_embeds, G: int) -> tuple[dict, torch.Tensor | None]:
    """Prompt batch [B, T] -> [B*G, T] (each row G times, prompt-major) and the image features likewise.

    The image tokens of image b are a contiguous block of (t*h*w)/4 rows in image_embeds, so each block is
    repeated G times: the vision tower runs once per PROMPT, not once per completion.
    """
    out = {k: (v.repeat_interleave(G, 0) if torch.is_tensor(v) and k in ("input_ids", "attention_mask") else v)
           for k, v in batch.items()}
    grid = batch.get("image_grid_thw")
    if grid is not None:
        out["image_grid_thw"] = grid.repeat_interleave(G, 0)  # [B*G, 3]
        out["pixel_values"] = None  # replaced by the repeated features below
    if image_embeds is None:
        return out, None
    sizes = (grid.prod(-1) // 4).tolist()  # merged tokens per image (2x2 merge)
    blocks = torch.split(image_embeds, sizes)  # B x [M_b, D]
    return out, torch.cat([blk for blk in blocks for _ in range(G)])  # [G * sum M_b, D]


def _slice_batch(batch: dict, embeds, b0: int, b1: int, G: int):
    """Prompts b0..b1-1 of a [B*G]-row expanded batch (rows b0*G .. b1*G) and their image features."""
    sub = {k: (v[b0 * G:b1 * G] if torch.is_tensor(v) and k != "pixel_values" else v) for k, v in batch.items()}
    if embeds is None:
        return sub, None
    grid = batch["image_grid_thw"]
    sizes = (grid.prod(-1) // 4).tolist()
    start = sum(sizes[:b0 * G])
    return sub, embeds[start:start + sum(sizes[b0 * G:b1 * G])]


def _atomic_save(tensors: dict, path: Path, metadata: dict):
    """safetensors write that never leaves a half-written file: write tmp in the same dir, fsync, rename."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Trainer:
    """Holds the model, optimizer and the run state of one stage; `run()` does the steps."""

    def __init__(self, cfg: TrainConfig):
        import dve

        if cfg.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {cfg.stage!r}")
        self.cfg = cfg
        self.dir = Path(cfg.out) / cfg.stage
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if cfg.device == "auto" else cfg.device))
        self.dist = Distributed(self.device)  # section 6: torchrun rank / world; cuda -> cuda:LOCAL_RANK
        self.device = self.dist.device
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]
        torch.manual_seed(cfg.seed)
        # the project's one loader (dve.py section 8): preset, Hub id or export, with its DVE layers and adapter
        self.model, self.tok = dve.load(cfg.init, dtype=dtype, device=self.device, seed=cfg.seed)
        sets = {s.strip() for s in cfg.train.split(",") if s.strip()}
        if cfg.stage == "vision":
            sets = {"vision"}  # the tiny ViT alone, with a throw-away probe (see _vision_step)
        elif cfg.stage == "warmup":
            sets = {"llm", "vision"}  # the tiny warm start is plain full-parameter SFT
        if cfg.dve and not self._has_dve():
            import dve

            dve.apply_dve(self.model, blocks=None, K=cfg.dve_k)
            self.model.to(self.device)
        if "dve" in sets and not self._has_dve():
            # Once the default (--train lora,dve) trained no DVE without --dve, silently: LoRA alone. Asking
            # for DVE training on a model without DVE layers is now an error that names the missing flag.
            raise ValueError(f"--train {cfg.train!r} asks to train the DVE layers, but {cfg.init!r} has none: "
                             "add --dve to build them (SkinFlow: --train lora,dve --dve), or drop dve from --train")
        if "lora" in sets:
            apply_lora(self.model, cfg.lora_rank, cfg.lora_alpha)
            self.model.to(self.device)
        unknown = sets - {"lora", "dve", "llm", "vision"}
        if unknown:
            raise ValueError(f"--train: unknown sets {sorted(unknown)}; choose among lora, dve, llm, vision")
        self.counts = set_trainable(self.model, lora="lora" in sets, dve_layers="dve" in sets, llm="llm" in sets,
                                    vision="vision" in sets)
        # The data first: a bad --image-dir or a missing --skincap fails here, before any weights move.
        self.data, self.probe_labels = self._build_data(cfg)
        if cfg.stage == "vision" or (cfg.stage == "warmup" and cfg.aux_weight > 0):
            # Tiny preset only: a throw-away linear probe on the max-pooled image tokens (see _probe_loss).
            # It lives on the model so checkpoint/resume treat it like any trainable, and export()
            # removes it again: the exported model has the plain Hub layout.
            import data

            self.model.aux_head = nn.Linear(self.model.cfg.hidden_size, len(self.probe_labels)).to(self.device)
            self.counts["aux"] = sum(p.numel() for p in self.model.aux_head.parameters())
        # The reference policy is the policy this stage starts from. DVE gates loaded from a checkpoint
        # are not "gates = 1": snapshot them now, before any update (see dve_start_state).
        self.ref_dve = dve_start_state(self.model)
        # full fine-tuning moves the base weights, so only then is a frozen reference copy needed
        self.ref_model = None
        if sets & {"llm", "vision"} and cfg.stage not in SUPERVISED and cfg.beta != 0:
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False)
        if self.dist.active and "llm" in sets:  # section 6: full fine-tuning on N ranks -> FSDP2 shards
            self.dist.shard_layers(self.model)
            if self.ref_model is not None:
                self.dist.shard_layers(self.ref_model)
        self.dist.broadcast_([p for p in self.model.parameters() if p.requires_grad])  # ranks start equal
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError(f"nothing to train: --train {cfg.train!r} matched no parameter (dve needs --dve)")
        # The optimizer sees the fp32 masters (the bf16 model weights are only refreshed copies).
        self.master = MasterWeights([p for _, p in self.model.named_parameters() if p.requires_grad])
        # betas (0.9, 0.99): RL gradients are noisier than SFT's; a shorter second-moment memory adapts faster.
        self.opt = torch.optim.AdamW(self.master.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        # The sampler's own generator: its state is checkpointed, so a resumed run draws the same tokens.
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1 + RANK_SEED_STRIDE * self.dist.rank)
        self._pixel_cache: dict[int, tuple] = {}  # vision stage: item -> preprocessed pixels (see _pixels)
        self.step = 0
        self.position = 0
        self.ckpt = self.dir / "checkpoint.safetensors"
        self.log_path = self.dir / "log.jsonl"
        if cfg.resume and self.ckpt.exists():
            self.load_checkpoint()
        elif self.log_path.exists() and self.dist.is_main:
            self.log_path.unlink()  # a fresh run: start a fresh log

    @staticmethod
    def _build_data(cfg: "TrainConfig"):
        """-> (training stream, probe label list). SynthDerm: rendered on demand, the warm start on its
        "val" split so it never sees the RL stream; Fitzpatrick17k: data.Fitzpatrick17kData over the
        --split part (Stage I: the SkinCAP-captioned images), opened lazily with data.open_image, and
        the probe of the vision / warm-up stages reads all 114 labels instead of SynthDerm's 20."""
        import data

        if cfg.data == "synthderm":
            split = "val" if cfg.stage in SUPERVISED else "train"  # the warm start never sees the RL stream
            ds = data.SynthDerm(cfg.n_data, seed=cfg.data_seed, image_size=cfg.image_size, split=split)
            return ds, data.SYNTH_LABELS
        if cfg.data != "fitzpatrick17k":
            raise ValueError(f"--data must be synthderm or fitzpatrick17k, got {cfg.data!r}")
        # Stage I needs captions; the warm start mixes captioned (both tasks) and uncaptioned (Stage II
        # target only) images, so it reads the captions too when given, from the same split.
        # Every rank builds the same list (same CSV, same hash cache, same split seed), so the data
        # positions of section 6 index the same images on every rank.
        task = "stage1" if cfg.stage == "stage1" else "stage2"
        ds = data.Fitzpatrick17kData(task, cfg.split, cfg.csv or None, cfg.image_dir or None, cfg.skincap or None)
        print(f"[rl] {cfg.stage}: Fitzpatrick17k {cfg.split!r}: {len(ds)} images, {ds.skips['missing']} rows "
              "skipped (image file missing)")
        return ds, tuple(data.TAXONOMY)

    def _skip_report(self) -> dict:
        """How many training images this stage skipped and why (missing file / undecodable), for the log."""
        # SynthDerm renders every item, so it never skips: no keys, and its log lines stay as they were
        s = getattr(self.data, "skips", None)
        return {} if s is None else {"images_missing": s["missing"], "images_unreadable": s["unreadable"]}

    def _has_dve(self) -> bool:
        import dve

        return bool(dve.fdlinears(self.model))

    # ---------------------------------------------------------------------------- checkpointing
    def save_checkpoint(self):
        # Only what changes during the stage is saved: the trainable tensors (fp32 masters, so a bf16 run
        # resumes without a rounding step), never the frozen base model, which --init reloads.
        tensors = {f"param/{n}": m for n, m in zip(self.names, self.master.params)}  # fp32 masters
        # AdamW's per-parameter state (step, exp_avg, exp_avg_sq) flattened to "optim/<i>/<name>" keys;
        # the hyper-parameters (param_groups) are small and go into the metadata as JSON.
        opt_state = self.opt.state_dict()
        for i, st in opt_state["state"].items():
            for k, v in st.items():
                tensors[f"optim/{i}/{k}"] = torch.as_tensor(v)
        tensors["rng/torch"] = torch.get_rng_state()
        tensors["rng/sampler"] = self.gen.get_state()
        if torch.cuda.is_available():
            tensors["rng/cuda"] = torch.cuda.get_rng_state()
        # safetensors metadata is str -> str; the data position makes the sample stream resume exactly.
        meta = {"step": str(self.step), "position": str(self.position),
                "param_groups": json.dumps(opt_state["param_groups"]),
                "config": json.dumps(dataclasses.asdict(self.cfg))}
        tensors = self.dist.checkpoint_tensors(tensors, self.gen)  # section 6: gathered; None off rank 0
        if tensors is not None:
            _atomic_save(tensors, self.ckpt, meta)

    def load_checkpoint(self):
        from safetensors import safe_open

        with safe_open(str(self.ckpt), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        missing = [n for n in self.names if f"param/{n}" not in tensors]
        if missing:
            raise KeyError(f"{self.ckpt}: no saved value for trainable {missing[:4]} (different --train / --dve?)")
        with torch.no_grad():
            for n, m in zip(self.names, self.master.params):
                self.dist.copy_full_into(m, tensors[f"param/{n}"])
        self.master.master_to_model()
        state = {}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                _, i, name = k.split("/", 2)
                state.setdefault(int(i), {})[name] = v.to(self.device) if name != "step" else v
        self.opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        self.dist.shard_optimizer_state(self.opt)
        torch.set_rng_state(tensors["rng/torch"])
        self.gen.set_state(tensors["rng/sampler"])
        self.dist.restore_sampler(tensors, self.gen, self.cfg.seed + int(meta["step"]))  # this rank's stream
        if "rng/cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng/cuda"])
        self.step, self.position = int(meta["step"]), int(meta["position"])  # continue where we stopped
        if self.dist.is_main:  # one line per run, not one per rank (section 6)
            print(f"[rl] resumed {self.ckpt} at step {self.step}, data position {self.position}")

    def export(self) -> Path:
        """Write the stage's model (DVE kept) + tokenizer to <out>/<stage>/model.

        LoRA: an fp32 model merges its adapters (W + B A in fp32: the Hub layout any loader reads). A bf16
        model keeps them UNMERGED, in fp32, in <model>/lora.safetensors next to the untouched bf16 base
        weights: a bf16 merge would round most of a small update away (docs/gpu.md measures it), and every
        loader of this project (dve.load: eval.py, diagnose, rl.py --init) re-attaches the file."""
        target = self.dir / "model"
        if hasattr(self.model, "aux_head"):
            del self.model.aux_head  # the vision / warm-up probe is not part of the VLM
        if self.model.dtype == torch.float32:
            merge_lora(self.model)
        self.dist.save_model(self.model, self.tok, target)  # rank 0 writes (section 6)
        return target

    # ---------------------------------------------------------------------------- one step
    def _prompt_batch(self, items, texts):
        import skinflow

        return skinflow.make_batch(self.tok, [it.image for it in items], texts, max_pixels=self.cfg.max_pixels,
                                   device=self.device)

    def _decode(self, tokens, mask) -> list[str]:
        """Completion ids -> text, dropping padding and the stop token (the reward reads the answer only)."""
        out = []
        for row, m in zip(tokens.tolist(), mask.tolist()):
            ids = [t for t, keep in zip(row, m) if keep > 0 and t != self.tok.eos_id]
            out.append(self.tok.decode(ids))
        return out

    def _probe_loss(self, embeds, grid, looks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Auxiliary probe loss (stand-in for the PRETRAINED vision encoder of the real model):

            L_probe = CE(W * max_m z_m + b, looks_like),   z_m = merged image token m of the image

        Why: a random tiny ViT gives lesion-blind features, and the decoder's attention starts uniform,
        i.e. it MEAN-pools 16 image tokens of which the lesion covers one or two, so the SFT gradient into
        the ViT is tiny and a warm start trained by SFT alone ignores the image (measured: one greedy answer
        for every test image). Max-pooling lets the probe read the lesion token directly. The target is
        `looks_like` (what was rendered), not the true label: the features should see the explicit look;
        the implicit cue that separates a mimic is left for RL to find. Returns (loss, #correct).
        """
        logits = self._probe_logits(embeds, grid)  # [B, 20]
        y = torch.tensor([self.probe_labels.index(c) for c in looks], device=embeds.device)  # [B]
        return F.cross_entropy(logits, y), (logits.argmax(-1) == y).sum()

    def _probe_logits(self, embeds, grid) -> torch.Tensor:
        """[sum M, D] merged image tokens -> [B, 20] probe logits W * max_m z_m + b, one row per image."""
        sizes = (grid.prod(-1) // 4).tolist()  # merged tokens per image
        pooled = torch.stack([blk.amax(0) for blk in torch.split(embeds, sizes)])  # [B, D]
        return self.model.aux_head(pooled.float())  # [B, 20]

    def _pixels(self, i: int) -> tuple[torch.Tensor, tuple]:
        """Preprocessed pixels of training item i, rendered once and then served from memory.

        Why a cache: the vision stage reads ~20k images (300 steps x 64) from a pool of 2048; rendering
        + preprocessing costs ~5 ms per image on one core, 4x the ViT's own forward + backward, so every
        epoch after the first would be spent drawing the same pictures again. A row of pixel_values is
        one patch as [C, T, ph, pw] with the still image copied over the T = 2 frames, so only frame 0 is
        kept (half the memory: 2048 x 112 px images = 300 MB in float32) and expanded back on the way out.
        Rendering is deterministic, so a resumed run sees exactly the same pixels.
        """
        import skinflow

        hit = self._pixel_cache.get(i)
        if hit is None:
            pv, grid = skinflow.preprocess_image(self.data[i].image, max_pixels=self.cfg.max_pixels)  # [N, C*T*p*p]
            vc = self.model.cfg.vision
            frames = pv.view(pv.shape[0], vc.in_channels, vc.temporal_patch_size, -1)  # [N, C, T, p*p]
            hit = (frames[:, :, 0].clone(), grid)  # [N, C, p*p]: frame 0 only
            self._pixel_cache[i] = hit
        frame0, grid = hit
        T = self.model.cfg.vision.temporal_patch_size
        pv = frame0.unsqueeze(2).expand(-1, -1, T, -1).reshape(frame0.shape[0], -1)  # [N, C*T*p*p]
        return pv, grid

    def _vision_step(self):
        """Supervised step of the tiny ViT alone: L_probe (see _probe_loss) over `prompts` images.

        The tiny preset's stand-in for the real model's PRETRAINED vision encoder. Qwen2.5-VL's ViT was
        trained on billions of images before anyone fine-tuned it; a random tiny ViT has seen nothing, and
        SFT on 8 image-text pairs per step gives it too little signal (the warm start ignored the image).
        Here only the ViT and a linear probe learn, on 64 images per step; the LLM is not even run, so a
        step costs ~0.25 s on 2 cores. The probe is dropped at export; the next stage (warmup) starts from
        the trained ViT and a still-random LLM.
        """
        cfg = self.cfg
        start = self.position + self.dist.rank * cfg.prompts  # this rank's slice of the global batch
        idx = _data_indices(start, cfg.prompts, len(self.data), order_seed(cfg))
        pixels = [self._pixels(i) for i in idx]
        pv = torch.cat([p for p, _ in pixels]).to(self.device)  # [sum N, C*T*p*p]
        grid = torch.tensor([g for _, g in pixels], device=self.device)  # [B, 3]
        embeds = self.model.encode_images(pv, grid)  # [sum M, D]
        loss, correct = self._probe_loss(embeds, grid, [self.data.spec(i)["looks_like"] for i in idx])
        return loss, {"loss": float(loss.detach()), "acc": float(correct) / len(idx)}, len(idx)

    def _warmup_step(self):
        """Supervised step: -mean log p(target tokens) over half Stage I, half Stage II targets."""
        cfg = self.cfg
        start = self.position + self.dist.rank * cfg.prompts  # this rank's slice of the global batch
        idx = _data_indices(start, cfg.prompts, len(self.data), order_seed(cfg))
        items = [self.data[i] for i in idx]
        # alternate the two tasks by data position so every batch teaches both formats
        # (a real photo without a SkinCAP caption has no Stage I target: it always gets the Stage II one)
        tasks = ["stage1" if (start + j) % 2 == 0 and it.fields else "stage2" for j, it in enumerate(items)]
        batch = self._prompt_batch(items, [_stage_prompt(t) for t in tasks])
        targets = [self.tok.encode(_warmup_target(it, t, cfg.sft_order)) + [self.tok.eos_id] for it, t in zip(items, tasks)]
        L = max(map(len, targets))
        comp = torch.full((len(items), L), self.tok.pad_id, dtype=torch.long, device=self.device)  # [B, L]
        mask = torch.zeros(len(items), L, device=self.device)  # [B, L]
        for b, t in enumerate(targets):
            comp[b, :len(t)] = torch.tensor(t)
            mask[b, :len(t)] = 1
        # the images go through the vision tower once; the features feed both losses below
        embeds = self.model.encode_images(batch["pixel_values"], batch["image_grid_thw"])  # [sum M, D]
        # teacher forcing reuses the GRPO log-prob path: same chunked lm_head, same masking rules
        logp = completion_logprobs(self.model, batch, comp, mask, chunk=cfg.chunk, image_embeds=embeds)  # [B, L]
        loss = -(logp * mask).sum() / self.dist.sum(mask.sum())  # token-mean negative log-likelihood
        stats = {"loss": float(loss.detach()), "tokens": int(mask.sum())}
        if cfg.aux_weight > 0:
            # The probe loss of the vision stage, kept on during SFT so the image features stay readable.
            aux, _ = self._probe_loss(embeds, batch["image_grid_thw"], [it.looks_like for it in items])
            loss = loss + cfg.aux_weight * aux
            stats["aux_loss"] = float(aux.detach())
        return loss, stats, len(items)

    def _rl_step(self) -> dict:
        cfg, G, model = self.cfg, self.cfg.G, self.model
        t0 = time.time()
        # a. prompts
        start = self.position + self.dist.rank * cfg.prompts  # this rank's slice of the global batch
        idx = _data_indices(start, cfg.prompts, len(self.data), order_seed(cfg))
        items = [self.data[i] for i in idx]
        batch = self._prompt_batch(items, [_stage_prompt(cfg.stage)] * len(items))
        # b. rollouts: image features once per prompt, G samples per prompt in ONE generate call
        model.eval()  # sampling needs no autograd graph; eval() is a no-op today but states the intent
        with torch.no_grad():
            embeds = model.encode_images(batch["pixel_values"], batch["image_grid_thw"])  # [sum M, D]
            big, big_embeds = _repeat_groups(batch, embeds, G)  # [B*G, T], [G * sum M, D]
            gen = sample_rollouts(model, big, big_embeds, cfg, self.gen, start)  # section 6
        t_roll = time.time() - t0
        # c. rewards and advantages
        gen.mask = cut_at_vision_tokens(model.cfg, gen.tokens, gen.mask)  # [B*G, L]
        gen.logprobs = gen.logprobs * gen.mask
        texts = self._decode(gen.tokens, gen.mask)
        scored = [_stage_reward(cfg.stage, txt, items[i // G]) for i, txt in enumerate(texts)]
        rewards = torch.tensor([r for r, _ in scored], dtype=torch.float32)  # [B*G]
        adv, gstats = group_advantages(rewards, G, cfg.scale, return_stats=True)
        adv = adv.to(self.device)
        mask = gen.mask  # [B*G, L]
        # pi_old = the sampler's own log-probs. With mu = 1 one could recompute them with the training
        # forward instead (ratio exactly 1); using the sampler's keeps any sampler/trainer mismatch
        # VISIBLE in ratio_min/max and lets the clip guard against it (it matters in bf16).
        old = gen.logprobs  # [B*G, L] sampler log-probs = pi_old
        n_tok = self.dist.sum(mask.sum())  # GLOBAL token count: the token-mean normaliser of every micro-batch
        # d. reference log-probs (no grad; same weights with every delta off, or the frozen copy)
        ref = None
        if cfg.beta != 0:
            holder = self.ref_model if self.ref_model is not None else model
            # same weights, deltas off: the KL anchor is the model this stage started from. The frozen copy
            # of full fine-tuning IS that model (taken before step 1, gates included): use it as it is.
            ref_ctx = contextlib.nullcontext() if self.ref_model is not None else reference_policy(model, self.ref_dve)
            with torch.no_grad(), ref_ctx:
                ref_embeds = holder.encode_images(batch["pixel_values"], batch["image_grid_thw"])
                _, ref_big = _repeat_groups(batch, ref_embeds, G)
                ref = completion_logprobs(holder, big, gen.tokens, mask, cfg.chunk, cfg.temperature,
                                          image_embeds=ref_big)
        # e. mu optimizer steps on this rollout batch
        model.train()
        B = len(items)
        agg_stats, skipped = [], 0
        for _ in range(cfg.mu):  # mu > 1 re-uses the same rollouts: here the ratio and the clip matter
            self.master.zero_grad()
            finite, loss_sum = True, 0.0
            # micro-batches of WHOLE groups (all G completions of a prompt), so each prompt's image is
            # encoded once per micro-batch and memory is bounded by --micro-prompts
            for b0 in range(0, B, cfg.micro_prompts):
                b1 = min(B, b0 + cfg.micro_prompts)
                sub, _ = _slice_batch(big, None, b0, b1, G)
                # image features with grad (DVE trains through them), once per prompt of the micro-batch
                pv_rows = batch["image_grid_thw"].prod(-1).tolist()
                p0, p1 = sum(pv_rows[:b0]), sum(pv_rows[:b1])
                emb = model.encode_images(batch["pixel_values"][p0:p1], batch["image_grid_thw"][b0:b1])
                _, emb = _repeat_groups({"image_grid_thw": batch["image_grid_thw"][b0:b1]}, emb, G)
                rows = slice(b0 * G, b1 * G)
                logp = completion_logprobs(model, sub, gen.tokens[rows], mask[rows], cfg.chunk, cfg.temperature,
                                           image_embeds=emb)  # [b*G, L]
                loss, st = grpo_loss(logp, old[rows], None if ref is None else ref[rows], adv[rows], mask[rows],
                                     cfg.eps_low, cfg.eps_high, cfg.beta, cfg.agg, num_tokens=n_tok,
                                     num_seqs=B * G * self.dist.world, max_len=cfg.max_new_tokens)
                if not self.dist.all(torch.isfinite(loss)):  # NaN/inf on any rank: drop the whole update
                    finite = False
                    break
                loss.backward()
                loss_sum += float(loss.detach())
                st["weight"] = float(mask[rows].sum())
                agg_stats.append(st)
            grad_norm = self._optimizer_step(finite)
            skipped += int(not finite)
        # stats for the log: token-weighted means of the per-micro-batch stats
        # token-weighted so the logged numbers equal one big-batch computation, whatever the micro-batching
        w = sum(s["weight"] for s in agg_stats) or 1.0
        mean = lambda k: sum(s[k] * s["weight"] for s in agg_stats) / w  # noqa: E731
        lengths = mask.sum(1)
        rec = {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "loss": loss_sum, "kl": mean("kl") if agg_stats else 0.0,
            "clip_low": mean("clip_low") if agg_stats else 0.0, "clip_high": mean("clip_high") if agg_stats else 0.0,
            "ratio_max": max((s["ratio_max"] for s in agg_stats), default=1.0),
            "ratio_min": min((s["ratio_min"] for s in agg_stats), default=1.0),
            "completion_len": float(lengths.mean()), "truncated": float(truncated_rows(model.cfg, gen.tokens, mask, cfg.max_new_tokens).float().mean()),
            "zero_std_groups": gstats["zero_std_groups"], "groups": gstats["groups"],
            "format_failures": sum(int(i["malformed"]) for _, i in scored),
            "format_mean": sum(i["format"] for _, i in scored) / len(scored),
            "skipped": skipped, "grad_norm": grad_norm, "rollout_s": round(t_roll, 3),
        }
        if cfg.stage == "stage1":
            import data

            for f in data.CAPTION_FIELDS:
                rec[f"field/{f}"] = sum(i[f"field/{f}"] for _, i in scored) / len(scored)
        else:
            rec["hit_rank1"] = sum(int(i["rank"] == 1) for _, i in scored) / len(scored)
            rec["hit_top6"] = sum(int(i["rank"] > 0) for _, i in scored) / len(scored)
        rec["sample"] = texts[0][:200]  # one completion per step: the fastest way to see what is learned
        return rec, B

    def _optimizer_step(self, finite: bool) -> float:
        """Clip, step, refresh bf16 copies. A non-finite loss or gradient skips the update (logged)."""
        self._dirty = True  # weights may change from here until run() advances step/position
        if not finite:
            self.master.zero_grad()
            return float("nan")
        self.master.grads_to_master()  # bf16 grads -> fp32 master grads (no-op for fp32 parameters)
        self.dist.sum_grads(self.master.params)  # section 6: sum over ranks (no-op on one device)
        # clip on the masters: the norm is the whole update's, before any rounding
        norm = self.dist.clip_grad_norm_(self.master.params, self.cfg.grad_clip)
        if not torch.isfinite(norm):
            self.master.zero_grad()
            return float("nan")
        self.opt.step()
        self.master.master_to_model()  # round the fp32 result once into the (bf16) model weights
        self.master.zero_grad()
        return float(norm)

    # ---------------------------------------------------------------------------- held-out check
    @torch.no_grad()
    def evaluate(self, n: int, batch_size: int = 16) -> dict:
        """Greedy answers on n held-out SynthDerm items (split "test"): the stage's mean reward, and for
        Stage II (and the warm start) the clinical metrics of eval.py (Top-1 / Top-6 with bootstrap CIs)."""
        import data
        import eval as skin_eval

        cfg = self.cfg
        if cfg.data == "fitzpatrick17k":
            # the test part of the same protocol ("a12/train" -> "a12/test"; "train" -> "test"); Stage I
            # has no test part (every captioned image is barred from testing), so it is scored on Stage II
            protocol = cfg.split.rpartition("/")[0]
            test = data.Fitzpatrick17kData("stage2", f"{protocol}/test" if protocol else "test", cfg.csv or None,
                                           cfg.image_dir or None, cfg.skincap or None, n=n)
            n = len(test)
        else:
            test = data.SynthDerm(n, seed=cfg.data_seed, image_size=cfg.image_size, split="test")
        tasks = ["stage1", "stage2"] if cfg.stage == "warmup" else ([] if cfg.stage == "vision" else [cfg.stage])
        if cfg.data == "fitzpatrick17k":
            tasks = [] if cfg.stage == "vision" else ["stage2"]
        self.model.eval()
        report = {"n": n, "stage": cfg.stage, "step": self.step}
        if cfg.stage == "vision":
            # The probe's accuracy on held-out images: does the ViT now see the lesion? Chance is the
            # most frequent class (psoriasis, ~0.12); the true label is also scored, for the mimics.
            hits = {"looks_like": 0, "label": 0}
            for s in range(0, n, batch_size):
                chunk = [test[i] for i in range(s, min(n, s + batch_size))]
                batch = self._prompt_batch(chunk, [_stage_prompt("stage2")] * len(chunk))  # only the pixels are used
                embeds = self.model.encode_images(batch["pixel_values"], batch["image_grid_thw"])  # [sum M, D]
                logits = self._probe_logits(embeds, batch["image_grid_thw"])  # [b, 20]
                pred = [self.probe_labels[j] for j in logits.argmax(-1).tolist()]
                hits["looks_like"] += sum(p == it.looks_like for p, it in zip(pred, chunk))
                hits["label"] += sum(p == it.label for p, it in zip(pred, chunk))
            report.update({f"probe_acc/{k}": v / n for k, v in hits.items()})
        for task in tasks:
            texts, items = [], []
            for s in range(0, n, batch_size):
                chunk = [test[i] for i in range(s, min(n, s + batch_size))]
                batch = self._prompt_batch(chunk, [_stage_prompt(task)] * len(chunk))
                gen = self.model.generate(**batch, max_new_tokens=cfg.max_new_tokens, greedy=True)
                mask = cut_at_vision_tokens(self.model.cfg, gen.tokens, gen.mask)
                texts += self._decode(gen.tokens, mask)
                items += chunk
            rewards = [_stage_reward(task, t, it)[0] for t, it in zip(texts, items)]
            report[f"{task}/reward_mean"] = sum(rewards) / len(rewards)
            if task == "stage2":
                m = skin_eval.clinical_metrics([(t, it.label, it.fitzpatrick) for t, it in zip(texts, items)])
                report["stage2/clinical"] = {k: m[k] for k in ("n", "top1", "top6", "mrr", "format_failure_rate",
                                                               "safety_critical_rate", "ci95")}
            report[f"{task}/samples"] = texts[:3]
        if self.dist.is_main:
            with open(self.dir / "eval.json", "w") as f:
                json.dump(report, f, indent=1)
        return report

    # ---------------------------------------------------------------------------- the loop
    def run(self) -> Path:
        from tqdm import tqdm

        cfg = self.cfg
        if self.dist.is_main:
            print(f"[rl] {cfg.stage}: trainable {self.counts} on {self.device}, {cfg.steps} steps -> {self.dir}")
        bar = tqdm(total=cfg.steps, initial=self.step, desc=cfg.stage, dynamic_ncols=True,
                   disable=not self.dist.is_main)
        # Ctrl-C policy: the first one only sets a flag, the current step finishes, then a consistent
        # checkpoint is written and we exit (130). A second Ctrl-C interrupts immediately.
        self._stop_requested, self._dirty = False, False
        self._ext_logged: set[str] = set()  # kernel self-check outcomes already written to log.jsonl
        previous_handler = None
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):
                if self._stop_requested and not self.dist.active:  # N ranks: only the agreed stop below
                    raise KeyboardInterrupt
                self._stop_requested = True
                print("\n[rl] Ctrl-C: finishing this step, then writing a checkpoint (Ctrl-C again to abort now)")
            previous_handler = signal.signal(signal.SIGINT, on_sigint)
        try:
            while self.step < cfg.steps:
                t0 = time.time()
                lr = lr_at(cfg, self.step)  # the schedule is a function of the step: resumes continue it
                for group in self.opt.param_groups:
                    group["lr"] = lr
                if cfg.stage in SUPERVISED:
                    self.model.train()
                    self.master.zero_grad()
                    loss, rec, n = self._vision_step() if cfg.stage == "vision" else self._warmup_step()
                    finite = self.dist.all(torch.isfinite(loss))
                    if finite:
                        loss.backward()
                    rec["grad_norm"] = self._optimizer_step(finite)
                    rec["skipped"] = int(not finite)
                else:
                    rec, n = self._rl_step()
                rec = self.dist.reduce_log(rec, n if cfg.stage in SUPERVISED else n * cfg.G)  # global numbers
                self.position += n * self.dist.world  # the data stream advances by the GLOBAL batch
                self.step += 1
                self._dirty = False  # weights, step and data position agree again
                rec.update({"step": self.step, "lr": lr, "step_s": round(time.time() - t0, 3),
                            "position": self.position, **self._skip_report()})
                # kernels check themselves on first use (skinflow.extension_ok): every outcome this Trainer
                # has not logged yet goes into this step's record, a failure also to stdout
                new = {k: v for k, v in _skinflow.EXT_CHECKS.items() if k not in self._ext_logged}
                if new:
                    rec["ext_check"] = new
                    self._ext_logged.update(new)
                    for k, v in new.items():
                        if not v["ok"] and self.dist.is_main:
                            print(f"[rl] csrc kernel {k} failed its self-check (max |err| {v['max_err']:.3g} > "
                                  f"{v['tol']:.3g}, {v['what']}): PyTorch path for the rest of the run")
                if rec.get("skipped"):
                    print(f"[rl] step {self.step}: non-finite loss/gradient, update skipped")
                if self.dist.is_main:
                    with open(self.log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                key = "loss" if cfg.stage in SUPERVISED else "reward_mean"
                bar.set_postfix({key: f"{rec[key]:.3f}"})
                bar.update(1)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
                if self.dist.any(self._stop_requested):  # all ranks stop after the same step
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            if self._dirty:
                # a second Ctrl-C landed inside an optimizer update: weights and step counter disagree,
                # so keep the last periodic checkpoint instead of writing an inconsistent one
                print(f"\n[rl] interrupted inside an update; last good checkpoint kept at {self.ckpt}")
            else:
                self.save_checkpoint()
                print(f"\n[rl] interrupted: resumable checkpoint at {self.ckpt} (step {self.step}); "
                      "rerun the same command to continue")
            raise SystemExit(130)
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        bar.close()
        skips = self._skip_report()
        if skips and self.dist.is_main:
            # one line on the console, one file beside the log: how many images were skipped and why
            print(f"[rl] {cfg.stage}: skipped {skips['images_missing']} image(s) with no file and "
                  f"{skips['images_unreadable']} undecodable image(s)")
            (self.dir / "skipped.json").write_text(json.dumps({**skips, "unreadable_files": self.data.skips["files"]},
                                                              indent=1))
        if cfg.eval_n > 0:
            rep = self.evaluate(cfg.eval_n)
            if self.dist.is_main:
                print("[rl] held-out:", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rep.items()
                                         if k.endswith("reward_mean") or k.startswith("probe_acc")},
                      {k: rep["stage2/clinical"][k] for k in ("top1", "top6")} if "stage2/clinical" in rep else "")
        return self.export()


# ===================================================================================================
# 6. DISTRIBUTED: torchrun --nproc_per_node N rl.py vision|warmup|stage1|stage2 ...   (issue 8, multi-GPU)
#
# Data-parallel GRPO with PyTorch's own distributed stack, and ONE code path for 1 and N devices:
#   * torchrun starts N copies of this script and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
#     MASTER_PORT. `Distributed` reads them: WORLD_SIZE > 1 -> init_process_group (nccl on CUDA, gloo on
#     CPU), one device per rank (cuda:LOCAL_RANK). Without torchrun WORLD_SIZE is unset: no process
#     group, every collective below returns its input, and the trainer is exactly the 1-process one.
#   * Rollouts are sharded by WHOLE GROUPS. `--prompts B` is per rank; the global batch is the N*B
#     prompts at data positions p .. p+N*B-1 and rank r takes p+r*B .. p+r*B+B-1. All G completions of
#     a prompt are sampled, scored and normalised on one rank, so the group advantage
#         A_i = (r_i - mean_g r) / (std_g r + eps)
#     needs no communication: it depends only on the G rewards of its own group.
#   * The loss normalisers are GLOBAL: token-mean divides by the completion-token count of ALL ranks
#     (one all-reduce), seq-mean / Dr.GRPO by the global number of completions N*B*G. Rank r's loss is
#     then its share of the one-process loss over the N*B prompts,
#         L = sum_r L_r   =>   grad L = sum_r grad L_r,
#     so gradients are SUMMED over ranks (not averaged), and N ranks x B prompts = 1 process x N*B.
#     (With a local normaliser each rank would weight its tokens by 1/n_r instead of 1/sum_r n_r: a
#     different, length-dependent objective. test_skinflow.py would catch it.)
#   * Per-rank sampler seeds (seed + 1 + r * RANK_SEED_STRIDE; rank 0 keeps the 1-process seed); the
#     data position advances by the GLOBAL batch; checkpoint, log.jsonl, eval.json and the exported
#     model are written by rank 0 only; the checkpoint stores every rank's sampler state so a resume
#     with the same N redraws the same tokens. The stop decision after Ctrl-C is agreed by all ranks
#     (one all-reduce per step), otherwise one rank would leave while the others wait in a collective.
#
# LoRA / DVE training: why an explicit all-reduce of the trainable gradients and not
# DistributedDataParallel. DDP syncs gradients from autograd hooks that it arms inside DDP.forward().
# This model is driven through other entry points - generate() for the rollouts, encode_images() and
# hidden_states() (via completion_logprobs) for the loss - which all bypass the wrapper's forward, so
# DDP would silently NOT synchronise; gradient accumulation over micro-batches would also need
# no_sync(), and DDP AVERAGES over ranks where the globally normalised loss needs a SUM. The explicit
# version is one flat all-reduce of the trainable gradients per optimizer step (LoRA of the 7B: 40 M
# floats), in plain sight. What it gives up is DDP's overlap of communication with backward, which is
# negligible next to the rollout time of GRPO. Ranks start identical: the trainable tensors are
# broadcast from rank 0 (the frozen base comes from the same file / seed on every rank).
#
# Full fine-tuning (--train llm) with N > 1: FSDP2 `fully_shard` on every decoder layer. Each rank
# keeps 1/N of the layers' weights, gradients and AdamW state (the frozen reference copy is sharded
# the same way). A layer's __call__ all-gathers its weights and frees them again afterwards
# (reshard_after_forward=True, set explicitly so it also holds for sampling, where every decode step
# calls every layer); backward reduce-scatters the layer gradients with divide factor 1, i.e. it SUMS
# like the all-reduce above. Embeddings, final norm, lm_head and the vision tower stay replicated and
# go through the explicit all-reduce (they are called directly, e.g. `lm_head_weight`, which FSDP's
# module hooks would not see). Sharded models sample without CUDA graphs (a graph cannot capture
# FSDP's hook-driven all-gathers). Checkpoints gather full tensors on rank 0 and re-shard on load.
# ===================================================================================================
import torch.distributed as dist  # noqa: E402  (kept next to the only code that uses it)

RANK_SEED_STRIDE = 1_000_003  # sampler seed of rank r: seed + 1 + r * stride (rank 0 = the 1-process seed)

# How each numeric log field combines over ranks (everything else: mean over completions, e.g.
# reward_mean, completion_len, format_mean, field/<name>, hit_rank1). loss / tokens are already each
# rank's share of a globally normalised sum; kl and the clip fractions are token means.
_DDP_LOG_SUM = ("loss", "tokens", "zero_std_groups", "groups", "format_failures")
_DDP_LOG_TOKEN_MEAN = ("kl", "clip_low", "clip_high")
_DDP_LOG_MAX = ("ratio_max", "rollout_s")
_DDP_LOG_MIN = ("ratio_min",)
_DDP_LOG_SAME = ("grad_norm", "skipped")  # identical on every rank (computed after the all-reduce)


def _is_dtensor(t) -> bool:
    """True for an FSDP2-sharded tensor (a DTensor), False for a plain one."""
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def prompt_seed(seed: int, position: int) -> int:
    """Seed of the generator that samples the G completions of the prompt at global data `position`
    (--prompt-seeds): a pure function of (seed, position), whatever rank or batch the prompt lands in."""
    return (seed * RANK_SEED_STRIDE + 7919 * position + 17) % (2 ** 62)


class Distributed:
    """Rank, world size, device and the few collectives the trainer needs.

    Built from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK). At world size 1 (plain `python
    rl.py ...`) `active` is False, no process group exists and every method returns its input: the
    single-device trainer runs unchanged.
    """

    def __init__(self, device: torch.device):
        self.active = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        self.fsdp = False
        if self.active and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)  # one GPU per rank
            torch.cuda.set_device(device)
        if self.active and not dist.is_initialized():
            # nccl moves GPU tensors over NVLink / InfiniBand; gloo is the CPU backend (CI, tests)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self.is_main = self.rank == 0
        self.device = device

    def close(self):
        """Tear the process group down if we created it (torchrun expects a clean exit)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    # ------------------------------------------------------------------ scalar collectives
    def _reduce(self, values, op) -> list:
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)  # [k]
        dist.all_reduce(t, op=op)
        return t.tolist()

    def sum(self, x) -> float:
        """sum over ranks of a scalar (e.g. the completion-token count: the global normaliser)."""
        return self._reduce([float(x)], dist.ReduceOp.SUM)[0]

    def all(self, flag) -> bool:
        """True only if `flag` holds on every rank (e.g. "the loss is finite": skip the step together)."""
        return self._reduce([float(bool(flag))], dist.ReduceOp.MIN)[0] > 0

    def any(self, flag) -> bool:
        """True if `flag` holds on some rank (e.g. "Ctrl-C was pressed": stop together)."""
        return self._reduce([float(bool(flag))], dist.ReduceOp.MAX)[0] > 0

    def barrier(self):
        if self.active:
            dist.barrier()

    # ------------------------------------------------------------------ parameters and gradients
    @torch.no_grad()
    def broadcast_(self, params):
        """Copy rank 0's values of the (replicated) trainable tensors to every rank: a common start."""
        if not self.active:
            return
        for p in params:
            if not _is_dtensor(p):
                dist.broadcast(p.data, src=0)

    @torch.no_grad()
    def sum_grads(self, params):
        """grad_p <- sum_r grad_p^(r) for every replicated parameter, in ONE flat all-reduce.

        FSDP-sharded parameters are skipped: FSDP reduce-scattered them during backward. A parameter
        with no gradient on any rank keeps grad None, as in one process (AdamW then skips it); one
        flag per parameter travels in the same buffer to decide that.
        """
        plain = [p for p in params if not _is_dtensor(p)]
        if not self.active or not plain:
            return
        has = torch.tensor([float(p.grad is not None) for p in plain], device=self.device)  # [P]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in plain] + [has])  # [sum numel + P]
        dist.all_reduce(flat)
        off, flags = 0, flat[-len(plain):].tolist()
        for p, h in zip(plain, flags):
            n = p.numel()
            p.grad = flat[off:off + n].view_as(p).to(p.dtype) if h > 0 else None
            off += n

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        """Global gradient-norm clip. Replicated grads are identical on every rank after sum_grads, so
        the usual clip gives the same norm everywhere; with FSDP shards the squared norms of the local
        shards are summed over ranks first:  ||g||^2 = sum_r ||g_shard_r||^2 + ||g_replicated||^2."""
        grads = [p.grad for p in params if p.grad is not None]
        if not any(_is_dtensor(g) for g in grads):
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        sq_sharded = torch.zeros((), dtype=torch.float64, device=self.device)
        sq_plain = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            if _is_dtensor(g):
                sq_sharded += g.to_local().double().pow(2).sum()
            else:
                sq_plain += g.double().pow(2).sum()
        dist.all_reduce(sq_sharded)
        total = (sq_sharded + sq_plain).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            (g.to_local() if _is_dtensor(g) else g).mul_(coef.to(g.dtype))
        return total.float()

    # ------------------------------------------------------------------ FSDP2 for full fine-tuning
    def shard_layers(self, model):
        """FSDP2 `fully_shard` on every decoder layer (full fine-tuning, N > 1); see the section comment."""
        from torch.distributed.fsdp import fully_shard

        if any(isinstance(m, LoRALinear) for m in model.model.layers.modules()):
            raise ValueError("--train llm with lora under torchrun is not supported: choose llm or lora")
        for layer in model.model.layers:
            fully_shard(layer, reshard_after_forward=True)
            layer.set_gradient_divide_factor(1.0)  # SUM over ranks: the loss is globally normalised
            layer.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no pre-multiplied sum)
        # CUDA graphs cannot capture the hook-driven all-gathers: sharded models sample eagerly
        model.generate = _eager_generate(model)
        self.fsdp = True
        return model

    def full(self, t: torch.Tensor) -> torch.Tensor:
        """The whole tensor on every rank (an all-gather for a shard; the tensor itself otherwise)."""
        return t.full_tensor() if _is_dtensor(t) else t

    @torch.no_grad()
    def copy_full_into(self, param, full: torch.Tensor):
        """param <- full value, re-sharding it when param is an FSDP shard (checkpoint load)."""
        if _is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
        param.copy_(full)

    def shard_optimizer_state(self, opt):
        """After optimizer.load_state_dict: turn full moment tensors of sharded params into shards."""
        if not self.fsdp:
            return
        from torch.distributed.tensor import distribute_tensor

        for group in opt.param_groups:
            for p in group["params"]:
                for k, v in list(opt.state.get(p, {}).items()):
                    if _is_dtensor(p) and torch.is_tensor(v) and v.shape == p.shape and not _is_dtensor(v):
                        opt.state[p][k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)

    # ------------------------------------------------------------------ checkpoints, logs, export
    def checkpoint_tensors(self, tensors: dict, sampler: torch.Generator) -> dict | None:
        """Every rank calls this (it may all-gather); rank 0 gets the dict to write, others None.

        Adds each rank's sampler state as rng/sampler/rank<r> (rank 0's also stays in rng/sampler)."""
        tensors = {k: self.full(v) for k, v in tensors.items()}  # FSDP shards -> full tensors
        if not self.active:
            return tensors
        states = [None] * self.world
        dist.all_gather_object(states, sampler.get_state().cpu())
        for r, s in enumerate(states):
            tensors[f"rng/sampler/rank{r}"] = s
        return tensors if self.is_main else None

    def restore_sampler(self, tensors: dict, sampler: torch.Generator, seed: int):
        """Resume every rank's own sample stream (checkpoint written with the same N). A rank with no
        saved state (the checkpoint came from fewer ranks, e.g. a 1-process run) reseeds from
        (seed, rank) instead of sharing rank 0's restored stream, which would correlate the ranks' draws."""
        if not self.active:
            return
        key = f"rng/sampler/rank{self.rank}"
        if key in tensors:
            sampler.set_state(tensors[key])
        elif self.rank > 0:
            sampler.manual_seed(seed + 1 + RANK_SEED_STRIDE * self.rank)
            if self.rank == 1:
                print("[rl] checkpoint written with fewer ranks: ranks without a saved sampler state reseed")

    def reduce_log(self, rec: dict, n_completions: int) -> dict:
        """One step's log record over all ranks, so rank 0 logs the numbers of the GLOBAL batch
        (sums, token-weighted means, completion means, max / min; see _DDP_LOG_*). reward_std is rebuilt
        from each rank's sum of squares:  sum r^2 = (n - 1) std^2 + n mean^2."""
        if not self.active:
            return rec
        n = float(n_completions)
        tokens = float(rec.get("completion_len", 0.0)) * n  # this rank's completion tokens
        keys = sorted(k for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                      and k not in _DDP_LOG_SAME + _DDP_LOG_MAX + _DDP_LOG_MIN)
        weight = {k: 1.0 if k in _DDP_LOG_SUM else (tokens if k in _DDP_LOG_TOKEN_MEAN else n) for k in keys}
        extra = [n, tokens]
        if "reward_std" in rec:
            mean, std = float(rec["reward_mean"]), float(rec["reward_std"])
            extra.append((n - 1) * std ** 2 + n * mean ** 2)  # sum of r^2 on this rank
        sums = self._reduce([float(rec[k]) * weight[k] for k in keys] + extra, dist.ReduceOp.SUM)
        tot_n, tot_tok = sums[len(keys)], sums[len(keys) + 1]
        out = dict(rec)
        for k, s in zip(keys, sums):
            out[k] = s if k in _DDP_LOG_SUM else s / max(tot_tok if k in _DDP_LOG_TOKEN_MEAN else tot_n, 1e-12)
            if isinstance(rec[k], int) and k in _DDP_LOG_SUM:
                out[k] = int(round(s))
        if "reward_std" in rec:
            ss, m = sums[-1], out["reward_mean"]
            out["reward_std"] = math.sqrt(max(ss - tot_n * m * m, 0.0) / max(tot_n - 1, 1))
        hi = [k for k in _DDP_LOG_MAX if k in rec] + [k for k in _DDP_LOG_MIN if k in rec]
        vals = self._reduce([rec[k] if k in _DDP_LOG_MAX else -rec[k] for k in hi], dist.ReduceOp.MAX)
        for k, v in zip(hi, vals):
            out[k] = v if k in _DDP_LOG_MAX else -v
        return out

    def save_model(self, model, tok, target: Path):
        """Export once: rank 0 writes the Hub-layout model + tokenizer (FSDP: from gathered full tensors)."""
        if self.fsdp:
            full = {k: self.full(v) for k, v in model.state_dict().items()}  # all ranks: all-gathers
            if self.is_main:
                model.state_dict = lambda: full  # save_pretrained reads state_dict(): hand it the full one
                try:
                    model.save_pretrained(target)
                finally:
                    del model.state_dict
        elif self.is_main:
            model.save_pretrained(target)
        if self.is_main:
            tok.save(target)
        self.barrier()  # nobody reads <stage>/model (the next stage's --init) before it is complete


def _eager_generate(model):
    """model.generate with cuda_graph=False by default (bound to this instance only)."""
    bound = type(model).generate

    def generate(*args, **kwargs):
        kwargs.setdefault("cuda_graph", False)
        return bound(model, *args, **kwargs)

    return generate


def sample_rollouts(model, big: dict, big_embeds, cfg, generator, first_position: int):
    """Sample the B*G completions of a rank's B prompts (rows prompt-major, as _repeat_groups lays them).

    Default: ONE batched KV-cache generate() call with the rank's own generator (fast).
    cfg.prompt_seeds: one call per prompt, its generator seeded by prompt_seed(cfg.seed, global data
    position). A prompt's completions then no longer depend on which rank or batch it landed in, so a
    run on N ranks x B prompts reproduces a 1-process run on N*B prompts token for token (the
    reproducibility check in test_skinflow.py). Costs B smaller generate calls instead of one; columns that
    are padding in every row of the prompt are dropped so the call sees exactly the same input.
    """
    import skinflow

    kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    if not cfg.prompt_seeds:
        return model.generate(big["input_ids"], big["attention_mask"], None, big["image_grid_thw"],
                              generator=generator, image_embeds=big_embeds, **kw)
    G = cfg.G
    parts = []
    for b in range(big["input_ids"].shape[0] // G):
        sub, emb = _slice_batch(big, big_embeds, b, b + 1, G)  # [G, T] rows of prompt b
        first = int(sub["attention_mask"].any(0).nonzero()[0])  # left padding shared by all G rows
        g = torch.Generator(device=model.device).manual_seed(prompt_seed(cfg.seed, first_position + b))
        parts.append(model.generate(sub["input_ids"][:, first:], sub["attention_mask"][:, first:], None,
                                    sub["image_grid_thw"], generator=g, image_embeds=emb, **kw))
    L = max(p.tokens.shape[1] for p in parts)

    def cat(name, fill):  # right-pad every part to L columns, stack the prompts
        return torch.cat([F.pad(getattr(p, name), (0, L - p.tokens.shape[1]), value=fill) for p in parts])

    return skinflow.Generation(cat("tokens", model.cfg.pad_token_id), cat("mask", 0.0), cat("logprobs", 0.0))



# What each TrainConfig field (= CLI flag) does and why one would change it, shown by `rl.py --help`
# together with its default. Kept here, next to the parser, so TrainConfig stays a compact list of knobs;
# test_skinflow.py checks that every field has a text and that --help shows every default.
FLAG_HELP = {
    "stage": "vision / warmup: the tiny preset's supervised stand-ins for pretraining; stage1 / stage2: the "
             "paper's GRPO stages (Stage I: structured caption reward, Stage II: ranked differential reward)",
    "init": "model to start from: a preset tiny|3b|7b, a Hub id, or the previous stage's <out>/<stage>/model",
    "out": "run folder; this stage writes <out>/<stage>/ (log.jsonl, checkpoint, model/)",
    "steps": "optimizer steps of this stage (one rollout batch each)",
    "prompts": "B: prompts (images) per step; each gets --G completions, so B*G rollouts per step",
    "G": "GRPO group size: completions per prompt; their mean reward is the baseline of the advantage "
         "(larger: steadier advantages, fewer flat groups, more compute)",
    "mu": "inner epochs: optimizer steps on the same rollouts; > 1 is where the PPO ratio and its clip act",
    "lr": "AdamW learning rate (the paper: 1e-6 Stage I, 5e-7 Stage II, full fine-tuning; LoRA wants ~10x, "
          "the tiny from-scratch model ~1000x)",
    "lr_schedule": "constant | cosine (linear warm-up, then cosine decay to --min-lr-ratio * lr); cosine suits "
                   "the tiny warm start, the RL stages keep the paper's constant lr",
    "lr_warmup": "steps of linear lr warm-up (both schedules; 0 = none)",
    "min_lr_ratio": "cosine floor as a fraction of --lr",
    "beta": "KL weight of the GRPO loss (k3 estimate against the reference policy); 0 also skips the "
            "reference forward pass",
    "eps_low": "PPO clip below: a negative-advantage token whose ratio fell under 1 - eps_low gets no gradient",
    "eps_high": "DAPO clip-higher: a positive-advantage token stops at ratio 1 + eps_high; above --eps-low it "
                "lets unlikely good tokens grow a bit more",
    "agg": "how token losses are averaged: token-mean (DAPO) | seq-mean (original GRPO, length bias) | "
           "dr-grpo (Dr.GRPO: constant normaliser)",
    "scale": "advantage scale: std (GRPO: divide by the group's std) | none (Dr.GRPO: centre only)",
    "temperature": "sampling temperature of the rollouts (the log-probs use the same); lower explores less",
    "top_p": "nucleus sampling of the rollouts (1 = off)",
    "max_new_tokens": "length cap of a completion; an answer cut short is usually malformed (reward 0)",
    "micro_prompts": "prompts (x G completions) per forward/backward; lower it when memory runs out (the loss "
                     "is the same: it uses the global token count)",
    "train": "trainable sets, comma-separated among lora, dve, llm, vision; dve needs DVE layers (--dve, or an "
             "--init that has them); SkinFlow is --train lora,dve --dve",
    "lora_rank": "rank r of the LoRA adapters on the LLM's linear layers",
    "lora_alpha": "LoRA scale alpha: the update is (alpha / r) B A",
    "dve": "convert the vision tower's MLP linears to FDLinear (the paper's Virtual-Width Dynamic Vision "
           "Encoder) before training",
    "dve_k": "K: frequency bands, and gate heads, of each FDLinear; more bands reweight the spectrum more finely",
    "image_size": "side of the rendered SynthDerm images in pixels",
    "max_pixels": "pixel budget per image before the ViT (resized to fit, Qwen2.5-VL style); fewer pixels, "
                  "fewer image tokens, faster steps",
    "n_data": "SynthDerm items in the training stream (cycled, reshuffled per epoch); --data fitzpatrick17k "
              "ignores it",
    "data": "synthderm (generated, no download) | fitzpatrick17k (real photos: needs --image-dir)",
    "csv": "Fitzpatrick17k CSV; empty = the repo's assets/fitzpatrick17k.csv.gz (all 16,577 rows)",
    "image_dir": "folder of Fitzpatrick17k photos <md5hash>.jpg (python data.py fetch --out DIR fills DIR/images)",
    "skincap": "SkinCAP CSV (skincap_v240623.csv): the captions that Stage I needs on --data fitzpatrick17k",
    "split": "Fitzpatrick17k split to train on, a data.py protocol (train, a12/train, expert/train, ...); the "
             "end-of-stage check uses its test part",
    "data_seed": "WHICH SynthDerm images exist (train/val/test); keep it fixed to compare runs",
    "seed": "init, sampler and the ORDER of the training stream (train.sh's SEED=): another run on the same data",
    "save_every": "write the resumable checkpoint every N steps (also at the end and on Ctrl-C)",
    "grad_clip": "global gradient-norm clip before each optimizer step",
    "weight_decay": "AdamW weight decay",
    "dtype": "fp32 | bf16 (bf16 weights with fp32 master copies of the trainables: the GPU presets)",
    "device": "auto (cuda when available, else cpu) | cpu | cuda | cuda:N",
    "chunk": "completion rows per lm_head + log-softmax chunk: bounds the [rows, vocabulary] logits in memory",
    "eval_n": "held-out items scored greedily at the end of the stage (0 = skip)",
    "aux_weight": "warmup only: weight of the max-pooled looks_like probe loss (0 = off)",
    "sft_order": "warmup only, Stage II target: mixed | shuffled | looks | alpha (order of the confusable "
                 "cluster that opens the differential; mixed = half alphabetical, half shuffled: the warm "
                 "start knows the group but not the clinical ranking, which Stage II then learns)",
    "resume": "continue from <out>/<stage>/checkpoint.safetensors when it exists (--no-resume starts afresh)",
    "prompt_seeds": "seed each prompt's sampling from its global data position, so N ranks reproduce one "
                    "process token for token (a few smaller generate calls: slower)",
}


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help prints every flag's default: "(default: X)" is appended unless the text says it in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required:
            return text
        return text + " (default: empty)" if action.default == "" else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The CLI of rl.py, built without running it: every TrainConfig field is a flag (`--prompts 8`,
    `--dve`, `--no-resume`), its help from FLAG_HELP, its default from TrainConfig."""
    p = argparse.ArgumentParser(prog="rl.py", description="SkinFlow staged GRPO: python rl.py STAGE [--options]",
                                formatter_class=_DefaultsHelp)
    p.add_argument("stage", choices=STAGES, help=FLAG_HELP["stage"])
    for f in dataclasses.fields(TrainConfig):
        if f.name == "stage":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=FLAG_HELP[f.name])
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
            p.add_argument(flag, type=typ, default=f.default, help=FLAG_HELP[f.name])
    p.add_argument("--dry-run", action="store_true",
                   help="check the flags, print the resolved config as JSON and exit (loads nothing; train.sh "
                        "DRY_RUN=1)")
    return p


def main(argv=None) -> int:
    """CLI: `python rl.py STAGE [--options]` (see build_parser); returns the exit status."""
    p = build_parser()
    args = p.parse_args(argv)
    dry = args.__dict__.pop("dry_run")
    cfg = TrainConfig(**vars(args))
    if cfg.sft_order not in SFT_ORDERS:  # else a typo would surface only at the first warm-up step
        p.error(f"--sft-order must be one of {', '.join(SFT_ORDERS)}, got {cfg.sft_order!r}")
    if cfg.data not in ("synthderm", "fitzpatrick17k"):
        p.error(f"--data must be synthderm or fitzpatrick17k, got {cfg.data!r}")
    if cfg.data == "fitzpatrick17k" and not cfg.image_dir:
        p.error("--data fitzpatrick17k needs --image-dir (python data.py fetch --out DIR puts images in DIR/images)")
    if cfg.data == "fitzpatrick17k" and cfg.stage == "stage1" and not cfg.skincap:
        p.error("stage1 on --data fitzpatrick17k needs --skincap (the SkinCAP CSV; python data.py fetch)")
    wants_dve = "dve" in {t.strip() for t in cfg.train.split(",")} and cfg.stage not in SUPERVISED
    if wants_dve and not cfg.dve and cfg.init.lower() in ("tiny", "3b", "7b"):  # presets never have DVE layers
        p.error(f"--train {cfg.train} on --init {cfg.init} trains no DVE without --dve (it builds the DVE layers)")
    if dry:  # train.sh uses this to check the 3b/7b commands on machines that cannot run them
        lr_at(cfg, 0)  # validates the schedule name
        print(json.dumps(dataclasses.asdict(cfg)))
        return 0
    import data

    try:
        trainer = Trainer(cfg)
    except (ValueError, FileNotFoundError) as exc:  # bad data paths / options: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        out = trainer.run()
    finally:
        trainer.dist.close()  # section 6: leave the process group cleanly (no-op on one device)
    if trainer.dist.is_main:
        print(f"[rl] {cfg.stage} done: model written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
