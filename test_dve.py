"""Tests for dve.py (FDLinear, apply_dve, dve_static) and the csrc/fdlinear op.

Oracles: float64 per-image spectral reference (`dve.fdlinear_reference`), float64 einsum loops written
here, torch.fft.fftfreq radii (independent of dve's integer keys), finite differences (gradcheck),
least squares for the best static layer, and the unconverted model for logit parity.
"""
import contextlib
import os

import pytest
import torch
import torch.nn as nn

import dve

# The real Qwen2.5-VL vision-MLP shapes: gate/up 1280 -> 3420, down 3420 -> 1280.
DVE_D, DVE_I = 1280, 3420


def _dve_layer(d_in, d_out, K, seed=0, dtype=torch.float64, random_heads=True, bias=True):
    """An FDLinear from a random Linear; random_heads makes every gate differ from 1 (a real dynamic test)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g, dtype=dtype) / d_in ** 0.5)
        if bias:
            lin.bias.copy_(torch.randn(d_out, generator=g, dtype=dtype))
    layer = dve.FDLinear(lin, K)
    if random_heads:
        _dve_randomize_heads(layer, seed)
    return lin, layer


def _dve_randomize_heads(layer, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for head in (layer.ksm.band_head, layer.ksm.in_head, layer.ksm.out_head):
            head.weight.copy_(torch.randn(head.weight.shape, generator=g, dtype=head.weight.dtype) * std)
            head.bias.copy_(torch.randn(head.bias.shape, generator=g, dtype=head.bias.dtype) * std)


def _dve_tokens(lengths, d_in, seed=0, dtype=torch.float64):
    """Packed tokens of several images (each image gets its own mean, so descriptors differ) + cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, d_in, generator=g, dtype=dtype) + torch.randn(1, d_in, generator=g, dtype=dtype)
             for n in lengths]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return torch.cat(parts), cu


def _dve_mix_oracle(x, cu, a, bases):
    """y_t = (sum_k a_bk W_k) x_t, written as a float64 loop over images (oracle of the csrc op)."""
    out = []
    for b in range(len(cu) - 1):
        W = (a[b][:, None, None] * bases).sum(0)                             # [d_out, d_in]
        out.append(x[cu[b]:cu[b + 1]] @ W.T)
    return torch.cat(out)


def _dve_impls():
    """The FDLinear paths to compare; "kernel" only when the csrc op built (CI builds it)."""
    return ["reference", "bases", "spectral"] + (["kernel"] if dve._extension() is not None else [])


