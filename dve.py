"""dve.py: the Virtual-Width Dynamic Vision Encoder (DVE) of SkinFlow (arXiv 2601.09136, Sec. "DVE").

SkinFlow replaces the static linear layers in the MLPs of four vision blocks of Qwen2.5-VL (layers
8/16/24/32, i.e. the full-attention blocks 7, 15, 23, 31) by FDLinear, the linear-layer version of
Frequency Dynamic Convolution (FDConv, Chen et al., CVPR 2025). FDLinear gives every IMAGE its own
weight matrix, assembled from K fixed pieces of the pretrained weight:

  1. Fourier Disjoint Weight (FDW). The pretrained W (d_out x d_in) is stored as its 2-D real FFT
         F = rfft2(W)                                  F in C^{d_out x (d_in//2 + 1)}
     The spectral coordinates are sorted by radial frequency and cut into K disjoint bands S_1..S_K of
     (near-)equal size. Band k alone gives the "band weight"
         W_k = irfft2(F * 1[S_k])                      sum_k W_k = W,  <W_j, W_k>_F = 0 for j != k
     (Parseval: disjoint spectra are orthogonal). No parameter is added: F holds W's numbers.
  2. Kernel Spectral Modulation, global (KSM). Per image b, the descriptor is the mean of the layer's
     input over that image's own tokens, and a small MLP turns it into three sets of gates:
         d_b = mean_{t in image b} x_t                 [d_in]
         h_b = ReLU(RMSNorm(U d_b))                    [A],  A = max(d_in // 16, 16)
         a_b = 2 sigmoid(H_a h_b + e_a)                [K]     band gains
         c_b = 2 sigmoid(H_c h_b + e_c)                [d_in]  input-channel gates
         f_b = 2 sigmoid(H_f h_b + e_f)                [d_out] output-channel gates
     The heads H_a, H_c, H_f (and biases) start at ZERO, so every gate starts at 2 sigmoid(0) = 1.
  3. The image's weight and output:
         W_b = sum_k a_bk W_k
         y_t = ((x_t * c_b) W_b^T) * f_b + bias        for every token t of image b
     At step 0 (all gates 1) this is exactly the pretrained layer: W_b = sum_k W_k = W.

"Virtual width": y_t = sum_k a_bk (W_k (x_t * c_b)) * f_b is a K*d_out-wide layer [W_1; ...; W_K] whose
K copies are gated per image and summed, but it costs one d_out-wide product after assembly.

Sections (the numbered banners below, top to bottom). The paper's operator comes first and stands
together (1-4); the plumbing follows the marker "below: plumbing (not in the paper)":

  1. Fourier Disjoint Weight: the band split (`band_ids`, `max_bands`)
  2. Kernel Spectral Modulation: descriptor -> gates (`KSM`)
  3. the layer (`FDLinear`) with its readable reference (`fdlinear_reference`) and the choice of fast path
  4. converting a model (`apply_dve`), the DVE's trainable part (`dve_parameters`), the GRPO
     reference-policy switch (`dve_static`) and the parameter-overhead report
  ----- below: plumbing (not in the paper) -----
  5. packed images: cu_seqlens -> segment ids, per-image means
  6. the custom op wrapper for csrc/fdlinear.cpp (+ csrc/fdlinear_cuda.cu) and its first-use self-check
  7. the one-layer benchmark bench.py calls
  8. the project's ONE checkpoint loader (`load`, `from_pretrained`, `load_checkpoint`,
     `load_with_deltas`): every entry point that reads a checkpoint (rl.py --init, eval.py --model,
     `eval.py generate|diagnose`, so train.sh's chain) loads through it (bench.py builds shapes, loads none). It lives here because dve.py is the lowest import floor that knows every piece of
     a SkinFlow checkpoint: dve.py imports skinflow.py and no other project module (issue 14).
Choices where the paper is silent are listed in docs/dve.md and docs/choices.md and next to the code.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import skinflow  # the floor below (issue 14): dve.py imports skinflow.py and nothing else of the project

# The paper's DVE blocks: vision layers 8, 16, 24, 32 counted from 1 = Qwen2.5-VL's full-attention blocks.
DEFAULT_BLOCKS = (7, 15, 23, 31)
DEFAULT_LINEARS = ("gate_proj", "up_proj", "down_proj")
# K = 4 by default: it is FDLinear's own default, it gives each band a quarter of W's energy (a coarse,
# well-conditioned split), the fast "mix cached band weights" path stays cheap (4 reads of W per image),
# and it is one of the few powers of two that even the reference code accepts for 1280 -> 3420.
# K = 64 and K = d/2 (the paper's two other numbers) work too: see `band_ids`.
DEFAULT_K = 4
# Up to this many bands we cache the K band weights and mix them (cost K*|W| per image, memory K*|W|).
# Above it we rebuild each image's weight with one batched inverse FFT (cost ~ |W| log|W|, any K).
BASIS_MAX_K = 8
# The custom op keeps the K gains of one image in GPU shared memory: at most this many bands.
KERNEL_MAX_K = 16


# ---------------------------------------------------------------------------------------------------
# 1. Fourier Disjoint Weight: the band split
# ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _radial_order(d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the rfft2 coordinates of a d_out x d_in matrix by radial frequency (cached per shape).

    Radius of coordinate (u, v), with u the signed row frequency index and v the column index:
        r^2 = (u / d_out)^2 + (v / d_in)^2        (each axis normalised by its own length)
    We sort the EXACT integer key  u^2 d_in^2 + v^2 d_out^2  (= r^2 d_out^2 d_in^2) with a STABLE sort,
    so ties are broken by position and the split is bit-identical on every machine; that is why the
    band map need not be saved in checkpoints.

    Hermitian pairs: in the columns v = 0 and v = d_in/2 (d_in even) the rfft2 of a real matrix holds
    both F[u, v] and its conjugate F[-u, v]. If the two fell in different bands, each band would be
    cut in half and the bands would stop being orthogonal. So only one "canonical" member of each such
    pair (row index i <= d_out // 2) is sorted; its partner joins the same band later.

    Returns (order, partner_src, partner_dst): flat indices of the canonical coordinates sorted by
    radius, and for every non-canonical coordinate its flat index and its canonical partner's index.
    """
    cols = d_in // 2 + 1
    i = torch.arange(d_out, dtype=torch.int64)[:, None]                    # [d_out, 1] row index
    v = torch.arange(cols, dtype=torch.int64)[None, :]                     # [1, cols] column index
    u = torch.where(i < (d_out + 1) // 2, i, i - d_out)                    # [d_out, 1] signed frequency
    key = (u * u * d_in * d_in + v * v * d_out * d_out).expand(d_out, cols)  # [d_out, cols] exact int64
    self_conj_col = (v == 0) | ((d_in % 2 == 0) & (v == d_in // 2))        # [1, cols]
    non_canonical = (self_conj_col & (i > d_out // 2)).expand(d_out, cols)  # [d_out, cols]
    flat_key = key.reshape(-1)
    canon = torch.nonzero(~non_canonical.reshape(-1)).squeeze(1)           # [C] flat indices
    order = canon[torch.sort(flat_key[canon], stable=True).indices]        # [C] sorted by radius
    rows, colz = torch.nonzero(non_canonical, as_tuple=True)
    partner_src = rows * cols + colz                                       # [P] non-canonical coordinate
    partner_dst = ((d_out - rows) % d_out) * cols + colz                   # [P] its conjugate partner
    return order, partner_src, partner_dst


def max_bands(d_out: int, d_in: int) -> int:
    """The largest K for a d_out x d_in weight: its number of canonical spectral coordinates (a Hermitian
    pair counts once), so that every band can own at least one coordinate."""
    cols = d_in // 2 + 1
    self_conj_cols = 1 + (d_in % 2 == 0)                                   # v = 0 and, for even d_in, v = d_in/2
    return d_out * cols - self_conj_cols * (d_out - d_out // 2 - 1)


def band_ids(d_out: int, d_in: int, K: int) -> torch.Tensor:
    """Band index of every rfft2 coordinate: int64 [d_out, d_in//2 + 1] with values 0..K-1 (0 = lowest).

    The C canonical coordinates, sorted by radius (see `_radial_order`), are cut into K contiguous runs;
    run k holds sorted positions floor(k C / K) .. floor((k+1) C / K) - 1, so band sizes differ by at most
    one (plus the Hermitian partners), and ANY 1 <= K <= C works: K need not divide the coefficient
    count (the reference code requires that and fails for 1280 -> 3420 with K = 64).
    """
    cols = d_in // 2 + 1
    C = max_bands(d_out, d_in)
    if not 1 <= K <= C:
        raise ValueError(f"K must be in 1..{C} for a {d_out}x{d_in} weight, got K={K}")
    order, partner_src, partner_dst = _radial_order(d_out, d_in)
    ids = torch.empty(d_out * cols, dtype=torch.int64)
    ids[order] = torch.arange(C, dtype=torch.int64) * K // C                # rank -> band, near-equal runs
    ids[partner_src] = ids[partner_dst]                                    # conjugates share a band
    return ids.view(d_out, cols)


# ---------------------------------------------------------------------------------------------------
# 2. Kernel Spectral Modulation (KSM-global): descriptor -> gates
# ---------------------------------------------------------------------------------------------------
class KSM(nn.Module):
    """Per-image gates from the per-image descriptor d_b (see the module docstring, step 2):

        h = ReLU(RMSNorm(U d)),  a = 2 sigmoid(H_a h + e_a),  c = 2 sigmoid(H_c h + e_c),  f = 2 sigmoid(H_f h + e_f)

    Names in checkpoints: ksm.squeeze (U), ksm.norm (RMSNorm gain), ksm.band_head, ksm.in_head, ksm.out_head.
    """

    def __init__(self, d_in: int, d_out: int, K: int, dtype=torch.float32, device=None):
        super().__init__()
        hidden = max(d_in // 16, 16)                                       # A: squeeze width
        kw = dict(dtype=dtype, device=device)
        self.squeeze = nn.Linear(d_in, hidden, bias=False, **kw)           # U, Kaiming-uniform (torch default)
        self.norm_weight = nn.Parameter(torch.ones(hidden, **kw))          # RMSNorm gain
        self.band_head = nn.Linear(hidden, K, **kw)                        # H_a, e_a
        self.in_head = nn.Linear(hidden, d_in, **kw)                       # H_c, e_c
        self.out_head = nn.Linear(hidden, d_out, **kw)                     # H_f, e_f
        self.eps = 1e-6
        for head in (self.band_head, self.in_head, self.out_head):
            # Zero heads => every gate is exactly 2 sigmoid(0) = 1 => the layer starts as the pretrained one.
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, d: torch.Tensor):
        """d [n_img, d_in] -> (a [n_img, K], c [n_img, d_in], f [n_img, d_out])."""
        z = self.squeeze(d)                                                # [n, A]
        z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight  # RMSNorm
        h = torch.relu(z)                                                  # [n, A]
        a = 2 * torch.sigmoid(self.band_head(h))                           # [n, K]
        c = 2 * torch.sigmoid(self.in_head(h))                             # [n, d_in]
        f = 2 * torch.sigmoid(self.out_head(h))                            # [n, d_out]
        return a, c, f


# ---------------------------------------------------------------------------------------------------
# 3. FDLinear
# ---------------------------------------------------------------------------------------------------
class FDLinear(nn.Module):
    """Frequency Dynamic Linear: a drop-in for a vision-MLP nn.Linear with a per-image weight.

    Built from a pretrained `linear` (its weight becomes the spectrum, its bias is kept). Parameters:
      spectrum [d_out, d_in//2+1, 2]  real/imag parts of F = rfft2(W, norm="ortho")  (frozen by default)
      bias     [d_out]                the pretrained bias (frozen by default, or None)
      ksm.*                           the KSM gates (trainable)
    Forward: y = FDLinear(x [T, d_in], cu_seqlens [n_img+1]) -> [T, d_out] (module docstring, step 3).

    Why the spectrum and bias are frozen by default: GRPO's reference policy is "the same weights with
    dynamic=False", and that is the pretrained layer only while the spectrum and bias stay put. Pass
    train_spectrum=True to let them train (the reference policy then drifts with them).
    Why "ortho" FFT normalisation: it keeps the stored numbers on the scale of W's entries (Parseval:
    |F| ~ |W|), so a learning rate means the same thing for them as for an ordinary weight.
    """

    takes_cu_seqlens = True  # the backbone passes per-image cu_seqlens to layers that set this

    def __init__(self, linear: nn.Linear, K: int = DEFAULT_K, train_spectrum: bool = False, impl: str = "auto"):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FDLinear is built from an nn.Linear, got {type(linear).__name__}")
        if isinstance(K, bool) or not isinstance(K, int):
            raise TypeError(f"K must be an int, got {K!r}")
        W = linear.weight.detach()                                         # [d_out, d_in]
        self.d_out, self.d_in = W.shape
        self.K = K
        self.dynamic = True          # False => all gates 1 => exactly the static layer built from `spectrum`
        self.impl = impl             # auto | reference | kernel | bases | spectral (see _weights_and_apply)
        dtype = W.dtype if W.dtype in (torch.float32, torch.float64) else torch.float32  # FFT needs fp32+
        cols = self.d_in // 2 + 1
        if not 1 <= K <= max_bands(self.d_out, self.d_in):
            raise ValueError(f"K must be in 1..{max_bands(self.d_out, self.d_in)} for a {self.d_out}x{self.d_in} weight, got K={K}")
        if W.is_meta:                                                      # shape-only model (from_pretrained, overhead)
            spec = torch.empty(self.d_out, cols, 2, dtype=dtype, device="meta")
        else:
            spec = torch.view_as_real(torch.fft.rfft2(W.double(), norm="ortho")).to(dtype)  # [d_out, cols, 2]
        self.spectrum = nn.Parameter(spec.contiguous(), requires_grad=train_spectrum)
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=train_spectrum)
        self.ksm = KSM(self.d_in, self.d_out, K, dtype=dtype, device=W.device)
        self._band_id = None                                               # built on first use, see band_id
        self._cache: dict = {}                                             # frozen-spectrum weights, see _frozen

    @property
    def band_id(self) -> torch.Tensor:
        """int64 [d_out, d_in//2+1]: the band of every spectral coordinate (`band_ids`), on the spectrum's device.

        Not a parameter or buffer, so not in checkpoints: `band_ids` is exact and deterministic (integer
        keys, stable sort), so it is rebuilt bit-identically wherever the layer is loaded.
        """
        if self._band_id is None or self._band_id.device != self.spectrum.device:
            self._band_id = band_ids(self.d_out, self.d_in, self.K).to(self.spectrum.device)
        return self._band_id

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, K={self.K}, bias={self.bias is not None}, dynamic={self.dynamic}"

    # ----- weights built from the spectrum ---------------------------------------------------------
    def _complex_spectrum(self, spectrum: torch.Tensor | None = None) -> torch.Tensor:
        """The spectrum as complex [d_out, cols]; a bf16/fp16 checkpoint is lifted to fp32 for the FFT."""
        spectrum = self.spectrum if spectrum is None else spectrum
        if spectrum.dtype not in (torch.float32, torch.float64):
            spectrum = spectrum.float()
        return torch.view_as_complex(spectrum)

    def _irfft2(self, S: torch.Tensor) -> torch.Tensor:
        """Spatial weight(s) from spectrum/spectra S [..., d_out, cols]: irfft2 with s = (d_out, d_in)."""
        return torch.fft.irfft2(S, s=(self.d_out, self.d_in), norm="ortho")

    def static_weight(self) -> torch.Tensor:
        """W = irfft2(F) = sum_k W_k: the pretrained weight (up to fp32 round-off) [d_out, d_in]."""
        return self._frozen("static", lambda: self._irfft2(self._complex_spectrum()))

    def band_weights(self) -> torch.Tensor:
        """All K band weights W_k = irfft2(F * 1[S_k]) stacked: [K, d_out, d_in] (K full-size matrices)."""
        def build():
            masks = self.band_id[None] == torch.arange(self.K, device=self.band_id.device)[:, None, None]  # [K, d_out, cols]
            return self._irfft2(self._complex_spectrum()[None] * masks)
        return self._frozen("bands", build)

    def _frozen(self, name, build):
        """Cache a weight derived from the spectrum while the spectrum cannot change under us.

        A trainable spectrum (with autograd on) is never cached: the weight must stay in the graph.
        The key holds the tensor version, so optimizer steps or load_state_dict invalidate the cache.
        """
        if self.spectrum.requires_grad and torch.is_grad_enabled():
            return build()
        key = (name, self.spectrum.device, self.spectrum._version, self.spectrum.data_ptr())
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != name}  # one entry per name
            with torch.no_grad():
                self._cache[key] = build()
        return self._cache[key]

    def _apply(self, fn, *args, **kwargs):
        self._cache = {}                                                   # .to()/.cuda()/.double(): drop caches
        return super()._apply(fn, *args, **kwargs)

    # ----- forward ------------------------------------------------------------------------------
    def gates(self, x: torch.Tensor, seg: _Segments):
        """Descriptor (per-image mean, in fp32 or better) -> KSM gates a [n, K], c [n, d_in], f [n, d_out]."""
        acc = torch.float64 if self.spectrum.dtype == torch.float64 else torch.float32
        d = seg.mean(x.to(acc))                                            # [n, d_in]
        a, c, f = self.ksm(d.to(self.ksm.squeeze.weight.dtype))            # KSM in its own dtype (bf16 ok)
        return a.to(acc), c.to(acc), f.to(acc)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """y_t = ((x_t * c_b) W_b^T) * f_b + bias, W_b = sum_k a_bk W_k  (b = image of token t).

        x [T, d_in] (tokens of all images back to back), cu_seqlens [n_img + 1] per-image cumulative
        token counts (None = all tokens are one image). dynamic=False gives x W^T + bias.
        """
        if x.dim() != 2 or x.shape[-1] != self.d_in:
            raise ValueError(f"FDLinear expects packed tokens [T, {self.d_in}], got {tuple(x.shape)}")
        if not self.dynamic:                                               # reference policy / static view
            return F.linear(x, self.static_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        seg = _Segments(cu_seqlens, x.shape[0], x.device)
        a, c, f = self.gates(x, seg)                                       # [n,K] [n,d_in] [n,d_out]
        if self.impl == "reference":
            return fdlinear_reference(x, seg.cu, self._complex_spectrum(), self.band_id, a, c, f, self.bias)
        xc = x * c.to(x.dtype)[seg.seg]                                    # [T, d_in]  input gates on activations
        y = self._weights_and_apply(xc, a, seg)                            # [T, d_out]
        y = y * f.to(y.dtype)[seg.seg]                                     # output gates on activations
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _weights_and_apply(self, xc: torch.Tensor, a: torch.Tensor, seg: _Segments) -> torch.Tensor:
        """sum_k a_bk W_k xc_t, choosing how to build the per-image weights:

        * bases  (K <= BASIS_MAX_K): mix the K cached band weights. Cost K*|W| per image, memory K*|W| per
          layer. With the csrc op ("kernel") the mix happens tile by tile while the tiles are loaded for the
          product, so W_b is never written to memory, forward or backward.
        * spectral (larger K, e.g. 64 or d/2): W_b = irfft2(F * a_b[band_id]) for all images in ONE batched
          inverse FFT. Cost ~|W| log|W| per image whatever K is, and no K-fold cache.
        Both run under checkpointing (or inside the op), so training never stores per-image weights.
        Choice by K and batch: with a frozen spectrum the band weights are cached (no FFT at all), so for
        K <= BASIS_MAX_K mixing (K|W| per image, ~K/50 of an FFT) always wins. With a trainable spectrum the
        bands are rebuilt every step (K inverse FFTs) against n_img FFTs for the spectral path: we take the
        bases path only when K <= n_img as well (the "min(K, B) FFTs per step" rule).
        """
        impl = self.impl
        if impl == "auto":
            fresh_bands = self.spectrum.requires_grad and torch.is_grad_enabled()
            impl = "bases" if self.K <= BASIS_MAX_K and (not fresh_bands or self.K <= seg.n) else "spectral"
        if impl in ("bases", "kernel"):
            return mix_apply(xc, seg.cu, a, self.band_weights(), impl="kernel" if impl == "kernel" else "auto")
        if impl == "spectral":
            return _maybe_checkpoint(self._spectral_apply, xc, a, self.spectrum, seg=seg)
        raise ValueError(f"unknown FDLinear impl {self.impl!r} (auto|reference|kernel|bases|spectral)")

    def _spectral_apply(self, xc, a, spectrum, seg):
        """W_b = irfft2(F * g_b), g_b = a_b[band_id] (a gather: each coordinate takes its band's gain)."""
        S = self._complex_spectrum(spectrum)                               # [d_out, cols] complex
        gains = a.to(S.real.dtype)[:, self.band_id]                        # [n, d_out, cols]
        W = self._irfft2(S[None] * gains)                                  # [n, d_out, d_in]
        return _segments_apply(xc, W.to(xc.dtype), seg)


def fdlinear_reference(x, cu_seqlens, spectrum, band_id, a, c, f, bias=None):
    """The operator written as plainly as possible, one image at a time (the test oracle; slow).

    For image b:  W_b = irfft2(F * a_b[band_id]),  Y_b = ((X_b * c_b) W_b^T) * f_b + bias.
    spectrum: complex [d_out, d_in//2+1]; a [n, K], c [n, d_in], f [n, d_out]. Computed in a's dtype.
    """
    cu = [int(v) for v in cu_seqlens]
    d_in = c.shape[1]
    d_out = spectrum.shape[0]
    outs = []
    for b in range(len(cu) - 1):
        X = x[cu[b]:cu[b + 1]].to(a.dtype)                                  # [N_b, d_in]
        W = torch.fft.irfft2(spectrum * a[b][band_id], s=(d_out, d_in), norm="ortho")  # [d_out, d_in]
        Y = ((X * c[b]) @ W.T.to(a.dtype)) * f[b]                           # [N_b, d_out]
        outs.append(Y if bias is None else Y + bias.to(a.dtype))
    return torch.cat(outs).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# 4. Converting a model: apply_dve, the static switch, the overhead report
# ---------------------------------------------------------------------------------------------------
def _vision_blocks(model):
    visual = getattr(model, "visual", None)
    if visual is None or not hasattr(visual, "blocks"):
        raise TypeError(f"apply_dve needs a model with .visual.blocks (skinflow.VLM), got {type(model).__name__}")
    return visual, visual.blocks


def apply_dve(model, blocks=DEFAULT_BLOCKS, K: int = DEFAULT_K, linears=DEFAULT_LINEARS,
              train_spectrum: bool = False, verbose: bool = False) -> dict:
    """Turn a loaded VLM into a SkinFlow DVE model, in place, and return the parameter-overhead report.

    Every `model.visual.blocks[i].mlp.<name>` (i in blocks, name in linears) becomes FDLinear(that linear,
    K), initialised from its pretrained weight, so the converted model computes the same function until
    the KSM heads move. blocks=None means the config's full-attention blocks (= (7, 15, 23, 31) for
    Qwen2.5-VL, the paper's layers 8/16/24/32). The choice is recorded in model.cfg.dve =
    {"blocks", "K", "linears"}, which save_pretrained writes to config.json and from_pretrained reads to
    re-apply the conversion before loading the weights.

    What trains: the KSM heads (`dve_parameters`). The spectrum and bias are frozen unless
    train_spectrum=True (see FDLinear). Nothing else in the model is touched: whether the rest of the
    vision tower trains is the trainer's choice (requires_grad stays as it was).
    """
    visual, blk_list = _vision_blocks(model)
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    if blocks is None:
        blocks = tuple(getattr(getattr(cfg, "vision", None), "fullatt_block_indexes", DEFAULT_BLOCKS))
    blocks = tuple(int(b) for b in blocks)
    linears = tuple(linears)
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive int, got {K!r}")
    bad = [b for b in blocks if not 0 <= b < len(blk_list)]
    if bad or len(set(blocks)) != len(blocks) or not blocks:
        raise ValueError(f"blocks must be distinct indices in 0..{len(blk_list) - 1} (this vision tower has "
                         f"{len(blk_list)} blocks; blocks=None picks its full-attention blocks), got {blocks}")
    unknown = [n for n in linears if n not in DEFAULT_LINEARS]
    if unknown or not linears or len(set(linears)) != len(linears):
        raise ValueError(f"linears must be distinct names from {DEFAULT_LINEARS}, got {linears}")
    before = sum(p.numel() for p in visual.parameters())
    for b in blocks:
        mlp = blk_list[b].mlp
        for name in linears:
            layer = getattr(mlp, name)
            if isinstance(layer, FDLinear):
                raise ValueError(f"visual.blocks.{b}.mlp.{name} is already an FDLinear (apply_dve ran twice?)")
            setattr(mlp, name, FDLinear(layer, K, train_spectrum=train_spectrum))
    if cfg is not None:
        cfg.dve = {"blocks": list(blocks), "K": K, "linears": list(linears)}
    report = overhead_report(model)
    if verbose:
        print(format_overhead(report))
    return report


def fdlinears(model):
    """(name, FDLinear) for every DVE layer of the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FDLinear)]


def dve_parameters(model):
    """The DVE's trainable part: the KSM parameters of every FDLinear (for an optimizer param group)."""
    return [p for _, m in fdlinears(model) for p in m.ksm.parameters()]


@contextlib.contextmanager
def dve_static(model):
    """Within the block every FDLinear runs with dynamic=False (all gates 1): y = x W^T + b with W built
    from the stored spectrum. With the spectrum frozen (the default) that is exactly the pretrained
    layer, so the same weights serve as GRPO's reference policy with no second copy of the model."""
    layers = [m for _, m in fdlinears(model)]
    before = [m.dynamic for m in layers]
    try:
        for m in layers:
            m.dynamic = False
        yield model
    finally:
        for m, d in zip(layers, before):
            m.dynamic = d


def overhead_report(model) -> dict:
    """Parameter overhead of the DVE layers, absolute and as % of the vision tower they replaced into.

    added = sum over FDLinear of  KSM params + (spectrum + bias - original weight - original bias);
    the spectrum stores d_out (d_in//2 + 1) complex numbers for d_out d_in reals, i.e. 2 d_out extra
    reals (even d_in), whatever K is: the bands add no parameters, only KSM does.
    """
    visual, _ = _vision_blocks(model)
    layers = fdlinears(visual)
    ksm = sum(p.numel() for _, m in layers for p in m.ksm.parameters())
    spectrum_extra = sum(m.spectrum.numel() - m.d_out * m.d_in for _, m in layers)
    after = sum(p.numel() for p in visual.parameters())
    added = ksm + spectrum_extra
    before = after - added
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    spec = getattr(cfg, "dve", None) or {}
    return {"blocks": spec.get("blocks"), "K": spec.get("K"), "linears": spec.get("linears"),
            "layers": len(layers), "ksm_params": ksm, "spectrum_extra_params": spectrum_extra,
            "params_added": added, "vision_params_before": before, "vision_params_after": after,
            "overhead_pct": 100.0 * added / max(before, 1)}


def format_overhead(report: dict) -> str:
    return (f"DVE: {report['layers']} FDLinear layers (K={report['K']}, blocks {report['blocks']}, "
            f"{'/'.join(report['linears'] or [])}): +{report['params_added']:,} params "
            f"(KSM {report['ksm_params']:,}, spectrum {report['spectrum_extra_params']:,}) = "
            f"{report['overhead_pct']:.2f} % of the {report['vision_params_before']:,}-param vision tower")


def preset_overhead(preset: str = "3b", blocks=DEFAULT_BLOCKS, K: int = DEFAULT_K, linears=DEFAULT_LINEARS) -> dict:
    """The overhead report for a real model shape (skinflow.Config.preset: "3b" | "7b"), computed on the
    META device: no weights are allocated, so this runs anywhere in a second."""
    with torch.device("meta"):
        model = skinflow.VLM(skinflow.Config.preset(preset), init=False)
        return apply_dve(model, blocks=blocks, K=K, linears=linears)


# ###################################################################################################
# ===== below: plumbing (not in the paper) =====
# Sections 1-4 above are the DVE as the paper describes it: the Fourier-disjoint band split, the KSM
# gates, the FDLinear layer (with its readable reference, `fdlinear_reference`) and the conversion of
# a Qwen2.5-VL vision tower. Below: packed-image bookkeeping, the fused custom op, the benchmark, and
# the project's one checkpoint loader.
# ###################################################################################################

# ---------------------------------------------------------------------------------------------------
# 5. Packed images: cu_seqlens -> segment ids, per-image means, padded batches
# ---------------------------------------------------------------------------------------------------
class _Segments:
    """Token -> image bookkeeping for a packed sequence (x [T, d] with images back to back).

    cu_seqlens = per-IMAGE cumulative token counts [n_img + 1] (0, N_1, N_1 + N_2, ..., T). Qwen2.5-VL also
    has per-WINDOW seqlens; those would give each window its own weight, which is not the paper's
    per-image descriptor, so the backbone passes the per-image ones.
    """

    def __init__(self, cu_seqlens, T: int, device):
        if cu_seqlens is None:                                             # a lone image
            cu = [0, T]
        else:
            if not torch.is_tensor(cu_seqlens):
                cu_seqlens = torch.as_tensor(cu_seqlens)
            if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
                raise ValueError(f"cu_seqlens must be a 1-D integer tensor [n_img + 1], got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
            cu = cu_seqlens.tolist()                                       # one host copy: checks + padding size
        lengths = [e - s for s, e in zip(cu[:-1], cu[1:])]
        if cu[0] != 0 or cu[-1] != T or min(lengths) <= 0:
            raise ValueError(f"cu_seqlens must rise strictly from 0 to the token count {T} (every image needs "
                             f"at least one token), got {cu[:8]}{'...' if len(cu) > 8 else ''}")
        self.n = len(lengths)                                              # images
        self.max_len = max(lengths)
        self.cu = torch.tensor(cu, dtype=torch.int64, device=device)       # [n + 1]
        self.lengths = torch.tensor(lengths, dtype=torch.int64, device=device)  # [n]
        self.seg = torch.repeat_interleave(torch.arange(self.n, device=device), self.lengths, output_size=T)  # [T]
        self.pos = torch.arange(T, device=device) - self.cu[self.seg]      # [T] position inside its image

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """d_b = (1/N_b) sum_{t in b} x_t  -> [n, d]; x should already be in the accumulation dtype."""
        total = x.new_zeros(self.n, x.shape[1]).index_add_(0, self.seg, x)  # [n, d]
        return total / self.lengths[:, None].to(x.dtype)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, d] -> [n, max_len, d] (zeros after each image's last token) so one bmm serves all images."""
        out = x.new_zeros(self.n, self.max_len, x.shape[1])
        out[self.seg, self.pos] = x
        return out

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """[n, max_len, d] -> [T, d]."""
        return y[self.seg, self.pos]


def _segments_apply(x: torch.Tensor, W: torch.Tensor, seg: _Segments) -> torch.Tensor:
    """y_t = W_b x_t for the image b of token t, all images in ONE batched matmul (no Python loop).

    x [T, d_in], W [n, d_out, d_in] -> [T, d_out]. Images are zero-padded to the longest one; with equal
    image sizes (the usual case: one resolution) nothing is wasted.
    """
    return seg.unpad(torch.bmm(seg.pad(x), W.transpose(1, 2)))           # [n, L, d_in] @ [n, d_in, d_out]


# ---------------------------------------------------------------------------------------------------
# 6. The custom op (csrc/fdlinear.cpp + csrc/fdlinear_cuda.cu): mix the band tiles while loading them
# ---------------------------------------------------------------------------------------------------
_EXT = "unset"


def _extension():
    """The compiled op, or None (build failed, or SKINFLOW_NO_EXT=1). Built once per process."""
    global _EXT
    if os.environ.get("SKINFLOW_NO_EXT", "") not in ("", "0"):
        return None
    if _EXT == "unset":
        _EXT = skinflow.build_extension("fdlinear")
    return _EXT


class _MixApply(torch.autograd.Function):
    """y_t = (sum_k a_bk W_k) x_t with the custom op; W_b only ever exists as a tile in fast memory.

    Backward (recomputing the tiles, so training memory never holds a per-image weight):
        dx_t   = W_b^T dy_t
        da_bk  = <W_k, P_b>_F            with P_b = sum_{t in b} dy_t x_t^T   [d_out, d_in], per tile
        dW_k   = sum_b a_bk P_b          (only when the bands train)
    """

    @staticmethod
    def forward(ctx, x, cu, a, bases):
        ext = _extension()
        ctx.save_for_backward(x, cu, a, bases)
        return ext.mix_apply_forward(x, cu, a, bases)

    @staticmethod
    def backward(ctx, dy):
        x, cu, a, bases = ctx.saved_tensors
        dx, da, dbases = _extension().mix_apply_backward(dy.contiguous(), x, cu, a, bases, ctx.needs_input_grad[3])
        return (dx if ctx.needs_input_grad[0] else None, None,
                da if ctx.needs_input_grad[2] else None,
                dbases if ctx.needs_input_grad[3] else None)


def _extension_ok(ext, device) -> bool:
    """skinflow.extension_ok for csrc/fdlinear (registers the check on first call)."""
    skinflow.register_extension_check("fdlinear", _check_fdlinear)
    return skinflow.extension_ok("fdlinear", device, ext)


def _check_fdlinear(ext, device) -> dict:
    """First-use self-check of csrc/fdlinear on `device` (see skinflow.extension_ok): y = (sum_k a_bk W_k) x_t
    and its three gradients (dx, da, dbases) against float64 autograd on small random inputs (two images of
    unequal length, sizes that are not multiples of a tile), fp32, and also bf16 on CUDA.
    Returns the worst case as {"max_err", "tol", "what"}."""
    g = torch.Generator().manual_seed(15)
    cases = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    found = []
    for dtype in cases:
        T, d_in, d_out, K = 37, 72, 40, 3
        x = torch.randn(T, d_in, generator=g).to(device=device, dtype=dtype)             # [T, d_in]
        cu = torch.tensor([0, 15, T], dtype=torch.int64, device=device)                  # two images
        a = (2 * torch.rand(2, K, generator=g)).to(device)                               # [n, K] fp32 gains
        bases = (0.1 * torch.randn(K, d_out, d_in, generator=g)).to(device=device, dtype=dtype)  # [K, d_out, d_in]
        dy = torch.randn(T, d_out, generator=g).to(device=device, dtype=dtype)           # [T, d_out]
        y = ext.mix_apply_forward(x.contiguous(), cu, a.contiguous(), bases.contiguous())
        dx, da, db = ext.mix_apply_backward(dy.contiguous(), x.contiguous(), cu, a.contiguous(), bases.contiguous(), True)
        # float64 oracle with autograd: W_b = sum_k a_bk W_k, y_t = W_b x_t
        x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, a, bases))
        seg = torch.tensor([0] * 15 + [1] * (T - 15), device=device)                      # [T] image of token t
        W = torch.einsum("nk,koi->noi", a64, b64)                                        # [n, d_out, d_in]
        ref = torch.einsum("toi,ti->to", W[seg], x64)                                    # [T, d_out]
        rdx, rda, rdb = torch.autograd.grad(ref, (x64, a64, b64), dy.double())
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        for what, got, want in (("y", y, ref), ("dx", dx, rdx), ("da", da, rda), ("dbases", db, rdb)):
            err = float((got.double() - want.detach()).abs().max() / (1 + want.detach().abs().max()))
            found.append((err / tol if err == err else math.inf, err, tol, f"{what} {dtype} (relative)"))
    return skinflow.worst_check(found)


def mix_apply(x: torch.Tensor, cu_seqlens: torch.Tensor, a: torch.Tensor, bases: torch.Tensor, impl: str = "auto"):
    """y_t = (sum_k a_bk W_k) x_t for a packed sequence: x [T, d_in], a [n, K], bases [K, d_out, d_in].

    impl: "kernel" (the csrc op; error if it cannot run), "torch" (batched einsum + bmm under activation
    checkpointing), "auto" (kernel when it builds, the dtype/device/K fit and it passed its first-use
    self-check on this device, skinflow.extension_ok; else torch).
    """
    if impl not in ("auto", "kernel", "torch"):
        raise ValueError(f"impl must be auto|kernel|torch, got {impl!r}")
    seg = _Segments(cu_seqlens, x.shape[0], x.device)
    if impl != "torch":
        ok_dtype = x.dtype in ((torch.float32, torch.float64) if x.device.type == "cpu"
                               else (torch.float32, torch.float64, torch.float16, torch.bfloat16))
        ext = _extension() if ok_dtype and a.shape[1] <= KERNEL_MAX_K else None
        if ext is not None and (x.device.type == "cpu" or hasattr(ext, "has_cuda") and ext.has_cuda()) and \
                (impl == "kernel" or _extension_ok(ext, x.device)):  # "auto": only after its first-use check
            bases = bases.to(x.dtype).contiguous()
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            return _MixApply.apply(x.contiguous(), seg.cu, a.to(acc).contiguous(), bases)
        if impl == "kernel":
            raise RuntimeError("fdlinear kernel unavailable for this input: "
                               + skinflow.EXTENSION_ERRORS.get("fdlinear", f"dtype {x.dtype}, device {x.device}, K {a.shape[1]}"))
    return _maybe_checkpoint(_mix_torch, x, a, bases, seg=seg)


def _mix_torch(x, a, bases, seg):
    """PyTorch path: W_b = sum_k a_bk W_k for all images in one einsum, then one batched matmul."""
    W = torch.einsum("nk,koi->noi", a.to(bases.dtype), bases).to(x.dtype)  # [n, d_out, d_in]
    return _segments_apply(x, W, seg)


def _maybe_checkpoint(fn, *args, seg):
    """Run fn under activation checkpointing when autograd records: the per-image weights built inside
    are then recomputed in backward instead of being stored (n * d_out * d_in floats per layer)."""
    if torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in args):
        return checkpoint(fn, *args, seg=seg, use_reentrant=False)
    return fn(*args, seg=seg)


# ---------------------------------------------------------------------------------------------------
# 7. Benchmark of one layer (for bench.py): static nn.Linear vs FDLinear's paths
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _forced_fallback():
    """Temporarily set SKINFLOW_NO_EXT=1 (the PyTorch path), restoring the previous value after."""
    old = os.environ.get("SKINFLOW_NO_EXT")
    os.environ["SKINFLOW_NO_EXT"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SKINFLOW_NO_EXT", None)
        else:
            os.environ["SKINFLOW_NO_EXT"] = old


def benchmark(n_img: int = 8, tokens: int = 1024, d_in: int = 1280, d_out: int = 3420, K: int = DEFAULT_K,
              device: str = "cuda", dtype=torch.bfloat16, reps: int = 10, backward: bool = True) -> dict:
    """Time one vision-MLP-shaped layer (for bench.py): static nn.Linear vs FDLinear through the PyTorch
    path and through the csrc op, forward (+ backward w.r.t. the input and the KSM), on random data.

    Returns {path: {"ms": median milliseconds, "peak_mb": peak extra memory (CUDA only, else None)}}.
    Defaults: the paper's setting, 8 images x 1024 tokens at 1280 -> 3420 in bf16 on a GPU.
    """
    import statistics
    import time

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g) / d_in ** 0.5)
    x = torch.randn(n_img * tokens, d_in, generator=g).to(dev, dtype)    # [T, d_in]
    cu = (torch.arange(n_img + 1) * tokens).to(dev)                       # [n_img + 1]
    layer = FDLinear(lin, K).to(dev)                                      # built from the same W (fp32 spectrum)
    static = lin.to(dev, dtype)
    with torch.no_grad():                                                 # move the gates off 1
        for head in (layer.ksm.band_head, layer.ksm.in_head, layer.ksm.out_head):
            head.weight.normal_(0, 0.02, generator=None)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def run(fn):
        xi = x.detach().requires_grad_(backward)
        out = fn(xi)
        if backward:
            out.float().square().mean().backward()

    def timed(fn):
        run(fn)                                                           # warm-up (caches, cuBLAS plans)
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run(fn)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20 if dev.type == "cuda" else None
        return {"ms": statistics.median(times), "peak_mb": peak}

    results = {"static": timed(lambda xi: static(xi))}
    with _forced_fallback():                                              # PyTorch path only
        results["fdlinear_torch"] = timed(lambda xi: layer(xi, cu))
    if K <= KERNEL_MAX_K and _extension() is not None:
        layer.impl = "kernel"
        try:
            results["fdlinear_kernel"] = timed(lambda xi: layer(xi, cu))
        except RuntimeError as exc:                                       # e.g. CUDA tensors, CPU-only build
            results["fdlinear_kernel"] = {"ms": None, "peak_mb": None, "error": str(exc)}
    return results


def build_parser():
    """`python dve.py [--presets 3b,7b] [--k 4,64,640]`: the DVE overhead table for the real shapes."""
    import argparse

    p = argparse.ArgumentParser(prog="dve.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Extra parameters of the DVE (FDLinear in the vision "
                                            "tower's MLPs) for the real Qwen2.5-VL shapes; no weights loaded")
    p.add_argument("--presets", default="3b,7b", help="comma-separated backbone presets to tabulate (3b, 7b)")
    p.add_argument("--k", default="4,64,640", help="comma-separated K values (frequency bands = gate heads); "
                                                   "the overhead grows with K")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in args.presets.split(","):
        for k in args.k.split(","):
            print(name, format_overhead(preset_overhead(name.strip(), K=int(k))))
    return 0


# ===================================================================================================
# 8. The one checkpoint loader (plumbing: checkpoint I/O, not in the paper)
#
# Every entry point that reads a checkpoint loads it here: rl.py --init, eval.py --model, `eval.py
# generate|diagnose --ckpt`, and so train.sh's chain (bench.py builds models from configs, loads none). This is the lowest import floor that knows every piece a SkinFlow
# checkpoint can hold (issue 14): the backbone (skinflow.VLM.from_pretrained), the DVE layers (rebuilt
# from config.json's "dve" entry by `rebuild_dve`, before any tensor is read), a LoRA adapter (merged
# into the weights of an fp32 export, or the unmerged lora.safetensors of a bf16 export, which
# from_pretrained re-attaches), and an rl.py training checkpoint (`load_with_deltas`: base + the saved
# trainable tensors). skinflow.py itself imports no project module, so it takes `rebuild_dve` as a hook.
#
#   load(name_or_path_or_preset, dtype, device, seed)  -> (model, tokenizer): preset, Hub id or export dir
#   from_pretrained(path, dtype, device)               -> model: skinflow.VLM.from_pretrained + the DVE hook
#   load_checkpoint(model_arg, ckpt, dtype, device)    -> (model, tokenizer, description): + a run folder
#   load_with_deltas(model, ckpt_file)                 rl.py's checkpoint.safetensors applied in place
# ===================================================================================================
class CheckpointError(ValueError):
    """A checkpoint that cannot be used (no model there, deltas without a base, names that do not fit):
    one readable line. A ValueError, so the CLIs print it as "error: ..." and exit 2 (eval.DiagnoseError
    is this class)."""


def rebuild_dve(model, cfg) -> set:
    """The DVE hook of skinflow.VLM.from_pretrained: turn the META model into the checkpoint's DVE model
    (cfg.dve = {"blocks", "K", "linears"}, as apply_dve recorded it) before its tensors are read, and
    return the names of the FDLinear tensors that are fp32 by construction (spectrum, KSM heads), which
    the loader keeps fp32 even in a bf16 model."""
    spec = dict(cfg.dve)
    apply_dve(model, blocks=tuple(spec.get("blocks", DEFAULT_BLOCKS)), K=spec.get("K", DEFAULT_K),
              linears=tuple(spec.get("linears", DEFAULT_LINEARS)))
    return {f"{mn}.{pn}" for mn, m in fdlinears(model) for pn, p in m.named_parameters()
            if p.dtype == torch.float32}


def from_pretrained(name_or_path, dtype=torch.float32, device="cpu") -> "skinflow.VLM":
    """skinflow.VLM.from_pretrained for any SkinFlow export: with DVE layers or without."""
    return skinflow.VLM.from_pretrained(name_or_path, dtype=dtype, device=device, convert=rebuild_dve)


def load(name_or_path_or_preset="tiny", dtype=torch.float32, device="cpu", seed: int = 0):
    """-> (VLM, Tokenizer): skinflow.load ("tiny" | "3b" | "7b" | Hub id | local dir) with the DVE hook.
    The loader of rl.py --init and eval.py --model."""
    return skinflow.load(name_or_path_or_preset, dtype=dtype, device=device, seed=seed, convert=rebuild_dve)


# Checkpoint layouts a user may point --ckpt at (what rl.py writes, in order of preference):
#   <dir>/config.json + model.safetensors        an exported model (VLM.save_pretrained; rl.py's
#                                                <out>/<stage>/model, LoRA merged, DVE kept, + tokenizer.json)
#   <dir>/model/                                 a stage folder after export (<out>/<stage>)
#   <dir>/{stage2,stage1,warmup}/model/          a whole run folder: the LATEST stage present is used
#   <dir>/checkpoint.safetensors (+ no model/)   a stage still training: base (--model) + the saved trainable
#                                                deltas ("param/<name>" = LoRA A/B, DVE spectra) re-applied
_STAGE_ORDER = ("stage2", "stage1", "warmup", "vision")


def find_checkpoint(ckpt) -> tuple[str, Path]:
    """-> ("model", dir with config.json) or ("deltas", path of checkpoint.safetensors)."""
    root = Path(ckpt).expanduser()
    if not root.exists():
        raise CheckpointError(f"--ckpt {ckpt}: no such directory")
    if root.is_file() and root.suffix == ".safetensors":
        return "deltas", root
    cands = [root, root / "model"] + [root / s / "model" for s in _STAGE_ORDER]
    for c in cands:
        if (c / "config.json").exists():
            return "model", c
    for c in [root] + [root / s for s in _STAGE_ORDER]:
        if (c / "checkpoint.safetensors").exists():
            return "deltas", c / "checkpoint.safetensors"
    raise CheckpointError(f"--ckpt {ckpt}: found no model (config.json + model.safetensors) and no rl.py "
                          "checkpoint.safetensors there, in model/, or in stage2|stage1|warmup|vision/")


def load_with_deltas(model, ckpt_file) -> dict:
    """Re-apply an rl.py training checkpoint to a freshly loaded BASE model, in place; returns its config.

    rl.Trainer.save_checkpoint stores the trainable tensors as "param/<parameter name>" (fp32 masters) and
    its TrainConfig as JSON metadata. We rebuild the same module structure the trainer had (DVE FDLinears
    when cfg.dve, LoRA adapters when "lora" was trained), then copy every saved tensor into the parameter
    of the same name. A name that does not exist is an error (wrong base model or different options).
    """
    from safetensors import safe_open

    with safe_open(str(ckpt_file), framework="pt") as f:
        meta = f.metadata() or {}
        params = {k[len("param/"):]: f.get_tensor(k) for k in f.keys() if k.startswith("param/")}
    if not params:
        raise CheckpointError(f"{ckpt_file}: holds no 'param/...' tensors (not an rl.py checkpoint)")
    # Mirror rl.Trainer.__init__: which sets were trained decides which modules must exist. The warm start
    # is full-parameter SFT, so its "param/..." names are the plain model's (no LoRA wrappers).
    cfg = json.loads(meta.get("config", "{}"))
    sets = {s.strip() for s in str(cfg.get("train", "lora,dve")).split(",") if s.strip()}
    if cfg.get("stage") in ("vision", "warmup"):
        sets = {"llm"}
    device = model.device
    if cfg.get("dve"):
        if not fdlinears(model):   # a Stage II run may start from a Stage I export that already has DVE
            apply_dve(model, blocks=None, K=int(cfg.get("dve_k", 4)))
    if "lora" in sets:
        skinflow.apply_lora(model, int(cfg.get("lora_rank", 16)), float(cfg.get("lora_alpha", 32.0)))
    model.to(device)                   # the new adapter / DVE tensors are created on the CPU
    names = dict(model.named_parameters())
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise CheckpointError(f"{ckpt_file}: {len(unknown)} saved tensors have no parameter in this model "
                              f"(e.g. {unknown[0]}); pass the run's base model with --model")
    # The saved tensors are fp32 masters; copy_ casts them to the model's dtype (bf16 runs included).
    with torch.no_grad():
        for n, t in params.items():
            if tuple(t.shape) != tuple(names[n].shape):
                raise CheckpointError(f"{ckpt_file}: {n} has shape {tuple(t.shape)} but the model's is "
                                      f"{tuple(names[n].shape)}; pass the run's base model with --model")
            names[n].copy_(t.to(names[n].dtype))
    return cfg


def load_checkpoint(model_arg, ckpt=None, dtype="float32", device="cpu"):
    """-> (model, tokenizer, description). --ckpt wins over --model for an exported model; for a training
    checkpoint --model is the base that the deltas are applied to."""
    # The tokenizer always travels with the weights it was trained with: an exported model folder holds
    # its own tokenizer.json (rl.Trainer.export saves it); a deltas checkpoint uses the base's.
    dt = getattr(torch, dtype)
    if ckpt is None:
        model, tok = load(model_arg, dtype=dt, device=device)
        return model.eval(), tok, f"base model {model_arg}"
    kind, where = find_checkpoint(ckpt)
    if kind == "model":
        model = from_pretrained(where, dtype=dt, device=device)
        if (where / "tokenizer.json").exists():
            tok = skinflow.Tokenizer.from_pretrained(where)
        elif model_arg is not None:      # an export without tokenizer: take the base model's
            tok = skinflow.Tokenizer.from_pretrained(skinflow.HUB_IDS.get(str(model_arg).lower(), model_arg))
        else:
            raise CheckpointError(f"{where} has no tokenizer.json: pass the base model with --model")
        return model.eval(), tok, f"fine-tuned model {where}"
    if model_arg is None:
        raise CheckpointError(f"{where} stores only the trained deltas: pass the base model with --model")
    model, tok = load(model_arg, dtype=dt, device=device)
    cfg = load_with_deltas(model, where)
    return model.eval(), tok, f"base {model_arg} + {cfg.get('stage', '?')} deltas from {where}"


if __name__ == "__main__":  # python dve.py: the overhead table for the real shapes
    raise SystemExit(main())
