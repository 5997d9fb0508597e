"""Tests of eval.py section 8 ("seeing", issue 8): attention maps, heatmap, lesion focus, diagnose CLI.

Oracles:
* attention maps: transformers' Qwen2.5-VL with the EAGER attention kernel, which materialises every
  softmax row (output_attentions=True), on a random checkpoint loaded into both implementations;
* a synthetic case whose weights and image features force the last token's attention onto ONE image cell:
  the map must put the mass on that cell, and the real forward must agree (the layer output is then that
  token's value vector);
* lesion focus: hand-computed masks/grids and a supersampled box average;
* the CLI: the tiny preset end to end, and broken files that must give one line + exit status 2.
"""
import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch
from PIL import Image

import eval as sf_eval_attn
import skinflow as sf

_ATTN_IMG, _ATTN_VS, _ATTN_VE, _ATTN_EOS, _ATTN_PAD = 995, 992, 993, 991, 990


def _attn_hf_model(seed: int):
    """A small random transformers Qwen2.5-VL (3 decoder layers, GQA 4/2 heads), norms and biases randomised."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e4,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         max_position_embeddings=4096, bos_token_id=_ATTN_PAD, eos_token_id=_ATTN_EOS,
                         pad_token_id=_ATTN_PAD),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           window_size=56, fullatt_block_indexes=[1], tokens_per_second=2),
        image_token_id=_ATTN_IMG, video_token_id=996, vision_start_token_id=_ATTN_VS,
        vision_end_token_id=_ATTN_VE, tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    m = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            norm = "norm" in name or "ln_q" in name
            # larger q/k weights than HF's init make the attention rows peaked, so a wrong column shows
            scale = 0.1 if norm else 0.3 if ("q_proj" in name or "k_proj" in name) else 0.05
            p.copy_((1.0 if norm else 0.0) + scale * torch.randn(p.shape, generator=g))
    return m


def _attn_batch(grids, text_lens, seed):
    """Left-padded batch with one image per row: random text, <vs>, pads, <ve>, random text."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for (t, gh, gw), (n0, n1) in zip(grids, text_lens):
        rows.append(torch.randint(0, 900, (n0,), generator=g).tolist() + [_ATTN_VS] + [_ATTN_IMG] * (gh * gw // 4)
                    + [_ATTN_VE] + torch.randint(0, 900, (n1,), generator=g).tolist())
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), _ATTN_PAD)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
    pix = torch.randn(sum(t * h * w for t, h, w in grids), 1176, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pix, "image_grid_thw": torch.tensor(grids)}


@pytest.fixture(scope="module")
def attn_pair(tmp_path_factory):
    """(transformers eager model, the same weights in skinflow.VLM)."""
    hf = _attn_hf_model(3)
    d = tmp_path_factory.mktemp("attn_ckpt")
    hf.save_pretrained(d)
    return hf, sf.VLM.from_pretrained(d)