@contextlib.contextmanager
def _dve_env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----- the band split --------------------------------------------------------------------------------
@pytest.mark.parametrize("d_out,d_in", [(DVE_I, DVE_D), (DVE_D, DVE_I)])
def test_dve_band_ids_real_shapes_any_K(d_out, d_in):
    """K in {1, 4, 7, 64, d/2} on the real shapes: a partition into non-empty, radially ordered,
    near-equal bands, with Hermitian partners together (even where K does not divide the count)."""
    cols = d_in // 2 + 1
    fr = torch.fft.fftfreq(d_out, dtype=torch.float64)[:, None]              # independent radius oracle
    fc = torch.fft.rfftfreq(d_in, dtype=torch.float64)[None, :]
    r2 = (fr ** 2 + fc ** 2).reshape(-1)
    partner = (-torch.arange(d_out)) % d_out
    canon = torch.ones(d_out, cols, dtype=torch.bool)
    canon[d_out // 2 + 1:, 0] = False
    if d_in % 2 == 0:
        canon[d_out // 2 + 1:, -1] = False
    for K in (1, 4, 7, 64, DVE_D // 2):
        ids = dve.band_ids(d_out, d_in, K)
        assert ids.shape == (d_out, cols) and ids.min() == 0 and ids.max() == K - 1
        counts = torch.bincount(ids[canon], minlength=K)                    # canonical coordinates per band
        assert counts.min() > 0 and counts.max() - counts.min() <= 1, (K, counts.min(), counts.max())
        flat = ids.reshape(-1)
        hi = torch.full((K,), -1.0, dtype=torch.float64).scatter_reduce(0, flat, r2, "amax")
        lo = torch.full((K,), 9.0, dtype=torch.float64).scatter_reduce(0, flat, r2, "amin")
        assert torch.all(hi[:-1] <= lo[1:] + 1e-15), K                     # band k lies inside band k+1
        assert torch.equal(ids[:, 0], ids[partner, 0])                      # conjugate pairs share a band
        if d_in % 2 == 0:
            assert torch.equal(ids[:, -1], ids[partner, -1])
    assert 2192220 % 64 != 0 or d_out != DVE_I                               # the case the reference code fails on


@pytest.mark.parametrize("d_out,d_in,K", [(24, 40, 1), (25, 39, 3), (31, 32, 7), (40, 26, 20), (16, 17, 137)])
def test_dve_bands_sum_to_W_and_are_orthogonal(d_out, d_in, K):
    lin, layer = _dve_layer(d_in, d_out, K, random_heads=False)
    Wk = layer.band_weights()                                              # [K, d_out, d_in]
    W = lin.weight.detach()
    assert (Wk.sum(0) - W).norm() <= 1e-12 * W.norm()
    gram = torch.einsum("koi,joi->kj", Wk, Wk)                             # Frobenius inner products
    off = gram - torch.diag(torch.diag(gram))
    assert off.abs().max() <= 1e-12 * gram.diag().max()
    assert torch.all(gram.diag() > 0)                                      # no empty band
    # each band carries roughly 1/K of the energy (equal-count bands of a white-noise W)
    if K <= 7:
        share = gram.diag() / gram.diag().sum()
        assert share.max() < 3.0 / K


# ----- the layer ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["reference", "kernel", "bases", "spectral"])
def test_dve_identity_at_init(impl):
    if impl == "kernel" and dve._extension() is None:
        pytest.skip("fdlinear extension unavailable")
    lin, layer = _dve_layer(48, 36, 4, dtype=torch.float32, random_heads=False)
    layer.impl = impl
    x, cu = _dve_tokens([5, 9, 3], 48, dtype=torch.float32)
    want = lin(x)
    assert (layer(x, cu) - want).abs().max() <= 1e-5
    layer.dynamic = False
    assert (layer(x, cu) - want).abs().max() <= 1e-5
    assert layer.takes_cu_seqlens is True


@pytest.mark.parametrize("K", [1, 4, 7, 64, DVE_D // 2])
def test_dve_real_shape_1280x3420(K):
    """Real gate/up shape: identity at init, then random gates vs the float64 per-image reference."""
    g = torch.Generator().manual_seed(K)
    lin = nn.Linear(DVE_D, DVE_I)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(DVE_I, DVE_D, generator=g) / DVE_D ** 0.5)
    layer = dve.FDLinear(lin, K)
    x, cu = _dve_tokens([3, 2], DVE_D, seed=K, dtype=torch.float32)
    with torch.no_grad():
        assert (layer(x, cu) - lin(x)).abs().max() <= 1e-5 * lin(x).abs().max()
        _dve_randomize_heads(layer, seed=K, std=0.05)
        seg = dve._Segments(cu, x.shape[0], x.device)
        a, c, f = layer.gates(x, seg)
        assert (a - 1).abs().max() > 1e-3                                  # the gates really moved
        ref = dve.fdlinear_reference(x.double(), cu, layer._complex_spectrum().to(torch.complex128),
                                     layer.band_id, a.double(), c.double(), f.double(), layer.bias.double())
        assert (layer(x, cu).double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_dve_fast_paths_match_reference_fwd_bwd():
    """All implementations agree with the spectral per-image reference, output and gradients (float64)."""
    lin, layer = _dve_layer(40, 57, 5)
    x, cu = _dve_tokens([10, 4, 16], 40)
    x.requires_grad_(True)
    params = [layer.ksm.squeeze.weight, layer.ksm.norm_weight, layer.ksm.band_head.weight,
              layer.ksm.in_head.weight, layer.ksm.out_head.weight]
    g = torch.randn(30, 57, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = {}
    for impl in _dve_impls():
        layer.impl = impl
        y = layer(x, cu)
        results[impl] = [y] + list(torch.autograd.grad((y * g).sum(), [x] + params))
    for impl, got in results.items():
        for r, v in zip(results["reference"], got):
            assert (r - v).abs().max() <= 1e-10 * (1 + r.abs().max()), impl


def test_dve_kernel_matches_float64_reference():
    """The csrc op (CPU twin) vs a float64 loop: forward, dx, da, dbases; float32 and float64; gradcheck."""
    if dve._extension() is None:
        pytest.skip("fdlinear extension did not build: " + str(__import__("skinflow").EXTENSION_ERRORS.get("fdlinear")))
    g = torch.Generator().manual_seed(0)
    K, d_in, d_out = 3, 70, 130                                            # d_out > 64: several row tiles
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int64)
    x = torch.randn(20, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    a = (torch.rand(3, K, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    bases = torch.randn(K, d_out, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(20, d_out, generator=g, dtype=torch.float64)
    want = _dve_mix_oracle(x, cu, a, bases)
    want_grads = torch.autograd.grad((want * dy).sum(), [x, a, bases])
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        xx, aa, bb = (t.detach().to(dtype).requires_grad_(True) for t in (x, a, bases))
        y = dve.mix_apply(xx, cu, aa, bb, impl="kernel")
        grads = torch.autograd.grad((y * dy.to(dtype)).sum(), [xx, aa, bb])
        for got, ref in zip([y] + list(grads), [want] + list(want_grads)):
            assert (got.double() - ref).abs().max() <= tol * (1 + ref.abs().max())
    small = (torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True),
             torch.rand(2, 3, generator=g, dtype=torch.float64, requires_grad=True),
             torch.randn(3, 9, 5, generator=g, dtype=torch.float64, requires_grad=True))
    cu_small = torch.tensor([0, 2, 6])
    assert torch.autograd.gradcheck(lambda xx, aa, bb: dve.mix_apply(xx, cu_small, aa, bb, impl="kernel"), small)


def test_dve_no_extension_switch():
    """SKINFLOW_NO_EXT=1 forces the PyTorch path; impl='kernel' then fails with a clear message."""
    lin, layer = _dve_layer(20, 30, 3)
    x, cu = _dve_tokens([4, 6], 20)
    want = layer(x, cu)
    with _dve_env(SKINFLOW_NO_EXT="1"):
        assert dve._extension() is None
        assert (layer(x, cu) - want).abs().max() <= 1e-12
        layer.impl = "kernel"
        with pytest.raises(RuntimeError, match="kernel unavailable"):
            layer(x, cu)


def test_dve_images_are_independent():
    """Permuting the images permutes the outputs; adding an image does not change the others."""
    lin, layer = _dve_layer(24, 18, 4)
    lengths = [5, 8, 3, 6]
    x, cu = _dve_tokens(lengths, 24)
    y = layer(x, cu)
    parts_x = list(x.split(lengths))
    parts_y = list(y.split(lengths))
    perm = [2, 0, 3, 1]
    xp = torch.cat([parts_x[i] for i in perm])
    cup = torch.tensor([0] + list(torch.tensor([lengths[i] for i in perm]).cumsum(0)))
    yp = layer(xp, cup)
    assert (yp - torch.cat([parts_y[i] for i in perm])).abs().max() <= 1e-12
    extra, _ = _dve_tokens([7], 24, seed=9)
    y2 = layer(torch.cat([x, extra]), torch.cat([cu, cu[-1:] + 7]))
    assert (y2[: x.shape[0]] - y).abs().max() <= 1e-12
    # each image alone (cu_seqlens=None) gives its slice of the packed output
    alone = [layer(p, None) for p in parts_x]
    assert all((al - yy).abs().max() <= 1e-12 for al, yy in zip(alone, parts_y))
    assert (parts_y[0] - lin(parts_x[0])).abs().max() > 1e-3                # and the layer is not static


def test_dve_gradients_reach_every_head_and_memory_is_bounded():
    """At init (zero heads) every head gets a gradient; after a step the squeeze and norm do too; the frozen
    spectrum and bias get none; no per-image weight is kept for backward (checked on the saved tensors)."""
    lin, layer = _dve_layer(32, 48, 4, dtype=torch.float32, random_heads=False)
    x, cu = _dve_tokens([6, 9, 5], 32, dtype=torch.float32)
    target = torch.randn(20, 48, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for step in range(2):
        for impl in [i for i in _dve_impls() if i != "reference"]:
            with _dve_env(SKINFLOW_NO_EXT="1" if impl == "bases" else os.environ.get("SKINFLOW_NO_EXT", "0")):
                layer.impl = impl
                saved = []
                with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
                    loss = (layer(x, cu) - target).pow(2).mean()
                layer.zero_grad()
                loss.backward()
                # no per-image weight [n_img=3, d_out, d_in]; the largest saved tensor is the K=4 band cache
                assert 3 * 48 * 32 not in saved and max(saved) <= 4 * 48 * 32, (impl, sorted(saved)[-3:])
                heads = [layer.ksm.band_head, layer.ksm.in_head, layer.ksm.out_head]
                assert all(h.weight.grad.abs().max() > 0 and h.bias.grad.abs().max() > 0 for h in heads), impl
                if step == 1:
                    assert layer.ksm.squeeze.weight.grad.abs().max() > 0 and layer.ksm.norm_weight.grad.abs().max() > 0
                assert layer.spectrum.grad is None and layer.bias.grad is None
        opt.step()


def test_dve_trainable_spectrum_gradient():
    """train_spectrum=True: the spectrum's gradient through the band-mixing path (the csrc op's dW_k when it
    built) and through the spectral path (autograd of irfft2) agree."""
    lin = nn.Linear(20, 26, dtype=torch.float64)
    layer = dve.FDLinear(lin, 3, train_spectrum=True)
    _dve_randomize_heads(layer)
    x, cu = _dve_tokens([4, 7], 20)
    grads = []
    for impl in ("bases", "spectral"):
        layer.impl = impl
        layer.zero_grad()
        layer(x, cu).pow(2).sum().backward()
        grads.append(layer.spectrum.grad.clone())
    assert grads[0].abs().max() > 0 and (grads[0] - grads[1]).abs().max() <= 1e-10 * grads[1].abs().max()


def test_dve_toy_task_dynamic_beats_best_static():
    """Tokens of an image of type s in {-1, +1} are noise around s * mu; the target is (1 + 0.8 s) * (W0 x).
    Only a per-image gain solves it. A few Adam steps on the KSM heads beat the best static linear map
    (least squares over all weights and biases, float64) by a wide margin."""
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n_img, N = 16, 12, 16, 12
    W0 = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    mu = torch.randn(d_in, generator=g)
    s = torch.tensor([1.0, -1.0]).repeat(n_img // 2)                      # image types
    x = torch.randn(n_img, N, d_in, generator=g) + s[:, None, None] * mu  # [n_img, N, d_in]
    y = (1 + 0.8 * s)[:, None, None] * (x @ W0.T)                          # [n_img, N, d_out]
    x, y = x.reshape(-1, d_in), y.reshape(-1, d_out)
    cu = torch.arange(n_img + 1) * N
    X1 = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    best = torch.linalg.lstsq(X1, y.double()).solution
    static_loss = (X1 @ best - y.double()).pow(2).mean().item()
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(W0)
        lin.bias.zero_()
    layer = dve.FDLinear(lin, 4)
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(150):
        loss = (layer(x, cu) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = (layer(x, cu) - y).pow(2).mean().item()
    assert final < 0.25 * static_loss, (final, static_loss)


def test_dve_bad_input_errors():
    lin, layer = _dve_layer(10, 12, 2)
    x, cu = _dve_tokens([3, 4], 10)
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x, torch.tensor([0, 3, 6]))                                  # does not end at T
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x, torch.tensor([0, 3, 3, 7]))                               # an empty image
    with pytest.raises(ValueError, match="packed tokens"):
        layer(x[None], cu)
    with pytest.raises(ValueError, match="K must be"):
        dve.FDLinear(lin, 0)
    with pytest.raises(ValueError, match="K must be"):
        dve.band_ids(12, 10, 10 ** 6)
    with pytest.raises(TypeError):
        dve.FDLinear(nn.Conv1d(3, 3, 1), 2)


# ----- the model: apply_dve, dve_static, save/load, overhead -----------------------------------------
def _dve_vlm_inputs(cfg, grids, seed):
    """input_ids [1, T] (text, <vs>, image pads, <ve>, ... per image), pixel_values, image_grid_thw."""
    g = torch.Generator().manual_seed(seed)
    merge = cfg.vision.spatial_merge_size ** 2
    ids = torch.randint(0, 500, (4,), generator=g).tolist()
    for t, h, w in grids:
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // merge) + [cfg.vision_end_token_id]
        ids += torch.randint(0, 500, (3,), generator=g).tolist()
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), 1176, generator=g)
    return torch.tensor([ids]), pixels, torch.tensor(grids)


def _dve_ksm_formula(d_in, d_out, K):
    """KSM parameter count by hand: U (d_in x A) + RMSNorm (A) + three heads with bias ((A+1)(K+d_in+d_out))."""
    A = max(d_in // 16, 16)
    return d_in * A + A + (A + 1) * (K + d_in + d_out)


def test_dve_tiny_model_identity_static_switch_and_grads():
    import skinflow

    cfg = skinflow.Config.preset("tiny")
    model = skinflow.VLM(cfg, seed=3).eval()
    ids, pix, grids = _dve_vlm_inputs(cfg, [(1, 8, 8), (1, 6, 10)], seed=1)
    with torch.no_grad():
        want = model(ids, pixel_values=pix, image_grid_thw=grids)
    report = dve.apply_dve(model, blocks=None, K=4)                      # None: the full-attention blocks (1, 3)
    assert cfg.dve == {"blocks": [1, 3], "K": 4, "linears": ["gate_proj", "up_proj", "down_proj"]}
    d, i = cfg.vision.hidden_size, cfg.vision.intermediate_size
    per_block = 2 * _dve_ksm_formula(d, i, 4) + _dve_ksm_formula(i, d, 4) + 2 * 2 * i + 2 * d  # + spectrum extras
    assert report["layers"] == 6 and report["params_added"] == 2 * per_block
    assert abs(report["overhead_pct"] - 100 * report["params_added"] / report["vision_params_before"]) < 1e-9
    with torch.no_grad():
        got = model(ids, pixel_values=pix, image_grid_thw=grids)
    assert (got - want).abs().max() <= 1e-5
    for _, layer in dve.fdlinears(model):
        _dve_randomize_heads(layer, std=0.5)
    with torch.no_grad():
        moved = model(ids, pixel_values=pix, image_grid_thw=grids)
        with dve.dve_static(model):
            static = model(ids, pixel_values=pix, image_grid_thw=grids)
    assert (moved - want).abs().max() > 1e-4                              # the gates act on the logits
    assert (static - want).abs().max() <= 1e-5                            # reference policy = pretrained
    assert all(m.dynamic for _, m in dve.fdlinears(model))                # switch restored
    # gradients from the LM loss reach every head of every DVE layer
    for p in model.parameters():
        p.requires_grad_(False)
    for p in dve.dve_parameters(model):
        p.requires_grad_(True)
    model(ids, pixel_values=pix, image_grid_thw=grids).logsumexp(-1).mean().backward()
    for name, layer in dve.fdlinears(model):
        for head in (layer.ksm.band_head, layer.ksm.in_head, layer.ksm.out_head):
            assert head.weight.grad is not None and head.weight.grad.abs().max() > 0, name
    with pytest.raises(ValueError, match="already an FDLinear"):
        dve.apply_dve(model, blocks=[1])
    with pytest.raises(ValueError, match="blocks must be"):
        dve.apply_dve(skinflow.VLM(cfg), blocks=(7, 15, 23, 31))          # the 3B's blocks on a 4-block tower
    with pytest.raises(ValueError, match="linears must be"):
        dve.apply_dve(skinflow.VLM(cfg), blocks=[0], linears=("qkv",))


def test_dve_save_load_roundtrip(tmp_path):
    import skinflow
    from safetensors import safe_open

    cfg = skinflow.Config.preset("tiny")
    model = skinflow.VLM(cfg, seed=4).eval()
    dve.apply_dve(model, blocks=[0, 3], K=7, linears=("up_proj", "down_proj"))
    for _, layer in dve.fdlinears(model):
        _dve_randomize_heads(layer, std=0.5)
    ids, pix, grids = _dve_vlm_inputs(cfg, [(1, 6, 8), (1, 8, 8)], seed=2)
    with torch.no_grad():
        want = model(ids, pixel_values=pix, image_grid_thw=grids)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {"visual.blocks.3.mlp.down_proj.spectrum", "visual.blocks.0.mlp.up_proj.ksm.band_head.weight",
            "visual.blocks.0.mlp.gate_proj.weight"} <= keys
    assert "visual.blocks.0.mlp.up_proj.weight" not in keys
    loaded = skinflow.VLM.from_pretrained(tmp_path)
    assert loaded.cfg.dve == {"blocks": [0, 3], "K": 7, "linears": ["up_proj", "down_proj"]}
    assert len(dve.fdlinears(loaded)) == 4
    with torch.no_grad():
        got = loaded(ids, pixel_values=pix, image_grid_thw=grids)
    assert (got - want).abs().max() <= 1e-6


def test_dve_transformers_checkpoint_identity(tmp_path):
    """A tiny transformers Qwen2.5-VL checkpoint: ours with DVE applied still matches transformers' logits,
    and equals our unconverted model (fp32, <= 1e-5)."""
    import skinflow
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hf_cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=600, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, max_position_embeddings=2048,
                         bos_token_id=590, eos_token_id=591, pad_token_id=590),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=40, num_heads=2, out_hidden_size=64,
                           window_size=56, fullatt_block_indexes=[1]),
        image_token_id=595, video_token_id=596, vision_start_token_id=592, vision_end_token_id=593,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in hf.named_parameters():                            # randomise: no term may hide
            base = 1.0 if ("norm" in name or "ln_q" in name) else 0.0
            p.copy_(base + 0.05 * torch.randn(p.shape, generator=g))
    hf.save_pretrained(tmp_path)
    ours = skinflow.VLM.from_pretrained(tmp_path)
    ids, pix, grids = _dve_vlm_inputs(ours.cfg, [(1, 8, 12), (1, 6, 10)], seed=3)
    with torch.no_grad():
        plain = ours(ids, pixel_values=pix, image_grid_thw=grids)
        ref = hf(input_ids=ids, pixel_values=pix, image_grid_thw=grids, mm_token_type_ids=(ids == 595).int()).logits
    dve.apply_dve(ours, blocks=[0, 1], K=4)
    with torch.no_grad():
        got = ours(ids, pixel_values=pix, image_grid_thw=grids)
    assert (got - plain).abs().max() <= 1e-5
    assert (got - ref).abs().max() <= 1e-4


def test_dve_overhead_real_shapes_on_meta():
    """The 3B/7B vision towers (meta device, no memory): 12 FDLinear layers, overhead < 5 % (the paper's claim)."""
    per_block = (2 * _dve_ksm_formula(DVE_D, DVE_I, 4) + _dve_ksm_formula(DVE_I, DVE_D, 4)
                 + 2 * 2 * DVE_I + 2 * DVE_D)
    for preset in ("3b", "7b"):
        rep = dve.preset_overhead(preset)
        assert rep["layers"] == 12 and rep["params_added"] == 4 * per_block == 10_874_308
        assert 1.5 < rep["overhead_pct"] < 5.0


def test_dve_low_precision_model():
    """A bf16 copy (what from_pretrained(dtype=bfloat16) gives) runs and stays close to the fp32 layer:
    the FFT is lifted to fp32, the gates are computed from an fp32 descriptor."""
    lin, layer = _dve_layer(32, 40, 4, dtype=torch.float32)
    x, cu = _dve_tokens([6, 10], 32, dtype=torch.float32)
    want = layer(x, cu)
    half = layer.to(torch.bfloat16)
    got = half(x.to(torch.bfloat16), cu)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 0.05 * want.abs().max()


def test_dve_benchmark_smoke():
    """bench.py's entry point runs on CPU at a toy size and reports every path (no timing assertion)."""
    res = dve.benchmark(n_img=2, tokens=8, d_in=24, d_out=40, K=4, device="cpu", dtype=torch.float32, reps=1)
    assert {"static", "fdlinear_torch"} <= set(res) and all(v["ms"] is None or v["ms"] > 0 for v in res.values())
    assert ("fdlinear_kernel" in res) == (dve._extension() is not None)