@pytest.mark.parametrize("layers", [None, [0], [-1], [0, 2]])
def test_attn_maps_match_transformers_eager_attentions(attn_pair, layers):
    """Final-token attention (head mean, layer mean) equals transformers' eager softmax rows, per image cell."""
    hf, ours = attn_pair
    grids = [(1, 6, 10), (1, 8, 8)]                       # merged 3 x 5 (non-square) and 4 x 4
    batch = _attn_batch(grids, [(5, 4), (2, 9)], seed=11)
    with torch.no_grad():
        out = hf(**batch, mm_token_type_ids=(batch["input_ids"] == _ATTN_IMG).int(), output_attentions=True)
    n = len(out.attentions)
    picked = list(range(n)) if layers is None else [i % n for i in layers]
    ref = torch.stack([out.attentions[i][:, :, -1, :] for i in picked]).mean(0).mean(1)   # [B, T]
    A = sf_eval_attn.final_token_attention(ours, batch, layers)
    assert torch.allclose(A, ref, atol=2e-6), (A - ref).abs().max()
    assert A[batch["attention_mask"] == 0].abs().max() == 0          # pads get nothing
    assert torch.allclose(A.sum(1), torch.ones(2), atol=1e-5)
    maps = sf_eval_attn.attention_maps(ours, batch, layers)
    assert [tuple(m.shape) for m in maps] == [(3, 5), (4, 4)]
    for b, (t, gh, gw) in enumerate(grids):
        cols = (batch["input_ids"][b] == _ATTN_IMG).nonzero().flatten()
        want = ref[b, cols].view(gh // 2, gw // 2)                   # raster order of the merged grid
        assert torch.allclose(maps[b], want, atol=2e-6)
    # the map is not trivially uniform (otherwise the reshape order could not be checked)
    assert float(maps[0].max() / maps[0].min()) > 1.5


def test_attn_bad_layer_and_hooks_removed(attn_pair):
    _, ours = attn_pair
    batch = _attn_batch([(1, 4, 4)], [(3, 3)], seed=2)
    with pytest.raises(ValueError, match="does not exist"):
        sf_eval_attn.attention_maps(ours, batch, layers=[3])
    assert sf_eval_attn.parse_layers("-2:") == slice(-2, None) and sf_eval_attn.parse_layers("all") is None
    a = sf_eval_attn.final_token_attention(ours, batch, sf_eval_attn.parse_layers("-2:"))
    b = sf_eval_attn.final_token_attention(ours, batch, [1, 2])
    assert torch.equal(a, b)
    for layer in ours.model.layers:                      # no hook left behind, also after the early stop
        assert not layer.self_attn._forward_pre_hooks


def _attn_forced(model, targets, grids):
    """Craft the tiny model + image features so that, in decoder layer 0, the last prompt token attends
    (almost) only to image token `targets[b]` of row b.

    u = a unit direction; every embedding row and every non-target image feature is made orthogonal to u,
    the target feature is 12 sqrt(D) u. Layer 0: k = 40 (x . u) on the LAST rotary pair of every kv head
    (rotation angle = pos * rope_theta^(-30/32), negligible) and zero elsewhere; q = a constant bias on the
    same dims. So score(t) = 0 for every key except the target, whose score is ~ 40 * 4 * 12 / sqrt(32).
    """
    D = model.cfg.hidden_size
    g = torch.Generator().manual_seed(5)
    u = torch.randn(D, generator=g)
    u /= u.norm()
    att = model.model.layers[0].self_attn
    ln = model.model.layers[0].input_layernorm
    d, Hk, H = att.d, att.Hk, att.H
    n_img = sum(t * h * w // 4 for t, h, w in grids)
    feats = torch.randn(n_img, D, generator=g)
    with torch.no_grad():
        ln.weight.fill_(1.0)
        E = model.model.embed_tokens.weight
        E -= (E @ u)[:, None] * u[None, :]                                     # embeddings orthogonal to u
        feats -= (feats @ u)[:, None] * u[None, :]
        offset = 0
        for (t, gh, gw), j in zip(grids, targets):
            feats[offset + j] = 12 * math.sqrt(D) * u
            offset += t * gh * gw // 4
        att.k_proj.weight.zero_(), att.k_proj.bias.zero_(), att.q_proj.weight.zero_(), att.q_proj.bias.zero_()
        for h in range(Hk):
            att.k_proj.weight[h * d + d // 2 - 1] = 40 * u                     # dims d/2-1 and d-1 = the slowest pair
        for h in range(H):
            att.q_proj.bias[h * d + d // 2 - 1] = 4.0
    model.encode_images = lambda pixel_values, grid_thw: feats                 # the crafted "vision tower"
    return feats


def test_attn_forced_attention_lands_on_the_right_cell(tmp_path):
    """Mass forced onto one image token per row -> the map's mass sits on that (r, c) cell; the real forward
    agrees (layer 0's attention output equals o_proj(v_target)); the heatmap lights that cell only."""
    model, tok = sf.load("tiny")
    imgs = [Image.new("RGB", (140, 84), (200, 150, 120)), Image.new("RGB", (112, 112), (90, 60, 40))]
    batch = sf.make_batch(tok, imgs, ["Where is the lesion?", "Diagnosis?"], max_pixels=140 * 112)
    grids = batch["image_grid_thw"].tolist()
    assert grids == [[1, 6, 10], [1, 8, 8]]                                    # merged 3 x 5 and 4 x 4
    targets = [7, 14]                                                          # (1, 2) of 3 x 5; (3, 2) of 4 x 4
    feats = _attn_forced(model, targets, grids)
    maps = sf_eval_attn.attention_maps(model, batch, layers=[0])
    for m, j, (t, gh, gw) in zip(maps, targets, grids):
        r, c = divmod(j, gw // 2)
        assert float(m[r, c]) > 0.99, m
        assert float(m.sum() - m[r, c]) < 0.01
    # the real layer (sdpa) does what the map says: its output at the last position is o_proj(v(target))
    att = model.model.layers[0].self_attn
    seen = {}
    h = att.register_forward_hook(lambda mod, a, out: seen.update(o=out[:, -1]))   # returns None: output kept
    model.hidden_states(**batch)
    h.remove()
    tgt = torch.stack([feats[targets[0]], feats[15 + targets[1]]])             # row 1's image starts at 15
    v = att.v_proj(model.model.layers[0].input_layernorm(tgt))                  # [2, Hk d]
    v = v.view(2, att.Hk, att.d).repeat_interleave(att.H // att.Hk, dim=1).reshape(2, -1)   # [2, H d] (GQA)
    assert torch.allclose(seen["o"], att.o_proj(v), atol=1e-3)
    # heatmap: only the target cell's rectangle changes colour (NEAREST upsampling, cold cells untouched)
    out = sf_eval_attn.draw_heatmap(imgs[0], maps[0], tmp_path / "h.png")
    got = np.asarray(Image.open(out).convert("RGB")).astype(int)
    orig = np.asarray(imgs[0]).astype(int)
    changed = np.abs(got - orig).sum(-1) > 6                                   # [84, 140]
    ys, xs = np.nonzero(changed)
    # cell (1, 2) of a 3 x 5 grid on a 140 x 84 photo: x in [56, 84), y in [28, 56)
    assert ys.min() >= 27 and ys.max() <= 56 and xs.min() >= 55 and xs.max() <= 84
    assert changed[30:54, 58:82].all()


def test_attn_heatmap_png_has_image_size(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (97, 151, 3), dtype=np.uint8))  # odd size, not a multiple of 28
    grid = torch.rand(3, 5, generator=torch.Generator().manual_seed(1))
    for smooth in (False, True):
        p = sf_eval_attn.draw_heatmap(img, grid, tmp_path / f"h{smooth}.png", smooth=smooth)
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (151, 97) and im.mode == "RGB"
    # colour map: ends of the ramp, monotone brightness
    cm = sf_eval_attn.colormap(np.array([0.0, 0.5, 1.0]))
    assert cm[0].tolist() == [0, 0, 4] and cm[2].tolist() == [252, 255, 164]
    assert np.all(np.diff(sf_eval_attn.colormap(np.linspace(0, 1, 50)).astype(int).sum(-1)) >= 0)
    with pytest.raises(ValueError):
        sf_eval_attn.draw_heatmap(img, -grid, tmp_path / "bad.png")


def test_attn_lesion_focus_hand_computed():
    # 4 x 4 mask, lesion = the top-left 2 x 2 block -> exactly cell (0, 0) of a 2 x 2 grid
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    M = np.array([[0.5, 0.25], [0.125, 0.125]])
    assert sf_eval_attn.lesion_focus(M, mask) == pytest.approx(0.5)
    assert sf_eval_attn.lesion_focus(M * 0.2, mask) == pytest.approx(0.5)     # only ratios matter
    assert sf_eval_attn.lesion_focus(np.ones((2, 2)), mask) == pytest.approx(sf_eval_attn.lesion_area(mask)) == 0.25
    # 3 x 3 mask on a 2 x 2 grid: cells are 1.5 px wide. Centre pixel -> 0.25 / 2.25 = 1/9 of every cell
    centre = np.zeros((3, 3), bool)
    centre[1, 1] = True
    np.testing.assert_allclose(sf_eval_attn.mask_to_grid(centre, (2, 2)), np.full((2, 2), 1 / 9))
    corner = np.zeros((3, 3), bool)
    corner[0, 0] = True                                                       # 1 px^2 inside cell (0, 0) only
    np.testing.assert_allclose(sf_eval_attn.mask_to_grid(corner, (2, 2)), [[1 / 2.25, 0], [0, 0]])
    assert sf_eval_attn.lesion_focus(np.array([[1.0, 0], [0, 3.0]]), corner) == pytest.approx((1 / 2.25) / 4)
    assert math.isnan(sf_eval_attn.lesion_focus(np.zeros((2, 2)), mask))
    with pytest.raises(ValueError):
        sf_eval_attn.lesion_focus(np.array([[-1.0, 2.0]]), mask)


def test_attn_mask_to_grid_equals_supersampled_box_average():
    """Independent oracle: blow each pixel up into lh x lw sub-pixels (np.kron), then the cells fall on
    sub-pixel edges and plain block means give the exact area fractions."""
    rng = np.random.default_rng(4)
    for H, W, lh, lw in [(7, 5, 3, 2), (112, 90, 4, 5), (31, 64, 6, 8)]:
        mask = rng.random((H, W)) < 0.3
        big = np.kron(mask.astype(float), np.ones((lh, lw)))                 # [H lh, W lw]
        ref = big.reshape(lh, H, lw, W).mean(axis=(1, 3))
        got = sf_eval_attn.mask_to_grid(mask, (lh, lw))
        np.testing.assert_allclose(got, ref, atol=1e-12)
        assert got.mean() == pytest.approx(mask.mean())                      # uniform attention = area fraction


def test_attn_lesion_focus_summary_and_markdown():
    rows = [{"lesion_focus": 0.5, "lesion_area": 0.2, "image_attention": 0.3},
            {"lesion_focus": 0.3, "lesion_area": 0.1, "image_attention": 0.1},
            {"lesion_focus": None, "lesion_area": None, "image_attention": None}]
    s = sf_eval_attn.lesion_focus_summary(rows, n_boot=200)
    assert s["n"] == 2 and s["focus"] == pytest.approx(0.4) and s["chance"] == pytest.approx(0.15)
    assert s["lift"] == pytest.approx(0.25) and s["lift_ci95"] == pytest.approx([0.2, 0.3])
    assert s["image_attention"] == pytest.approx(0.2)
    text = "\n".join(sf_eval_attn.render_lesion_focus(s))
    assert "| 40.0 |" in text and "| 15.0 |" in text and "| 25.0 |" in text
    assert sf_eval_attn.lesion_focus_summary(rows[2:]) is None and sf_eval_attn.render_lesion_focus(None) == []


def _attn_run(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = sf.main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_attn_diagnose_cli_tiny_end_to_end(tmp_path):
    """skinflow.py diagnose on the tiny preset: caption with the 8 fields, a differential block, heatmap PNG
    of the photo's size, and the base-model warning."""
    import data

    rng = np.random.default_rng(1)
    path = tmp_path / "lesion.jpg"
    Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)).save(path)
    heat = tmp_path / "heat.png"
    rc, out, err = _attn_run(["diagnose", str(path), "--model", "tiny", "--heatmap", str(heat),
                              "--max-new-tokens", "6", "--max-pixels", str(112 * 112)])
    assert rc == 0, err
    assert "Stage I caption" in out and "Stage II differential" in out
    for field in data.CAPTION_FIELDS:
        assert f"  {field}: " in out
    assert "this is the base model" in err
    with Image.open(heat) as im:
        assert im.size == (130, 90)


def test_attn_diagnose_bad_files_one_line_exit_2(tmp_path):
    good = tmp_path / "ok.png"
    Image.new("RGB", (64, 64), (120, 80, 60)).save(good)
    raw = good.read_bytes()
    cases = {"missing": tmp_path / "nope.jpg", "dir": tmp_path}
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    (tmp_path / "truncated.png").write_bytes(raw[: len(raw) // 2])
    cases["garbage"], cases["truncated"] = tmp_path / "garbage.png", tmp_path / "truncated.png"
    for kind, p in cases.items():
        rc, out, err = _attn_run(["diagnose", str(p), "--model", "tiny"])
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and str(p) in lines[0], (kind, err)
        assert out == ""
    rc, _, err = _attn_run(["diagnose", str(good)])                           # neither --model nor --ckpt
    assert rc == 2 and len(err.strip().splitlines()) == 1


def test_attn_ckpt_exported_dir_and_rl_deltas(tmp_path):
    """--ckpt: (a) an exported model folder (rl.py <out>/<stage>/model) is used as is, no warning;
    (b) an rl.py checkpoint.safetensors ("param/<name>" LoRA tensors + TrainConfig metadata) re-applied
    to the base gives the same logits as the trained model."""
    import rl
    from safetensors.torch import save_file

    # (a) run folder layout <run>/stage1/model
    base, tok = sf.load("tiny", seed=0)
    trained, _ = sf.load("tiny", seed=7)                                       # "fine-tuned" = other weights
    export = tmp_path / "run" / "stage1" / "model"
    trained.save_pretrained(export)
    tok.save(export)
    m, _, what = sf_eval_attn.load_for_diagnose(None, str(tmp_path / "run"))
    assert "fine-tuned" in what
    ids = torch.randint(0, 700, (1, 9), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(m(ids), trained(ids))
    img = tmp_path / "x.png"
    Image.new("RGB", (56, 56), (150, 90, 80)).save(img)
    rc, out, err = _attn_run(["diagnose", str(img), "--ckpt", str(tmp_path / "run"), "--max-new-tokens", "3"])
    assert rc == 0 and "base model" not in err and "fine-tuned" in out
    # (b) deltas only
    rl.apply_lora(base, rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(3)
    params = {}
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
                params["param/" + n] = p.detach().clone()
    cfg = {"stage": "stage1", "train": "lora", "lora_rank": 4, "lora_alpha": 8.0, "dve": False}
    (tmp_path / "run2" / "stage1").mkdir(parents=True)
    save_file(params, str(tmp_path / "run2" / "stage1" / "checkpoint.safetensors"),
              metadata={"config": json.dumps(cfg), "step": "5"})
    m2, _, what2 = sf_eval_attn.load_for_diagnose("tiny", str(tmp_path / "run2"))
    assert "deltas" in what2
    assert torch.allclose(m2(ids), base(ids), atol=1e-6)
    assert not torch.allclose(m2(ids), sf.load("tiny")[0](ids), atol=1e-3)  # the deltas did change it
    with pytest.raises(sf_eval_attn.DiagnoseError, match="base model"):
        sf_eval_attn.load_for_diagnose(None, str(tmp_path / "run2"))


def test_attn_eval_report_has_lesion_focus(tmp_path):
    """eval.py --model on SynthDerm writes the lesion-focus block into metrics.json and report.md."""
    out = tmp_path / "ev"
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        rc = sf_eval_attn.main(["--model", "tiny", "--data", "synthderm", "--n", "3", "--batch-size", "2",
                                "--max-new-tokens", "4", "--image-size", "112", "--max-pixels", str(112 * 112),
                                "--bootstrap", "50", "--attn-layers=-2:", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())["lesion_focus"]
    assert m["n"] == 3 and 0 <= m["focus"] <= 1 and 0 < m["chance"] < 1 and m["layers"] == "-2:"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(0 <= r["lesion_focus"] <= 1 for r in rows)
    assert "Lesion focus" in (out / "report.md").read_text()
