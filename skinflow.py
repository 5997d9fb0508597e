"""skinflow.py: the Qwen2.5-VL backbone of SkinFlow (arXiv 2601.09136), written from scratch.

SkinFlow starts from Qwen2.5-VL-3B/7B-Instruct, swaps some vision MLP layers for the dynamic vision encoder
(dve.py; the paper's "Virtual-Width Dynamic Vision Encoder") and trains with two-stage GRPO (rl.py; the
paper's Stage I / Stage II RL). This file is the foundation everything else stands on, in raw PyTorch (no
`transformers` at run time), and it imports NO project module (issue 14: the import floors are
skinflow.py, data.py < dve.py < eval.py < rl.py < bench.py; test_skinflow.py checks them with `ast`).
The backbone reads in forward order. Sections (the numbered banners below, top to bottom):

  -  csrc/ kernels (unnumbered) `build_extension`, the first-use self-checks (`extension_ok`)
  1. `Config` / `VisionConfig` the Hub config.json (flat Hub file or nested transformers-5.x file), presets
  2. `preprocess_image`        smart_resize + bicubic + CLIP normalisation + 2x2-block-major patches
  3. building blocks           RMSNorm, `LoRALinear` + `apply_lora` (every loader rebuilds adapters), RoPE, SwiGLU
  4. `VisionTower`             Conv3d patch embed (as a matmul), 2-D RoPE, window attention, PatchMerger
  5. `TextModel`               Qwen2 decoder: GQA with q/k/v bias, M-RoPE (3-D positions), RMSNorm, SwiGLU
  6. `VLM`                     the two glued together: forward, KV-cache generation, Hub loading/saving
                               (`from_pretrained(convert=...)`: dve.py hands in its DVE rebuild)
  7. `Tokenizer`               byte-level BPE from tokenizer.json (pure Python); the tiny preset's corpus
  8. chat template, batching   `chat_prompt_ids`, `make_batch`
  9. `load`                    one name in, (model, tokenizer) out. The command line that used to live
                               here is `python eval.py generate|diagnose` (it needs data.py and dve.py).

Which loader to call: `dve.load(...)` (the one checkpoint loader every entry point uses; it passes the DVE
hook to `load` below). `skinflow.load` alone loads presets and plain (non-DVE) checkpoints.

Every part is checked against an independent oracle in test_skinflow.py (transformers' Qwen2.5-VL for
logits and pixels, HF `tokenizers` for token ids). Shapes use: B batch, T tokens, D width, H heads,
Hk key/value heads, d head width, N vision patches, M merged vision tokens (= N / 4).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------------
# Custom kernels (csrc/)
#
# Every kernel ships as a pair with the same entry points: csrc/NAME.cpp (the C++ CPU twin, which also
# holds the Python binding) and csrc/NAME_cuda.cu (the GPU version). On a CPU-only torch we compile the
# .cpp alone; with CUDA we add the .cu and define WITH_CUDA so the .cpp dispatches on the tensor's device.
# This is why CI (no GPU) still compiles and tests the same functions the GPU uses.
# ---------------------------------------------------------------------------------------------------
_EXTENSIONS: dict[str, object] = {}
EXTENSION_ERRORS: dict[str, str] = {}  # name -> why it could not be built (shown by "ext" callers)


def build_extension(name: str, verbose: bool = False):
    """Compile (once per process, cached on disk by torch) and import csrc/NAME.cpp [+ NAME_cuda.cu].

    Returns the module, or None when the build is switched off (SKINFLOW_NO_EXT=1) or fails; the reason
    is kept in EXTENSION_ERRORS[name] so callers that insist on the extension can raise a clear error.
    """
    if name in _EXTENSIONS:
        return _EXTENSIONS[name]
    module = None
    if os.environ.get("SKINFLOW_NO_EXT", "") not in ("", "0"):
        EXTENSION_ERRORS[name] = "disabled by SKINFLOW_NO_EXT"
    else:
        try:
            import torch
            from torch.utils import cpp_extension

            sources = [str(HERE / "csrc" / f"{name}.cpp")]
            flags = ["-O3"]
            cuda_src = HERE / "csrc" / f"{name}_cuda.cu"
            # Only a CUDA build of torch with a visible GPU can compile and run the .cu half.
            with_cuda = torch.cuda.is_available() and torch.version.cuda is not None and cuda_src.exists()
            if with_cuda:
                sources.append(str(cuda_src))
                flags.append("-DWITH_CUDA")
            build_dir = Path(os.environ.get("SKINFLOW_EXT_DIR", Path.home() / ".cache" / "skinflow" / "ext"))
            build_dir = build_dir / f"{name}_{'cuda' if with_cuda else 'cpu'}"
            build_dir.mkdir(parents=True, exist_ok=True)
            module = cpp_extension.load(
                name=f"skinflow_{name}_{'cuda' if with_cuda else 'cpu'}",
                sources=sources,
                extra_cflags=flags,
                extra_cuda_cflags=["-O3", "-DWITH_CUDA", "--use_fast_math"] if with_cuda else None,
                build_directory=str(build_dir),
                verbose=verbose,
            )
        except Exception as exc:  # a missing compiler or ninja must never break the PyTorch path
            EXTENSION_ERRORS[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            module = None
    _EXTENSIONS[name] = module
    return module


# ---------------------------------------------------------------------------------------------------
# Kernels check themselves on first use (issue 15)
#
# A compiled kernel can be wrong on a machine we never tested (another GPU architecture, another compiler,
# --use_fast_math): the first time an op runs on a device in this process, `extension_ok(name, device)`
# compares it with the PyTorch path on a small random input ON THAT DEVICE, forward AND backward (the check
# functions live next to each op: rl._check_logprob, dve._check_fdlinear). On a mismatch it warns once
# with the numbers and returns False from then on, so the caller falls back to PyTorch for the rest of the
# run; rl.py writes every check's outcome into the stage's log.jsonl ("ext_check"). The CPU twin goes
# through the same machinery, so CI exercises it. SKINFLOW_EXT_CHECK=0 skips the checks (the op is trusted).
# ---------------------------------------------------------------------------------------------------
EXT_CHECKS: dict[str, dict] = {}  # "name/device type" -> {"ok", "max_err", "tol", "what"} of the first use
_EXT_CHECK_FNS: dict[str, object] = {}  # name -> fn(ext, device) -> {"max_err": float, "tol": float, "what": str}


def register_extension_check(name: str, fn) -> None:
    """Register the self-check of the csrc op `name`: fn(ext, device) runs the op and the PyTorch path on a
    small random input and returns {"max_err": worst |op - torch| over outputs and gradients, "tol": ...,
    "what": which output was worst}."""
    _EXT_CHECK_FNS[name] = fn


def worst_check(found) -> dict:
    """[(err / tol, err, tol, what), ...] of a self-check -> the worst one as {"max_err", "tol", "what"}."""
    _, err, tol, what = max(found, key=lambda t: t[0])
    return {"max_err": err, "tol": tol, "what": what}


def extension_ok(name: str, device, ext=None) -> bool:
    """True if the op `name` may be used on `device`: its self-check passed (run now if this is its first
    use on that device type), or SKINFLOW_EXT_CHECK=0, or no check is registered. False after a mismatch
    (warned once; callers then take their PyTorch path) or if the check itself crashed."""
    if os.environ.get("SKINFLOW_EXT_CHECK", "1") == "0":
        return True
    dev = torch.device(device)
    key = f"{name}/{dev.type}"
    if key in EXT_CHECKS:
        return EXT_CHECKS[key]["ok"]
    fn = _EXT_CHECK_FNS.get(name)
    if fn is None:
        return True
    ext = ext if ext is not None else build_extension(name)
    try:
        with torch.enable_grad():  # the first use may sit inside torch.no_grad() (a rollout); the check needs autograd
            res = dict(fn(ext, dev))
        res["ok"] = bool(res["max_err"] <= res["tol"])  # NaN fails too
    except Exception as exc:  # a kernel that crashes on a tiny input is as untrustworthy as a wrong one
        res = {"ok": False, "max_err": float("nan"), "tol": float("nan"), "what": f"{type(exc).__name__}: {exc}"}
    EXT_CHECKS[key] = res
    if not res["ok"]:
        import warnings

        warnings.warn(f"[skinflow] csrc/{name} on {dev.type} disagrees with the PyTorch path on its first-use check "
                      f"(max |err| {res['max_err']:.3g} > tol {res['tol']:.3g}, worst: {res['what']}); using "
                      "PyTorch for the rest of this run. Rebuild the extension, or set SKINFLOW_EXT_CHECK=0 "
                      "to trust it anyway.", RuntimeWarning, stacklevel=2)
    return res["ok"]

# ===================================================================================================
# 1. Configuration
#
# A Hub config.json comes in two shapes. The official Qwen2.5-VL files are FLAT: the text fields sit at
# the top level next to "vision_config", and M-RoPE is described by rope_scaling={"type":"mrope",...}.
# transformers 5.x writes a NESTED file: the text fields move into "text_config" and rope_scaling becomes
# rope_parameters={"rope_theta":..., "mrope_section":[...]}. We read both, and always write the flat shape
# (it is what the Hub repos contain, and transformers reads it too).
# ===================================================================================================
@dataclass
class VisionConfig:
    """The ViT (vision tower) hyper-parameters. Defaults are Qwen2.5-VL-3B/7B's (only out_hidden_size differs)."""

    depth: int = 32                      # number of ViT blocks
    hidden_size: int = 1280              # ViT width
    num_heads: int = 16                  # ViT head width = 1280 / 16 = 80
    intermediate_size: int = 3420        # SwiGLU hidden width
    patch_size: int = 14                 # a patch is 14 x 14 pixels
    temporal_patch_size: int = 2         # a still image is repeated to 2 frames
    spatial_merge_size: int = 2          # 2 x 2 patches -> one LLM token
    window_size: int = 112               # window edge in PIXELS (112 px = 8 patches = 4 merged tokens)
    fullatt_block_indexes: tuple = (7, 15, 23, 31)   # blocks with whole-image attention
    in_channels: int = 3
    out_hidden_size: int = 2048          # = the LLM width (3B: 2048, 7B: 3584)
    rope_theta: float = 10000.0          # not in the Hub file; hard-coded in the reference
    tokens_per_second: int = 2           # video only; kept so configs round-trip

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# Qwen2/2.5 special tokens in their canonical order; in the real vocab they have ids 151643.. 151664.
# The tiny tokenizer appends them in the same order after its own BPE vocab.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
QWEN_ADDED_TOKENS = (  # "added" but not "special" in Qwen's tokenizer.json (still split out before BPE)
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
TINY_BPE_SIZE = 744          # byte-level BPE entries of the tiny tokenizer: 256 bytes + 488 merges
TINY_VOCAB_SIZE = 768        # embedding rows: 744 BPE + 22 Qwen specials + 2 alignment rows (like Qwen's padding)


def _special_id(first_id: int, token: str) -> int:
    """Id of a Qwen special token when the specials start at `first_id` (151643 in the real vocab)."""
    return first_id + (QWEN_SPECIAL_TOKENS + QWEN_ADDED_TOKENS).index(token)


@dataclass
class Config:
    """Text-decoder hyper-parameters + special token ids + the nested `vision` config.

    Defaults are Qwen2.5-VL-3B-Instruct's. `dve` is SkinFlow's own section (dve.apply_dve records it), so a
    checkpoint with FDLinear layers rebuilds them before its weights are loaded.
    """

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple = (16, 24, 24)   # frequency pairs driven by the (t, h, w) axes; sums to head_dim / 2
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = True
    bos_token_id: int = 151643
    eos_token_id: int = 151645            # <|im_end|>: generation stops here
    pad_token_id: int = 151643            # <|endoftext|>
    image_token_id: int = 151655          # <|image_pad|>
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision: VisionConfig = field(default_factory=VisionConfig)
    dve: dict | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ----------------------------------------------------------------------------------- parsing
    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Build from a Hub config dict, flat (Hub repos) or nested (transformers 5.x `text_config`)."""
        # Example flat (Hub) file:    {"hidden_size": 2048, "rope_scaling": {"type": "mrope", ...}, ...}
        # Example nested (5.x) file:  {"text_config": {"hidden_size": 2048, "rope_parameters": {...}}, ...}
        text = dict(d.get("text_config") or {})
        # nested files keep the token ids partly at top level, partly in text_config: merge, nested wins
        top = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
        t = {**top, **text}
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        section = rope.get("mrope_section")
        if section is None:
            raise ValueError("config.json has no mrope_section (in rope_scaling or rope_parameters): "
                             "this does not look like a Qwen2.5-VL config")
        theta = t.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
        eos = t.get("eos_token_id", 151645)
        if isinstance(eos, list):  # generation configs list several stop ids; the chat stop is <|im_end|>
            eos = eos[0]
        v = dict(d.get("vision_config") or {})
        vrope = v.get("rope_parameters") or {}
        vis = VisionConfig(
            depth=v.get("depth", 32), hidden_size=v.get("hidden_size", 1280), num_heads=v.get("num_heads", 16),
            intermediate_size=v.get("intermediate_size", 3420), patch_size=v.get("patch_size", v.get("spatial_patch_size", 14)),
            temporal_patch_size=v.get("temporal_patch_size", 2), spatial_merge_size=v.get("spatial_merge_size", 2),
            window_size=v.get("window_size", 112), fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
            in_channels=v.get("in_channels", v.get("in_chans", 3)), out_hidden_size=v.get("out_hidden_size", t["hidden_size"]),
            rope_theta=float(vrope.get("rope_theta", 10000.0)), tokens_per_second=v.get("tokens_per_second", 2),
        )
        # tie_word_embeddings: top level in 5.x, inside text_config in some older saves
        tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        return cls(
            vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
            num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
            num_key_value_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)), rope_theta=float(theta), mrope_section=tuple(section),
            max_position_embeddings=t.get("max_position_embeddings", 128000), tie_word_embeddings=bool(tie),
            bos_token_id=t.get("bos_token_id", 151643), eos_token_id=eos, pad_token_id=t.get("pad_token_id") if t.get("pad_token_id") is not None else t.get("bos_token_id", 151643),
            image_token_id=t.get("image_token_id", 151655), video_token_id=t.get("video_token_id", 151656),
            vision_start_token_id=t.get("vision_start_token_id", 151652), vision_end_token_id=t.get("vision_end_token_id", 151653),
            vision=vis, dve=d.get("dve"),
        )

    @classmethod
    def from_file(cls, path) -> "Config":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        """The flat Hub layout (what Qwen/Qwen2.5-VL-*-Instruct/config.json looks like)."""
        v = self.vision
        d = {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": {"type": "mrope", "mrope_section": list(self.mrope_section)},
            "max_position_embeddings": self.max_position_embeddings, "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False, "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
            "vision_config": {
                "depth": v.depth, "hidden_size": v.hidden_size, "num_heads": v.num_heads, "hidden_act": "silu",
                "intermediate_size": v.intermediate_size, "patch_size": v.patch_size, "in_chans": v.in_channels,
                "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "out_hidden_size": v.out_hidden_size, "tokens_per_second": v.tokens_per_second,
            },
        }
        if self.dve is not None:
            d["dve"] = self.dve
        return d

    # ----------------------------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str) -> "Config":
        """"tiny" (random init, CPU in seconds), "3b" / "7b" (the Qwen2.5-VL-*-Instruct shapes).

        tiny: ViT depth 4, width 64, 2 heads, window 56 px (2x2 merged tokens), full attention in blocks 1, 3;
        decoder 4 layers, width 128, 4 heads / 2 kv heads (head_dim 32, mrope_section 4+6+6 = 16), SwiGLU 256;
        vocab 768 from the project's own tiny tokenizer (`Tokenizer.tiny()`), head tied like the 3B.
        A 112 x 112 image is 8 x 8 patches -> 16 merged tokens -> 4 windows.
        """
        name = name.lower()
        if name in ("3b", "qwen/qwen2.5-vl-3b-instruct"):
            return cls()  # the defaults are the 3B's
        if name in ("7b", "qwen/qwen2.5-vl-7b-instruct"):
            return cls(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                       vision=VisionConfig(out_hidden_size=3584))
        if name == "tiny":
            s = lambda tok: _special_id(TINY_BPE_SIZE, tok)  # noqa: E731 - ids follow the tiny BPE vocab
            return cls(vocab_size=TINY_VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, mrope_section=(4, 6, 6),
                       max_position_embeddings=4096, tie_word_embeddings=True,
                       bos_token_id=s("<|endoftext|>"), eos_token_id=s("<|im_end|>"), pad_token_id=s("<|endoftext|>"),
                       image_token_id=s("<|image_pad|>"), video_token_id=s("<|video_pad|>"),
                       vision_start_token_id=s("<|vision_start|>"), vision_end_token_id=s("<|vision_end|>"),
                       vision=VisionConfig(depth=4, hidden_size=64, num_heads=2, intermediate_size=128,
                                           window_size=56, fullatt_block_indexes=(1, 3), out_hidden_size=128))
        raise ValueError(f"unknown preset {name!r}: use 'tiny', '3b' or '7b'")


HUB_IDS = {"3b": "Qwen/Qwen2.5-VL-3B-Instruct", "7b": "Qwen/Qwen2.5-VL-7B-Instruct"}


# ===================================================================================================
# 2. Image preprocessing (the Qwen2-VL image processor, PIL backend)
# ===================================================================================================
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 4 * 28 * 28        # 3136: at least 4 LLM tokens (the Hub preprocessor_config value)
MAX_PIXELS = 1280 * 28 * 28     # 1,003,520: at most 1280 LLM tokens. The Hub file says 16384*28*28 (12.8 Mpx),
                                # which lets one photo cost 16k tokens; we pick the processor-class default.


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Pick (h', w'), both multiples of `factor` (= patch 14 x merge 2), close to (h, w) in aspect ratio:

        h' = round(h / F) F,  w' = round(w / F) F                              (Python round: ties to even)
        if h' w' > max:  b = sqrt(h w / max);  h' = max(F, floor(h / b / F) F);  w' likewise
        if h' w' < min:  b = sqrt(min / (h w)); h' = ceil(h b / F) F;            w' likewise
    """
    if min(height, width) < 1:
        raise ValueError(f"image has an empty side: {height} x {width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is above 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def preprocess_image(image, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                     patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2):
    """PIL image -> (pixel_values float32 [N, 3*2*14*14 = 1176], grid_thw (1, gh, gw)), N = gh*gw patches.

    x = (bicubic_resize(img) / 255 - mean_c) / std_c  (CLIP mean/std), then cut into 14x14 patches listed in
    2x2-block-major order (merge blocks in raster order, the 4 patches of a block in raster order) so that
    4 consecutive rows form one LLM token. Each row is flattened in (C, T, ph, pw) order with the still image
    repeated over T = 2 frames (what the video-capable Conv3d expects). Bit-exact with transformers'
    Qwen2VLImageProcessorPil (same float64 rescale then float32 normalisation).
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess_image wants a PIL.Image.Image, got {type(image).__name__}")
    # Numbers for a 300 x 450 photo: smart_resize -> 308 x 448, i.e. 22 x 32 patches (N = 704 rows),
    # 11 x 16 merged tokens = 176 <|image_pad|> slots in the prompt.
    image = image.convert("RGB")  # drops alpha like the reference (no compositing onto white)
    factor = patch_size * merge_size
    h, w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    if (w, h) != image.size:
        image = image.resize((w, h), resample=Image.BICUBIC)
    arr = np.asarray(image).transpose(2, 0, 1)                        # [3, h, w] uint8
    arr = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)     # rescale in float64, store float32
    mean = np.array(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(CLIP_STD, dtype=np.float32)[:, None, None]
    arr = (arr - mean) / std                                          # [3, h, w] float32
    gh, gw, m, p = h // patch_size, w // patch_size, merge_size, patch_size
    x = arr.reshape(3, gh // m, m, p, gw // m, m, p)                  # [C, bh, mh, ph, bw, mw, pw]
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)                              # [bh, bw, mh, mw, C, ph, pw]
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (temporal_patch_size,) + x.shape[5:])
    x = np.ascontiguousarray(x).reshape(gh * gw, 3 * temporal_patch_size * p * p)  # [N, 1176]
    return torch.from_numpy(x), (1, gh, gw)


# ===================================================================================================
# 3. Shared building blocks
# ===================================================================================================
class RMSNorm(nn.Module):
    """RMSNorm(x) = w * x / sqrt(mean(x^2) + eps).

    The statistics are taken in float32 and the normalised x is cast back to the input dtype BEFORE the
    multiplication by w (the reference's order; it matters for bf16 parity).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021) lives here, on the lowest import floor, because every LOADER needs it: a bf16 run
# exports its adapter unmerged (see `LoRALinear` and VLM.save_pretrained), so skinflow.load, eval.py,
# diagnose and rl.py --init must all rebuild the wrapper. rl.py (merge_lora, the optimizer) is what trains
# it; apply_lora, which adds the trainable adapters, sits below so that loaders need not import rl.py.
# ---------------------------------------------------------------------------------------------------
LORA_FILE = "lora.safetensors"  # the unmerged fp32 adapter next to model.safetensors (bf16 exports)


class LoRALinear(nn.Linear):
    """nn.Linear + low-rank deltas, all computed and ADDED in fp32:

        y = round_dtype( float(x W^T + b)  +  (x A0^T) B0^T  +  (alpha / r) (x A^T) B^T )

    * A [r, d_in], B [d_out, r]: the adapter being trained (fp32 parameters `lora_A`, `lora_B`; B = 0 at the
      start, so a fresh adapter is exactly the wrapped layer). `enabled = False` turns it off: that is the
      reference policy of GRPO (rl.reference_policy) with no second copy of the model.
    * A0, B0 (`start_A` [r0, d_in], `start_B` [d_out, r0], fp32 buffers, None if absent): an adapter LOADED
      with the checkpoint (a previous stage's export, scaling already folded into B0). It is part of the
      model this stage starts from, so it stays on when `enabled` is False, and it is never trained.

    Why fp32 for A, B, the adapter's matmuls and the add: in a bf16 model the update is tiny against the
    frozen output (Stage II at lr 5e-7 moves B by ~1e-4), and bf16 keeps 8 significant bits, so rounding
    delta to bf16 and then adding it to y in bf16 rounds twice; adding in fp32 rounds the SUM once. The
    bf16 activations still round the result: docs/gpu.md measures how much of the update survives, which is
    why the presets' LoRA learning rates are 10x the paper's full fine-tuning rates (see train.sh).
    Subclasses nn.Linear and keeps the base `weight` / `bias` under their own names, so the state-dict keys
    of the base weights stay Hub-shaped; rank 0 means "no trainable adapter" (a loaded model, say).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)  # skip nn.Linear.__init__: reuse the base tensors, allocate nothing
        if rank < 0:
            raise ValueError(f"LoRALinear: rank must be >= 0, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # not persistent: the state dict stays "base weights + trainable A, B"; save_pretrained writes the
        # start adapter (folded with the trained one) to LORA_FILE itself
        self.register_buffer("start_A", None, persistent=False)
        self.register_buffer("start_B", None, persistent=False)
        self.new_adapter(rank, alpha)

    def new_adapter(self, rank: int, alpha: float):
        """A fresh trainable adapter (A Kaiming-uniform like nn.Linear, B = 0 -> delta 0), replacing any
        previous trainable one; the start adapter is kept."""
        dev = self.weight.device
        self.rank, self.alpha, self.scaling = rank, alpha, (alpha / rank if rank else 0.0)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        if rank:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.enabled = True

    def set_start_adapter(self, A: torch.Tensor, B: torch.Tensor):
        """Install a loaded adapter (delta = B @ A, scaling folded in) as the frozen start, in fp32."""
        if A.shape[1] != self.in_features or B.shape[0] != self.out_features or A.shape[0] != B.shape[1]:
            raise ValueError(f"adapter A {tuple(A.shape)} / B {tuple(B.shape)} does not fit a "
                             f"{self.out_features} x {self.in_features} layer")
        dev = self.weight.device
        self.start_A = A.detach().to(device=dev, dtype=torch.float32).contiguous()  # [r0, d_in]
        self.start_B = B.detach().to(device=dev, dtype=torch.float32).contiguous()  # [d_out, r0]

    def _apply(self, fn, *args, **kwargs):
        # model.to(torch.bfloat16) must not round the adapter (casting back afterwards would be too late:
        # the low bits are gone). So the adapter tensors are taken out while nn.Module applies fn to the
        # base weights, then moved by fn themselves, except that a cast to a narrower float is refused
        # (they follow fn's device only). They are re-inserted in place: parameter order and identity
        # (what an optimizer holds) are unchanged.
        def keep(new, old):
            narrower = new.dtype in (torch.bfloat16, torch.float16) and old.dtype not in (torch.bfloat16, torch.float16)
            return old.to(new.device) if narrower else new

        params = {n: self._parameters.pop(n) for n in ("lora_A", "lora_B")}
        buffers = {n: self._buffers.pop(n) for n in ("start_A", "start_B")}
        try:
            super()._apply(fn, *args, **kwargs)
        finally:
            self._parameters.update(params)
            self._buffers.update(buffers)
        with torch.no_grad():
            for p in params.values():
                p.data = keep(fn(p.data), p.data)
            for n, b in buffers.items():
                if b is not None:
                    self._buffers[n] = keep(fn(b), b)
        return self

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The adapters' output change for input x [..., d_in] -> [..., d_out] in fp32 (None if none is on)."""
        x32 = x.to(self.lora_A.dtype)  # [..., d_in] fp32 (fp64 when a test made the adapter fp64)
        d = None
        if self.start_A is not None:
            d = F.linear(F.linear(x32, self.start_A.to(x32.dtype)), self.start_B.to(x32.dtype))  # [..., d_out]
        if self.enabled and self.rank:
            t = self.scaling * F.linear(F.linear(x32, self.lora_A), self.lora_B)  # [..., d_out]
            d = t if d is None else d + t
        return d

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # [..., d_out] frozen path, in the model dtype
        d = self.delta(x)
        if d is None:
            return y
        return (y.to(d.dtype) + d).to(y.dtype)  # ONE rounding of the sum into the model dtype

    def export_adapter(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A_exp [R, d_in], B_exp [d_out, R]) fp32 with B_exp @ A_exp = B0 A0 + (alpha / r) B A: the start
        adapter and the trained one (when enabled) stacked along the rank, scaling folded into B."""
        As, Bs = [], []
        if self.start_A is not None:
            As.append(self.start_A.float())
            Bs.append(self.start_B.float())
        if self.enabled and self.rank:
            As.append(self.lora_A.detach().float())
            Bs.append(self.scaling * self.lora_B.detach().float())
        if not As:
            return None
        return torch.cat(As, 0), torch.cat(Bs, 1)

    def merged_weight(self) -> torch.Tensor:
        """W' = W + B0 A0 + (alpha / r) B A, summed in fp32, returned in W's dtype (fp32 exports merge)."""
        W = self.weight.float()
        ad = self.export_adapter()
        if ad is not None:
            W = W + ad[1] @ ad[0]
        return W.to(self.weight.dtype)

    def extra_repr(self):
        r0 = 0 if self.start_A is None else self.start_A.shape[0]
        return f"{self.in_features} -> {self.out_features}, rank={self.rank}, alpha={self.alpha}, start_rank={r0}"


def lora_state(model) -> dict:
    """{"<module>.lora_A": A_exp, "<module>.lora_B": B_exp} (fp32, see LoRALinear.export_adapter) of every
    adapter of the model: what VLM.save_pretrained writes to LORA_FILE."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            ad = m.export_adapter()
            if ad is not None:
                out[f"{name}.lora_A"], out[f"{name}.lora_B"] = (t.contiguous().cpu() for t in ad)
    return out


def attach_lora_state(model, tensors: dict) -> int:
    """Wrap each named layer in a LoRALinear whose START adapter is the saved one (rank-0 trainable part).
    Inverse of lora_state; returns the number of layers. Unknown or unpaired names are an error."""
    mods = {k.rsplit(".", 1)[0] for k in tensors}
    for mod_name in sorted(mods):
        A, B = tensors.get(f"{mod_name}.lora_A"), tensors.get(f"{mod_name}.lora_B")
        if A is None or B is None:
            raise KeyError(f"{LORA_FILE}: {mod_name} needs both lora_A and lora_B")
        parent_name, _, attr = mod_name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            lin = getattr(parent, attr)
        except AttributeError as e:
            raise KeyError(f"{LORA_FILE}: the model has no layer {mod_name}") from e
        if not isinstance(lin, LoRALinear):
            if not isinstance(lin, nn.Linear):
                raise KeyError(f"{LORA_FILE}: {mod_name} is a {type(lin).__name__}, not a Linear")
            lin = LoRALinear(lin, 0, 1.0)
            setattr(parent, attr, lin)
        lin.set_start_adapter(A, B)
    return len(mods)


# The LoRA targets: every projection of the LANGUAGE model (attention q/k/v/o and the SwiGLU MLP).
# apply_lora is rl.py's tool for training, but it lives here with LoRALinear (issue 14) so that the one
# checkpoint loader (dve.load_with_deltas, an rl.py deltas checkpoint) can rebuild the adapters of a
# LoRA run without importing rl.py; rl.apply_lora is this function.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
                if isinstance(lin, LoRALinear):
                    if lin.rank:
                        continue  # already has a trainable adapter (apply_lora ran twice): leave it
                    # a layer loaded with an exported adapter (rank 0, start adapter on): that adapter stays
                    # the frozen start of this stage, and a fresh trainable one is added on top
                    lin.new_adapter(rank, alpha)
                    wrapped = lin
                elif isinstance(lin, nn.Linear):
                    wrapped = LoRALinear(lin, rank, alpha)
                    setattr(parent, name, wrapped)
                else:
                    continue
                n_layers += 1
                n_params += wrapped.lora_A.numel() + wrapped.lora_B.numel()
    return {"layers": n_layers, "params": n_params}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """rotate_half([a, b]) = [-b, a] over the last dim: pairs dim j with dim j + d/2 (the "NeoX" RoPE layout)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: x' = x * cos(theta) + rotate_half(x) * sin(theta), i.e. each pair (x_j, x_{j+d/2}) is rotated by
    the angle theta_j = position * inv_freq_j (inv_freq_j = base^(-2j/d))."""
    return x * cos + rotate_half(x) * sin


class SwiGLU(nn.Module):
    """MLP(x) = down( silu(gate(x)) * up(x) ),  silu(z) = z * sigmoid(z).

    `cu_seqlens` is forwarded to linears that ask for it (`takes_cu_seqlens`): this is the hook where
    dve.FDLinear (paper: the DVE) computes per-image frequency gates.
    """

    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    @staticmethod
    def _call(layer, x, cu_seqlens):
        if cu_seqlens is not None and getattr(layer, "takes_cu_seqlens", False):
            return layer(x, cu_seqlens)
        return layer(x)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        g = self._call(self.gate_proj, x, cu_seqlens)
        u = self._call(self.up_proj, x, cu_seqlens)
        return self._call(self.down_proj, F.silu(g) * u, cu_seqlens)


# All attention goes through torch's scaled_dot_product_attention, which picks a fused kernel (flash /
# memory-efficient on GPU, a blocked kernel on CPU) and never materialises the softmax when it can avoid it.
def _sdpa_gqa(q, k, v, mask):
    """softmax(q k^T / sqrt(d) + mask) v with Hk < H key/value heads shared by H/Hk query heads (GQA).

    q [B, H, Tq, d]; k, v [B, Hk, Tk, d]; mask bool [B, 1, Tq, Tk] (True = may attend) or None.
    """
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        try:  # torch >= 2.5 broadcasts the kv heads inside the kernel (no copy of the cache)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        except TypeError:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ===================================================================================================
# 4. Vision tower (Qwen2.5-VL ViT, the paper's encoder before DVE)
#
# Worked example of the window order (window_size 56 px -> ws = 2 merged tokens, one image whose merged
# grid is lh x lw = 3 x 5, merged tokens numbered in raster order):
#
#     0  1 |  2  3 |  4          windows in raster order: [0 1 5 6] [2 3 7 8] [4 9]
#     5  6 |  7  8 |  9                                   [10 11] [12 13] [14]
#    ---------------------       window_index = 0 1 5 6 2 3 7 8 4 9 10 11 12 13 14
#    10 11 | 12 13 | 14          window sizes (merged) = 4 4 2 2 2 1  -> x4 patches each
#
# The edge windows are smaller (no padding ever enters attention). In the 3B/7B model ws = 4, so a full
# window is 16 merged tokens = 64 patches; 4 of the 32 blocks instead attend over the whole image.
# ===================================================================================================
class VisionPlan:
    """Everything about the image GEOMETRY that the 32 ViT blocks share, computed once per batch of images.

    * window_index [M]: a permutation of the merged tokens that lists them window by window. Windows tile
      each image's merged grid (lh x lw, lh = gh/2) in raster order with edge ws = window_size/patch/merge
      (4 for Qwen2.5-VL); edge windows are simply smaller; inside a window tokens stay in raster order.
    * segments for attention: in window blocks one segment per window, in full blocks one per image
      (attention NEVER crosses images). Both are stored as a padded gather plan (see `_SegmentBatch`).
    * cu_seqlens [n_img + 1] int32: per-image cumulative patch counts (the DVE hook's argument). Valid in the
      window order too, because the permutation never moves a patch out of its image's contiguous range.
    * rotary cos/sin [N, d] in float32, permuted like the patches.
    """

    def __init__(self, grid_thw: torch.Tensor, vcfg: VisionConfig, device):
        m = vcfg.spatial_merge_size
        ws = vcfg.window_size // m // vcfg.patch_size          # window edge in merged tokens
        unit = m * m                                            # patches per merged token
        win_index, win_sizes, img_sizes, rows, cols = [], [], [], [], []
        offset = 0
        for t, gh, gw in grid_thw.tolist():
            lh, lw = gh // m, gw // m
            r = torch.arange(lh).view(-1, 1).expand(lh, lw)               # [lh, lw] merged row
            c = torch.arange(lw).view(1, -1).expand(lh, lw)               # [lh, lw] merged col
            nwc = -(-lw // ws)                                            # windows per row (ceil)
            wid = (r // ws) * nwc + (c // ws)                             # [lh, lw] window id of each token
            # stable order by (window id, raster position) == window by window, raster inside
            order = torch.argsort((wid * (lh * lw) + r * lw + c).flatten())          # [lh*lw]
            counts = torch.bincount(wid.flatten(), minlength=int(wid.max()) + 1)     # tokens per window
            for f in range(t):  # every frame of a video is windowed the same way (t = 1 for stills)
                win_index.append(order + offset + f * lh * lw)
                win_sizes.append(counts * unit)
            offset += t * lh * lw
            img_sizes.append(t * gh * gw)
            # (row, col) of each PATCH in 2x2-block-major order, the order preprocess_image emits
            rr = torch.arange(gh).view(lh, 1, m, 1).expand(lh, lw, m, m).flatten()    # [gh*gw]
            cc = torch.arange(gw).view(1, lw, 1, m).expand(lh, lw, m, m).flatten()    # [gh*gw]
            rows.append(rr.repeat(t))
            cols.append(cc.repeat(t))
        # Everything above is index bookkeeping on the CPU (a loop over IMAGES, never over windows);
        # the results move to the device once and are reused by every block.
        self.window_index = torch.cat(win_index).to(device)                    # [M]
        self.reverse_index = torch.argsort(self.window_index)                  # [M] undoes the permutation
        # per-patch permutation: the 4 patches of a merged token move together and keep their order
        patch_perm = (self.window_index.view(-1, 1) * unit + torch.arange(unit, device=device)).flatten()  # [N]
        self.patch_perm = patch_perm
        img_sizes_t = torch.tensor(img_sizes)
        self.cu_seqlens = F.pad(img_sizes_t.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)  # [n_img+1]
        frame_sizes = torch.cat([torch.full((t,), gh * gw) for t, gh, gw in grid_thw.tolist()])
        self.full = _SegmentBatch(frame_sizes, device)                          # one segment per frame
        self.window = _SegmentBatch(torch.cat(win_sizes), device)               # one segment per window
        # 2-D RoPE angles: head dim d = 80 -> d/4 = 20 frequencies per axis, theta = base^(-2j/(d/2))
        d = vcfg.head_dim
        inv = 1.0 / (vcfg.rope_theta ** (torch.arange(0, d // 2, 2, dtype=torch.float32) / (d // 2)))  # [d/4]
        pos_r = torch.cat(rows).float()[patch_perm.cpu()]
        pos_c = torch.cat(cols).float()[patch_perm.cpu()]
        ang = torch.cat([pos_r[:, None] * inv, pos_c[:, None] * inv], dim=-1)  # [N, d/2]: rows then cols
        ang = torch.cat([ang, ang], dim=-1).to(device)                        # [N, d]
        self.cos, self.sin = ang.cos(), ang.sin()                              # float32 [N, d]


class _SegmentBatch:
    """Variable-length, bidirectional attention over contiguous segments WITHOUT a Python loop per segment.

    Choice (issue 2 asks to explain it): the segments are gathered into a padded batch [S, Lmax] and run
    through ONE scaled_dot_product_attention call with a key-padding mask. At the 3B scale almost every window
    is full (64 patches), so padding costs little, and memory is S * Lmax^2 (not N^2 as a block-diagonal
    [N, N] mask would be: 65k patches for a 12-Mpx photo would need a 4-billion-entry mask). Padded query
    rows still see their segment's real keys, so no row is fully masked (no NaNs); they are dropped after.
    When all segments have the same length (one image in a full-attention block) no mask is needed at all.
    """

    def __init__(self, lengths: torch.Tensor, device):
        lengths = lengths.long()
        self.n, self.lmax = len(lengths), int(lengths.max())
        starts = F.pad(lengths.cumsum(0), (1, 0))[:-1]                                    # [S]
        slot = torch.arange(self.lmax).view(1, -1)                                        # [1, Lmax]
        valid = slot < lengths.view(-1, 1)                                                # [S, Lmax]
        gather = torch.where(valid, starts.view(-1, 1) + slot, torch.zeros_like(slot))    # [S, Lmax] (pad -> row 0)
        self.uniform = bool(valid.all())
        self.gather = gather.flatten().to(device)                                          # [S*Lmax]
        self.valid = valid.flatten().to(device)                                            # [S*Lmax]
        self.mask = None if self.uniform else valid.view(self.n, 1, 1, self.lmax).to(device)  # [S, 1, 1, Lmax]

    def attend(self, q, k, v):
        """q, k, v [N, H, d] (segments contiguous along N) -> [N, H, d]; softmax(q k^T/sqrt(d)) v per segment."""
        H, d = q.shape[1], q.shape[2]
        def pack(x):  # [N, H, d] -> [S, H, Lmax, d]
            return x[self.gather].view(self.n, self.lmax, H, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(pack(q), pack(k), pack(v), attn_mask=self.mask)  # [S, H, Lmax, d]
        o = o.transpose(1, 2).reshape(self.n * self.lmax, H, d)                            # [S*Lmax, H, d]
        return o if self.uniform else o[self.valid]                                         # [N, H, d]


class VisionAttention(nn.Module):
    """Multi-head self-attention of a ViT block: fused qkv (with bias), 2-D RoPE on q and k in float32."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)    # rows: [q | k | v], head h owns rows h*d..h*d+d-1
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, plan: VisionPlan, segments: _SegmentBatch):
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.heads, -1).unbind(1)                 # 3 x [N, H, d]
        cos, sin = plan.cos[:, None], plan.sin[:, None]                            # [N, 1, d] float32
        q = apply_rope(q.float(), cos, sin).to(x.dtype)                            # RoPE in fp32, like the reference
        k = apply_rope(k.float(), cos, sin).to(x.dtype)
        o = segments.attend(q, k, v)                                               # [N, H, d]
        return self.proj(o.reshape(N, D))


class VisionBlock(nn.Module):
    """Pre-norm ViT block: x += Attn(RMSNorm1(x)); x += SwiGLU(RMSNorm2(x)) (all vision linears have bias)."""

    def __init__(self, vcfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(vcfg.hidden_size, 1e-6)
        self.norm2 = RMSNorm(vcfg.hidden_size, 1e-6)
        self.attn = VisionAttention(vcfg.hidden_size, vcfg.num_heads)
        self.mlp = SwiGLU(vcfg.hidden_size, vcfg.intermediate_size, bias=True)

    def forward(self, x, plan: VisionPlan, segments: _SegmentBatch):
        x = x + self.attn(self.norm1(x), plan, segments)
        return x + self.mlp(self.norm2(x), plan.cu_seqlens)


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (2, 14, 14) and no bias. Each input row is already one (C, T, ph, pw)
    patch, so the convolution is a plain matmul: y = x [N, 1176] @ W.reshape(D, 1176)^T."""

    def __init__(self, vcfg: VisionConfig):
        super().__init__()
        p, t = vcfg.patch_size, vcfg.temporal_patch_size
        self.proj = nn.Conv3d(vcfg.in_channels, vcfg.hidden_size, (t, p, p), stride=(t, p, p), bias=False)

    def forward(self, x):
        w = self.proj.weight                                      # [D, C, T, p, p]
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1))  # [N, D]


# The merger is the only place where vision and language widths meet: 4 neighbouring patches (a 2 x 2
# block, adjacent thanks to the block-major patch order) become one 4*Dv vector, and an MLP projects it to
# the LLM width. So an image of gh x gw patches costs gh*gw/4 LLM tokens.
class PatchMerger(nn.Module):
    """y = Linear2( GELU( Linear1( concat of 4 RMSNorm'd patch rows ) ) ): [N, Dv] -> [N/4, D_llm].
    GELU is the exact erf form: gelu(z) = z * Phi(z)."""

    def __init__(self, vcfg: VisionConfig):
        super().__init__()
        unit = vcfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(vcfg.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(vcfg.hidden_size * unit, vcfg.hidden_size * unit), nn.GELU(),
                                 nn.Linear(vcfg.hidden_size * unit, vcfg.out_hidden_size))
        self.unit = unit

    def forward(self, x):
        x = self.ln_q(x)                                     # [N, Dv]
        return self.mlp(x.reshape(-1, x.shape[-1] * self.unit))  # [M, D_llm]


class VisionTower(nn.Module):
    """pixel rows [N, 1176] -> merged image tokens [M, D_llm] in the `<|image_pad|>` order (block raster).

    Steps: patch embed -> permute patches window by window -> depth x VisionBlock (window attention, except
    whole-image attention in fullatt_block_indexes) -> PatchMerger -> undo the window permutation.
    """

    def __init__(self, vcfg: VisionConfig):
        super().__init__()
        self.cfg = vcfg
        self.patch_embed = PatchEmbed(vcfg)
        self.blocks = nn.ModuleList([VisionBlock(vcfg) for _ in range(vcfg.depth)])
        self.merger = PatchMerger(vcfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        # Shapes for one 448 x 448 photo in the 3B: pixel rows [1024, 1176] -> embed [1024, 1280] ->
        # 32 blocks (16 windows of 64 patches; 4 whole-image blocks over 1024) -> merger [256, 2048].
        grid_thw = torch.as_tensor(grid_thw).view(-1, 3)
        n_expected = int((grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).sum())
        if pixel_values.dim() != 2 or pixel_values.shape[0] != n_expected:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)} but image_grid_thw "
                             f"{grid_thw.tolist()} needs [{n_expected}, 1176]")
        m = self.cfg.spatial_merge_size
        if bool(((grid_thw[:, 1:] % m) != 0).any()):
            raise ValueError(f"image_grid_thw {grid_thw.tolist()}: h and w must be multiples of {m}")
        plan = VisionPlan(grid_thw, self.cfg, pixel_values.device)
        x = self.patch_embed(pixel_values)                     # [N, Dv]
        x = x[plan.patch_perm]                                 # [N, Dv] window order
        full = set(self.cfg.fullatt_block_indexes)
        for i, blk in enumerate(self.blocks):
            x = blk(x, plan, plan.full if i in full else plan.window)
        y = self.merger(x)                                     # [M, D_llm] window order
        return y[plan.reverse_index]                           # [M, D_llm] block-raster order


# ===================================================================================================
# 5. Text decoder (Qwen2 with M-RoPE)
#
# M-RoPE in one picture (head_dim 128, mrope_section [16, 24, 24] for the 3B/7B):
#   frequency index j:   0 ........ 15 | 16 ............ 39 | 40 ............ 63
#   driven by axis:      t (temporal)   | h (image row)      | w (image column)
# Each j rotates the pair (x_j, x_{j+64}). A text token has t = h = w = p, so every frequency sees the
# same position and M-RoPE collapses to ordinary RoPE; an image token at merged cell (r, c) has
# (t, h, w) = (p, p + r, p + c), giving the model 2-D geometry inside the image.
# ===================================================================================================
def mrope_cos_sin(pos3: torch.Tensor, cfg: Config, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE angles. pos3 [3, B, T] holds the (t, h, w) position of every token.

        inv_freq_j = rope_theta^(-2j/d),  j = 0 .. d/2-1
        theta_j    = pos_axis(j) * inv_freq_j,  axis(j) = t for the first mrope_section[0] frequencies,
                     h for the next mrope_section[1], w for the last mrope_section[2]   (non-interleaved)
    Returns cos, sin [B, T, d] (angles duplicated to d for rotate_half), computed in float32 and then cast
    to the activation dtype like the reference. For text all three axes are equal: plain 1-D RoPE.
    """
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=pos3.device) / d))  # [d/2]
    ang = pos3.float()[..., None] * inv                                       # [3, B, T, d/2]
    axis = torch.repeat_interleave(torch.arange(3, device=pos3.device),
                                   torch.tensor(cfg.mrope_section, device=pos3.device))  # [d/2] in {0,1,2}
    ang = ang.gather(0, axis.view(1, 1, 1, -1).expand(1, *ang.shape[1:]))[0]  # [B, T, d/2]
    ang = torch.cat([ang, ang], dim=-1)                                       # [B, T, d]
    return ang.cos().to(dtype), ang.sin().to(dtype)


class Attention(nn.Module):
    """Causal GQA self-attention with q/k/v bias and no o bias:
    o = softmax(q k^T / sqrt(d) + causal/pad mask) v, each kv head shared by H / Hk query heads."""

    def __init__(self, cfg: Config):
        super().__init__()
        D, H, Hk, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.H, self.Hk, self.d = H, Hk, d
        self.q_proj = nn.Linear(D, H * d, bias=True)
        self.k_proj = nn.Linear(D, Hk * d, bias=True)
        self.v_proj = nn.Linear(D, Hk * d, bias=True)
        self.o_proj = nn.Linear(H * d, D, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, write_at=None):
        """x [B, T, D]; cos/sin [B, T, d]; mask bool [B, 1, T, S].

        cache = (K, V) preallocated [B, Hk, T_max, d]: new keys/values are written at positions `write_at`
        (LongTensor [T]) and attention runs over the whole cache (invalid slots are masked), so the decode step
        has fixed shapes (CUDA-graph friendly). Without a cache, attention runs over the T new tokens only.
        """
        # GQA shapes for the 3B: H = 16 query heads, Hk = 2 kv heads, d = 128 -> each kv head serves 8
        # query heads; the KV cache is 8x smaller than full multi-head attention would need.
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.d).transpose(1, 2)     # [B, H, T, d]
        k = self.k_proj(x).view(B, T, self.Hk, self.d).transpose(1, 2)    # [B, Hk, T, d]
        v = self.v_proj(x).view(B, T, self.Hk, self.d).transpose(1, 2)    # [B, Hk, T, d]
        c, s = cos[:, None], sin[:, None]                                 # [B, 1, T, d]
        q, k = apply_rope(q, c, s), apply_rope(k, c, s)
        if cache is not None:
            K, V = cache
            K.index_copy_(2, write_at, k)                                 # in place, no reallocation
            V.index_copy_(2, write_at, v)
            if T > 1:  # prefill: the new tokens only see each other (the cache holds nothing else yet)
                k, v = K[:, :, : T], V[:, :, : T]
            else:
                # decode (one query per row): fold the H/Hk query heads that share a kv head into the
                # query axis, [B, H, 1, d] -> [B, Hk, H/Hk, d], and attend over the cache as plain
                # multi-head attention with Hk heads. Same numbers as GQA, but no kernel has to broadcast
                # (or, in fallback paths, COPY) the whole [B, Hk, T_max, d] cache H/Hk times per layer,
                # and the fused attention kernels that take a mask but not GQA can run. mask [B, 1, 1, S]
                # broadcasts over the folded query heads.
                qg = q.reshape(B, self.Hk, self.H // self.Hk, self.d)       # [B, Hk, H/Hk, d]
                o = F.scaled_dot_product_attention(qg, K, V, attn_mask=mask)  # [B, Hk, H/Hk, d]
                return self.o_proj(o.reshape(B, 1, self.H * self.d))       # [B, 1, D]
        o = _sdpa_gqa(q, k, v, mask)                                      # [B, H, T, d]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))           # [B, T, D]


# A Qwen2 decoder layer is a plain pre-norm transformer layer; nothing in it knows about images except the
# cos/sin it receives (M-RoPE) - the multimodality lives entirely in the embeddings and the positions.
class DecoderLayer(nn.Module):
    """x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)) (decoder linears in the MLP have no bias)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, write_at=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, write_at)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """embed_tokens -> layers -> final RMSNorm (named like the Hub's `model.*` keys)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def rope_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_grid_thw, cfg: Config):
    """3-D M-RoPE positions pos3 [3, B, T] and the per-sample rope delta [B] (the get_rope_index rules).

    Walk the REAL (unpadded) tokens of each row with a counter p = 0:
      text token (incl. <|vision_start|>/<|vision_end|>): (t, h, w) = (p, p, p); p += 1
      image block of lh*lw <|image_pad|> tokens (lh = gh/2, lw = gw/2), merged token (r, c):
                                                 (t, h, w) = (p, p + r, p + c); then p += max(lh, lw)
    delta = max(pos) + 1 - n_real, so generated token k (0-based) sits at position n_real + k + delta
    = max(pos) + 1 + k on all three axes. Images are matched to image blocks in batch-then-sequence order.
    Pad positions get 0 (they are masked anyway).
    """
    # Example: [a b c <vs> (4 x 6 image pads) <ve> d] -> a b c <vs> at 0 1 2 3; the image at t = 4,
    # h = 4..7, w = 4..9; then p = 4 + max(4, 6) = 10, so <ve> = 10 and d = 11. 30 tokens, max 11:
    # delta = 11 + 1 - 30 = -18, and the first generated token sits at 12 (= 30 + delta).
    B, T = input_ids.shape
    dev = input_ids.device
    m = cfg.vision.spatial_merge_size
    grids = [] if image_grid_thw is None else torch.as_tensor(image_grid_thw).view(-1, 3).tolist()
    gi = 0
    pos3 = torch.zeros(3, B, T, dtype=torch.long)
    deltas = torch.zeros(B, dtype=torch.long)
    ids_cpu = input_ids.cpu()
    mask_cpu = None if attention_mask is None else attention_mask.cpu().bool()
    for b in range(B):
        real = torch.arange(T) if mask_cpu is None else mask_cpu[b].nonzero().flatten()   # [n_real]
        ids = ids_cpu[b, real]
        is_img = (ids == cfg.image_token_id).tolist()
        chunks, p, i, n = [], 0, 0, len(is_img)
        while i < n:
            j = i
            while j < n and is_img[j] == is_img[i]:
                j += 1
            if not is_img[i]:                                              # a text run of j - i tokens
                chunks.append(torch.arange(p, p + j - i).expand(3, -1))
                p += j - i
            else:                                                          # an image block
                if gi >= len(grids):
                    raise ValueError("more <|image_pad|> blocks in input_ids than images in image_grid_thw")
                t, gh, gw = grids[gi]
                gi += 1
                lh, lw = gh // m, gw // m
                if t * lh * lw != j - i:
                    raise ValueError(f"image {gi - 1} has grid {[t, gh, gw]} -> {t * lh * lw} tokens but the prompt "
                                     f"holds a block of {j - i} <|image_pad|> tokens")
                tt = torch.arange(t).view(-1, 1, 1).expand(t, lh, lw).flatten()
                hh = torch.arange(lh).view(1, -1, 1).expand(t, lh, lw).flatten()
                ww = torch.arange(lw).view(1, 1, -1).expand(t, lh, lw).flatten()
                chunks.append(torch.stack([tt, hh, ww]) + p)
                p += max(lh, lw)
            i = j
        if chunks:
            pos = torch.cat(chunks, dim=1)                                  # [3, n_real]
            pos3[:, b, real] = pos
            deltas[b] = int(pos.max()) + 1 - n
    if gi != len(grids):
        raise ValueError(f"image_grid_thw lists {len(grids)} images but input_ids hold {gi} image blocks")
    return pos3.to(dev), deltas.to(dev)


# ===================================================================================================
# 6. The VLM: vision tower + decoder, generation, Hub loading and saving
# ===================================================================================================
@dataclass
class Generation:
    """What `VLM.generate` returns (GRPO, rl.py, consumes exactly these three).

    tokens   LongTensor [B, L]  completion ids; pad_token_id after the stop token
    mask     float [B, L]       1 on real completion tokens INCLUDING the stop token, else 0
    logprobs float32 [B, L]     log softmax(logits / temperature)[chosen token] (0 where mask is 0)
    logits   float32 [B, L, V]  the raw next-token logits of every step (only if output_logits=True)
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    logits: torch.Tensor | None = None


# Why a boolean [B, 1, T, T] mask rather than is_causal=True: left padding makes the mask row-dependent.
# Row b = [P P x y z] (P = pad): x may see x; y sees x y; z sees x y z; the pad rows see only themselves.
def causal_mask(attention_mask: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """Bool [B, 1, T, T]: query i may see key j iff j <= i and j is a real token. The diagonal is always
    allowed so that left-pad query rows are never fully masked (their outputs are garbage but finite)."""
    idx = torch.arange(T, device=device)
    m = (idx.view(1, -1) <= idx.view(-1, 1)).expand(B, T, T)             # [B, T, T] causal
    if attention_mask is not None:
        m = m & attention_mask.bool().view(B, 1, T)                       # drop pad keys
        m = m | torch.eye(T, dtype=torch.bool, device=device)             # keep the diagonal
    return m.view(B, 1, T, T)


def _looks_like_local_path(name: str) -> bool:
    """True when `name` can only mean a folder on this machine, never a Hub repo id.

    A Hub id is exactly `owner/name` (one slash, no leading . / ~). So: a leading `.`, `/` or `~`, a
    backslash, two or more slashes (`runs/tiny/stage2/model`), a trailing `/model` (what rl.py exports),
    or a first component that is a folder here (`runs/x` next to a `runs/` folder) all say "local path".
    Why it matters: a missing local checkpoint must not be answered with an `hf download` hint.
    """
    s = str(name)
    if s.startswith((".", "/", "~")) or "\\" in s or s.count("/") >= 2 or s.rstrip("/").endswith("/model"):
        return True
    head = Path(s).parts[0] if Path(s).parts else ""
    return "/" in s and Path(head).is_dir()


def _resolve_checkpoint(name_or_path: str) -> Path:
    """A local directory, or a Hub repo id fetched (json + safetensors only) through the HF cache."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.exists() or _looks_like_local_path(str(name_or_path)):  # a run folder not trained yet, or a file:
        # no Hub lookup and no `hf download` hint (it would name a local path)
        what = "is a file, not a checkpoint folder" if p.exists() else "does not exist"
        raise FileNotFoundError(f"no such checkpoint folder: {name_or_path} ({what}; train it first: bash train.sh, "
                                f"or pass a preset tiny|3b|7b or a Hub id owner/name)")
    name = HUB_IDS.get(str(name_or_path).lower(), str(name_or_path))
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:  # offline, unknown repo, no network...: one readable line, no traceback soup
        msg = str(exc).strip().splitlines()[0].split(". ")[0][:160] if str(exc).strip() else ""
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a local directory nor a repo in the Hugging Face cache "
            f"({type(exc).__name__}: {msg}); download it first with: "
            f"hf download {name} --include '*.json' '*.safetensors'") from None


def _hub_key(key: str) -> str:
    """Map the newer key layout (transformers >= 4.52 in memory) to the Hub layout that our modules use:
    model.visual.* -> visual.*, model.language_model.* -> model.*"""
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


# ---------------------------------------------------------------------------------------------------
# Fast rollouts (issue 7). GRPO spends most of its time here: 8 prompts x G = 8 samples x ~512 tokens,
# one token per step. A decode step of the 3B model is tiny work per kernel ([B, 1, 2048] activations)
# but ~600 kernel launches (36 layers x ~17 ops), so written naively it is bound by three host-side costs,
# not by the GPU:
#   * LAUNCH OVERHEAD: each launch costs ~5-10 us of Python + driver time; 600 of them is 3-6 ms per step,
#     more than the ~2.6 ms it takes the H100 to stream the 7.5 GB of bf16 weights once (the physical
#     floor of a step). A CUDA graph records the whole step once and replays it with ONE launch.
#   * ALLOCATION: a growing cache (torch.cat per step) reallocates and copies the cache every token, and
#     changes tensor addresses, which a graph forbids. Here every buffer is allocated ONCE per call.
#   * SYNCHRONISATION: `if done.all():` or torch.multinomial's input check copies a value to the host,
#     which stalls the CPU until the GPU has drained its queue, so the CPU can no longer run ahead. The
#     step below samples on the GPU with no host read; the host checks "all rows stopped?" only every
#     `sync_every` steps (the extra steps after the last stop only write pads with mask 0).
# The same StaticDecoder runs without a graph on the CPU (and in the tests), so both paths share code.
# ---------------------------------------------------------------------------------------------------
class StaticDecoder:
    """All state of one `VLM.generate` call, preallocated, plus the decode step that updates it in place.

    Buffers (B rows, cache width T_alloc = T0 + max_new_tokens rounded up to a multiple of 16):
      cache      per layer (K, V) [B, Hk, T_alloc, d] in the model dtype
      bias       [B, 1, 1, T_alloc] additive attention mask (0 = visible column, -inf = not yet / pad)
      cur_tok    [B] the last chosen token (input of the next step); pos [B] its M-RoPE position;
      col        [1] its cache column; out_col [1] the output column the next choice is written to
      tokens, mask, logps [B, max_new_tokens] the Generation fields; done [B] rows that emitted a stop
    Counters live on the device, so that a graph replay (which cannot take Python arguments) advances them.
    """

    def __init__(self, model, input_ids, attention_mask, max_new_tokens, temperature, top_p, greedy,
                 generator, stop_ids):
        cfg, dev, dt = model.cfg, model.device, model.dtype
        self.model, self.cfg = model, cfg
        self.temperature, self.top_p, self.greedy, self.generator = temperature, top_p, greedy, generator
        self.input_ids = input_ids.to(dev)
        B, T0 = self.input_ids.shape
        am = torch.ones_like(self.input_ids) if attention_mask is None else attention_mask.to(dev)
        if am.shape != self.input_ids.shape:
            raise ValueError(f"attention_mask {tuple(am.shape)} does not match input_ids {tuple(self.input_ids.shape)}")
        if B and bool((am[:, -1] == 0).any()):
            raise ValueError("generate() needs LEFT padding: the last column must be a real token in every row")
        self.attention_mask = am
        self.B, self.T0, self.max_new = B, T0, max_new_tokens
        self.T_alloc = -(-(T0 + max_new_tokens) // 16) * 16   # multiple of 16: aligned mask rows for SDPA kernels
        Hk, d = cfg.num_key_value_heads, cfg.head_dim
        self.cache = [(torch.zeros(B, Hk, self.T_alloc, d, dtype=dt, device=dev),
                       torch.zeros(B, Hk, self.T_alloc, d, dtype=dt, device=dev)) for _ in model.model.layers]
        self.bias = torch.full((B, 1, 1, self.T_alloc), float("-inf"), dtype=dt, device=dev)  # [B,1,1,T_alloc]
        self.bias[:, 0, 0, :T0].masked_fill_(am.bool(), 0.0)
        self.stops = torch.tensor(sorted({cfg.eos_token_id, *(stop_ids or ())}), device=dev)      # [S]
        self.tokens = torch.full((B, max_new_tokens), cfg.pad_token_id, dtype=torch.long, device=dev)
        self.mask = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=dev)
        self.logps = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=dev)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.cur_tok = torch.full((B,), cfg.pad_token_id, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.col = torch.tensor([T0], device=dev)
        self.out_col = torch.tensor([0], device=dev)
        # RoPE frequencies once (the same float32 expression as mrope_cos_sin, so the angles are identical)
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=dev) / d))
        self.logits = None
        self.graph = None

    def prefill(self, pixel_values, image_grid_thw, image_embeds) -> torch.Tensor:
        """One batched causal pass over all B prompts -> float32 logits [B, V] of the last column.

        Writes K/V of every prompt column into the cache and sets each row's next position to
        max(prompt positions) + 1 (= n_real + rope_delta); pads hold position 0 so they never win the max.
        """
        m, cfg = self.model, self.cfg
        x = m._embed(self.input_ids, pixel_values, image_grid_thw, image_embeds)        # [B, T0, D]
        pos3, _ = rope_positions(self.input_ids, self.attention_mask, image_grid_thw, cfg)  # [3, B, T0]
        cos, sin = mrope_cos_sin(pos3, cfg, x.dtype)                                  # [B, T0, d]
        mask = causal_mask(self.attention_mask, self.B, self.T0, x.device)            # [B, 1, T0, T0]
        write_at = torch.arange(self.T0, device=x.device)
        for layer, kv in zip(m.model.layers, self.cache):
            x = layer(x, cos, sin, mask, kv, write_at)
        self.pos.copy_(pos3.amax(dim=(0, 2)) + 1)                                     # [B]
        # only the last column matters for the first choice (left padding: it is real in every row)
        self.logits = F.linear(m.model.norm(x[:, -1:]), m.lm_head_weight)[:, 0].float()   # [B, V]
        return self.logits

    def record(self, logits: torch.Tensor):
        """Choose a token per row from logits [B, V] and write it (and its log-prob, mask) at out_col.

        Rows that already stopped keep emitting pad with mask 0 and log-prob 0, so the three output tensors
        stay rectangular and GRPO can multiply by `mask` without special cases. No host sync anywhere.
        """
        tok, lp = VLM._choose(logits, self.temperature, self.top_p, self.greedy, self.generator)  # [B], [B]
        live = ~self.done
        tok = torch.where(live, tok, torch.full_like(tok, self.cfg.pad_token_id))
        self.tokens.index_copy_(1, self.out_col, tok[:, None])
        self.mask.index_copy_(1, self.out_col, live.float()[:, None])
        self.logps.index_copy_(1, self.out_col, torch.where(live, lp, torch.zeros_like(lp))[:, None])
        self.done |= live & (tok[:, None] == self.stops).any(-1)
        self.cur_tok.copy_(tok)
        self.out_col += 1

    def step(self):
        """One decode step, fixed shapes: embed cur_tok [B, 1, D] -> all layers against the full cache ->
        logits [B, V] -> record the next token. Advances col / pos / out_col on the device."""
        m = self.model
        x = m.model.embed_tokens(self.cur_tok[:, None])                               # [B, 1, D]
        # text tokens have t = h = w, so M-RoPE is plain RoPE at `pos` (same angles as mrope_cos_sin)
        ang = self.pos.float()[:, None] * self.inv_freq                               # [B, d/2]
        ang = torch.cat([ang, ang], dim=-1)[:, None]                                  # [B, 1, d]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        self.bias.index_fill_(3, self.col, 0.0)                                       # this token is visible
        for layer, kv in zip(m.model.layers, self.cache):
            x = layer(x, cos, sin, self.bias, kv, self.col)
        self.logits = F.linear(m.model.norm(x), m.lm_head_weight)[:, 0].float()       # [B, V]
        self.col += 1
        self.pos += 1
        self.record(self.logits)

    def capture(self, warmup: int = 2) -> int:
        """Capture `step` in a CUDA graph. Returns how many (real) steps ran eagerly before the capture.

        The warm-up steps are genuine decode steps run on a side stream: they make cuBLAS and the attention
        kernels create their handles and workspaces BEFORE capture (allocation is not allowed while
        capturing). During capture nothing executes; kernels are only recorded. Returns 0 and leaves
        self.graph None (eager decoding) when capture is not possible on this torch build.
        """
        warmup = max(0, min(warmup, self.max_new - 2))  # keep >= 1 step for the graph
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        if self.max_new - 1 - warmup <= 0:
            return warmup
        try:
            g = torch.cuda.CUDAGraph()
            if self.generator is not None and not self.greedy:
                # a user generator's Philox seed/offset must be tracked by the graph, else every replay
                # would redraw the same noise (the default generator is registered automatically)
                g.register_generator_state(self.generator)
            with torch.cuda.graph(g):
                self.step()
            self.graph = g
        except Exception as exc:  # an op that cannot be captured on this build: decode eagerly instead
            import warnings
            warnings.warn(f"generate: CUDA graph capture failed ({type(exc).__name__}: {exc}); decoding eagerly")
            self.graph = None
        return warmup

    def replay(self):
        """One decode step = one graph launch (reads and writes the same buffers as `step`)."""
        self.graph.replay()

    def release(self):
        """Drop the graph (and its private memory pool) and the cache."""
        self.graph, self.cache, self.logits = None, None, None


class VLM(nn.Module):
    """Qwen2.5-VL: `visual` (VisionTower) + `model` (TextModel) + `lm_head` (None when tied).

    Forward pass (the paper takes it as given):
        img = VisionTower(pixel_values)                        [M, D]   one row per <|image_pad|>
        x   = embed_tokens[input_ids]; x[image pads] = img     [B, T, D]
        x   = DecoderLayer_L( ... DecoderLayer_1(x) )          M-RoPE positions from rope_positions()
        logits = RMSNorm(x) @ W_head^T                         [B, T, V]  (W_head = embed_tokens if tied)
    Module names equal the Hub checkpoint keys, so loading needs no renaming for the Hub layout.
    """

    def __init__(self, cfg: Config, init: bool = True, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision)
        self.model = TextModel(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if init and self.model.embed_tokens.weight.device.type != "meta":
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0):
        """Random init (std 0.02 normal weights, zero biases, unit norms), reproducible from `seed`."""
        g = torch.Generator().manual_seed(seed)
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding, nn.Conv3d)):
                w = torch.randn(mod.weight.shape, generator=g) * 0.02
                mod.weight.copy_(w)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
            elif isinstance(mod, RMSNorm):
                mod.weight.fill_(1.0)

    # ------------------------------------------------------------------------------ properties
    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, D]: the output projection (the input embedding when tie_word_embeddings)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    # ------------------------------------------------------------------------------ forward
    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw) -> torch.Tensor:
        """[N, 1176] patch rows of all images + grid [n, 3] -> [M, D] merged tokens, images concatenated."""
        return self.visual(pixel_values.to(self.device), torch.as_tensor(image_grid_thw).view(-1, 3))

    def _embed(self, input_ids, pixel_values, image_grid_thw, image_embeds):
        """Token embeddings with the image features scattered into the <|image_pad|> slots, in order."""
        x = self.model.embed_tokens(input_ids)                                 # [B, T, D]
        slots = input_ids == self.cfg.image_token_id                           # [B, T]
        n_slots = int(slots.sum())
        if image_embeds is None and pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values given without image_grid_thw")
            image_embeds = self.encode_images(pixel_values, image_grid_thw)   # [M, D]
        if image_embeds is None:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} <|image_pad|> tokens but no pixel_values were given")
            return x
        if image_embeds.shape[0] != n_slots:
            raise ValueError(f"the images give {image_embeds.shape[0]} tokens but input_ids hold {n_slots} "
                             "<|image_pad|> tokens (expand each pad to (h'/28)*(w'/28) copies)")
        return x.masked_scatter(slots.unsqueeze(-1), image_embeds.to(x.dtype))

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                      image_embeds=None) -> torch.Tensor:
        """[B, T] ids -> [B, T, D] final hidden states (after the last RMSNorm), no cache."""
        input_ids = input_ids.to(self.device)
        B, T = input_ids.shape
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        x = self._embed(input_ids, pixel_values, image_grid_thw, image_embeds)   # [B, T, D]
        pos3, _ = rope_positions(input_ids, attention_mask, image_grid_thw, self.cfg)  # [3, B, T]
        cos, sin = mrope_cos_sin(pos3, self.cfg, x.dtype)                       # [B, T, d]
        mask = causal_mask(attention_mask, B, T, x.device)                      # [B, 1, T, T]
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                image_embeds=None) -> torch.Tensor:
        """logits [B, T, V] = hidden_states @ lm_head_weight^T."""
        h = self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw, image_embeds)
        return F.linear(h, self.lm_head_weight)

    # ------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                 generator: torch.Generator | None = None, image_embeds=None, output_logits: bool = False,
                 stop_ids=None, cuda_graph: bool | None = None, sync_every: int | None = None) -> Generation:
        """Batched sampling with a static KV cache (and, on CUDA, a CUDA-graph decode step).

        The cache is PREALLOCATED once per call: per layer K, V [B, Hk, T_alloc, d] with T_alloc >=
        T0 + max_new_tokens. The prompt (left-padded, T0 columns) is prefilled in ONE batched pass; every
        decode step then writes one column in place and attends over the whole cache under a key-validity
        mask, so each step has identical shapes and addresses (what CUDA-graph capture needs). Positions
        continue per sample: token k gets max(prompt pos) + 1 + k on all three M-RoPE axes (the rope delta).

        Sampling: p = softmax(logits / temperature), restricted to the smallest top-p nucleus, drawn with
        `generator` on the logits' device; greedy takes argmax and reports log-probs at temperature 1. Rows
        stop at eos (<|im_end|>) or any of `stop_ids`; the loop ends when all rows stopped or after
        max_new_tokens.

        cuda_graph: None = on when the model is on CUDA and output_logits is off; True/False forces it
        (True on a CPU model is an error). sync_every: how many decode steps run between two "have all
        rows stopped?" checks (each check is one device->host sync); None = 16 on CUDA, 1 on the CPU where
        a check is free. The results do not depend on either knob, only the speed does.
        """
        # Layout of the cache along its T_alloc axis for one row (P = pad, p = prompt, g = generated):
        #     P P p p p p p p | g0 g1 g2 ... g_{max_new-1} | (unused columns up to a multiple of 16)
        #     <---- T0 ------>  <------ max_new_tokens ---->
        # Which columns a query may attend to is kept as an ADDITIVE mask (0 = visible, -inf = not):
        # prompt columns where attention_mask is 1, then one more column per decode step. Causality needs
        # no extra mask in the decode phase: the columns of future tokens are simply not visible yet.
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not greedy and not temperature > 0:
            raise ValueError("temperature must be > 0 (use greedy=True for argmax decoding)")
        if not (0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        on_cuda = self.device.type == "cuda"
        if cuda_graph and not on_cuda:
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        use_graph = (on_cuda and not output_logits) if cuda_graph is None else bool(cuda_graph)
        if use_graph and output_logits:
            raise ValueError("output_logits=True keeps every step's logits: use cuda_graph=False")
        dec = StaticDecoder(self, input_ids, attention_mask, max_new_tokens, temperature, top_p, greedy,
                            generator, stop_ids)
        logits = dec.prefill(pixel_values, image_grid_thw, image_embeds)       # [B, V] float32, token 0
        all_logits = [logits] if output_logits else None
        dec.record(logits)                                                     # choose + store token 0
        check = max(1, int(sync_every)) if sync_every is not None else (16 if on_cuda else 1)
        k = 1                                                                  # next output column
        if use_graph and k < max_new_tokens and not bool(dec.done.all()):
            k += dec.capture()                     # warm-up step(s) ran eagerly; the graph is ready
        while k < max_new_tokens:
            if k % check == 0 and bool(dec.done.all()):   # the only host sync of the loop
                break
            dec.replay() if dec.graph is not None else dec.step()
            if output_logits:
                all_logits.append(dec.logits.clone())
            k += 1
        # rows are 1 from column 0 up to and including their stop token: the longest row gives L
        L = int(dec.mask.sum(1).max()) if dec.B else 0
        out = Generation(dec.tokens[:, :L].clone(), dec.mask[:, :L].clone(), dec.logps[:, :L].clone(),
                         torch.stack(all_logits, 1)[:, :L] if output_logits else None)
        dec.release()
        return out

    @staticmethod
    def _choose(logits, temperature, top_p, greedy, generator):
        """Pick the next token from float32 logits [B, V] -> (token [B], log p(token) [B]).

        log p = log_softmax(logits / T) of the full (unfiltered) distribution; the top-p nucleus only
        restricts WHICH tokens may be drawn: keep the most likely tokens until their mass reaches top_p.
        The draw is the exponential race: token = argmax_v p_v / E_v with E_v ~ Exp(1) i.i.d., which picks
        v with probability exactly p_v / sum(p) (the same rule, and with the same generator the same
        numbers, as torch.multinomial(p, 1)). Unlike multinomial it never checks its input on the host,
        so it runs inside a CUDA graph with no device->host synchronisation.
        """
        # GRPO (rl.py) needs log pi_old(token) of the policy that SAMPLED, i.e. with the temperature applied;
        # the nucleus cut is treated as a sampling device, not as part of pi (the usual TRL/verl convention).
        if greedy:
            tok = logits.argmax(-1)
            return tok, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]
        logp = torch.log_softmax(logits / temperature, -1)                       # [B, V]
        probs = logp.exp()
        if top_p < 1.0:
            sp, si = probs.sort(-1, descending=True)                             # [B, V]
            keep = (sp.cumsum(-1) - sp) < top_p                                  # mass BEFORE this token < p
            sp = sp * keep
            race = sp / torch.empty_like(sp).exponential_(generator=generator)   # [B, V]
            tok = si.gather(1, race.argmax(-1, keepdim=True))[:, 0]
        else:
            race = probs / torch.empty_like(probs).exponential_(generator=generator)
            tok = race.argmax(-1)
        return tok, logp.gather(1, tok[:, None])[:, 0]

    # ------------------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32, device="cpu", convert=None) -> "VLM":
        """Load a Qwen2.5-VL checkpoint: a local dir or a Hub repo id (via the HF cache / snapshot_download).

        The model is built on the META device (no memory), then every tensor is read from the safetensors
        file(s) one at a time, converted to `dtype` on `device` and ASSIGNED in place: weights are allocated
        once. Both key layouts are accepted (Hub `visual.*`/`model.*` and `model.visual.*`/
        `model.language_model.*`); a tied checkpoint may lack lm_head.weight. Any missing or unexpected key
        is an error that lists them.

        convert(model, cfg) -> set of parameter names to keep in fp32: called on the META model before any
        tensor is read, when config.json carries a "dve" entry (a SkinFlow checkpoint with FDLinear layers).
        This file knows nothing of the DVE (it is the lowest import floor, issue 14): dve.py passes its
        `rebuild_dve` here (dve.load / dve.from_pretrained, the loader every entry point uses). A DVE
        checkpoint without `convert` is refused with a line that names dve.load.
        """
        from safetensors import safe_open

        path = _resolve_checkpoint(str(name_or_path))
        cfg = Config.from_file(path / "config.json")
        # Tensors created under the meta device have shapes but no storage: building the 3B this way
        # costs nothing, and each parameter is later REPLACED by the loaded tensor (not copied into).
        with torch.device("meta"):
            model = cls(cfg, init=False)
            keep32 = set()
            if cfg.dve:  # SkinFlow checkpoints with FDLinear layers: the caller's hook rebuilds them first
                if convert is None:
                    raise ValueError(f"{path} is a SkinFlow checkpoint with DVE layers (config.json 'dve'): "
                                     "load it with dve.load(...) or dve.from_pretrained(...)")
                # DVE layers own their precision: FDLinear builds its spectrum and KSM gate heads in fp32
                # even in a bf16 model (the FFT needs fp32, and the gate heads are what trains). Loading
                # them in `dtype` would round the trained gates to bf16 and make a bf16 Stage II train them
                # in bf16 (no fp32 master, see rl.MasterWeights), unlike Stage I. So `convert` names the
                # fp32 tensors, which keep fp32 whenever `dtype` is narrower.
                keep32 = convert(model, cfg)
                if dtype not in (torch.bfloat16, torch.float16):
                    keep32 = set()
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (path / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{path} has no model.safetensors or model.safetensors.index.json")
        # ---- strict key check before touching any data
        # `found` maps each model key (Hub naming) to where it lives (shard file, key as stored there)
        expected = set(model.state_dict().keys())
        found = {}
        for fname in files:
            with safe_open(str(path / fname), framework="pt") as f:
                for key in f.keys():
                    found[_hub_key(key)] = (fname, key)
        # The 3B checkpoint stores no lm_head (tied), the 7B does (untied); some exporters write a copy
        # of the embedding even for tied models, which we drop rather than reject.
        if cfg.tie_word_embeddings:
            found.pop("lm_head.weight", None)  # tied: the head IS embed_tokens; ignore a stored copy
        missing = sorted(expected - found.keys())
        unexpected = sorted(found.keys() - expected)
        if missing or unexpected:
            def show(keys):
                return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")
            raise KeyError(f"checkpoint {path} does not match the model: missing {len(missing)} keys"
                           f"{' [' + show(missing) + ']' if missing else ''}; unexpected {len(unexpected)} keys"
                           f"{' [' + show(unexpected) + ']' if unexpected else ''}")
        # ---- load shard by shard, tensor by tensor, straight into the target dtype/device.
        # safe_open memory-maps the file, so get_tensor reads one tensor; .to() makes the single copy
        # that the model keeps (for a bf16 file loaded as bf16 on CPU, .to() is a no-op view of the read).
        # Peak memory is therefore the model plus one tensor, never two models.
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for fname in files:
            with safe_open(str(path / fname), framework="pt") as f:
                for key in f.keys():
                    name = _hub_key(key)
                    if name not in expected:
                        continue
                    t = f.get_tensor(key)
                    want = torch.float32 if name in keep32 else dtype
                    t = t.to(device=device, dtype=want if t.is_floating_point() else t.dtype)
                    mod_name, _, attr = name.rpartition(".")
                    mod = model.get_submodule(mod_name)
                    if name in params:
                        if tuple(t.shape) != tuple(params[name].shape):
                            raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != model {tuple(params[name].shape)}")
                        setattr(mod, attr, nn.Parameter(t, requires_grad=params[name].requires_grad))
                    else:
                        mod._buffers[attr] = t
        # non-persistent buffers (none in the plain model; DVE may add some) are materialised empty -> refuse
        for name, b in list(model.named_buffers()) + list(model.named_parameters()):
            if b.device.type == "meta":
                raise RuntimeError(f"{name} was not loaded from the checkpoint (still on the meta device)")
        if (path / LORA_FILE).exists():  # an unmerged fp32 adapter (a bf16 export): the frozen start adapter
            with safe_open(str(path / LORA_FILE), framework="pt") as f:
                attach_lora_state(model, {k: f.get_tensor(k) for k in f.keys()})
        return model.eval()

    def save_pretrained(self, directory) -> Path:
        """Write config.json (flat Hub layout) + model.safetensors (Hub key names; no lm_head when tied),
        and, when the model carries LoRA adapters, LORA_FILE with them in fp32 (from_pretrained re-attaches it)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        conf = self.cfg.to_dict()
        conf["torch_dtype"] = str(self.dtype).replace("torch.", "")
        (d / "config.json").write_text(json.dumps(conf, indent=2))
        # LoRA adapters (bf16 exports keep them unmerged, see rl.Trainer.export) go to their own fp32 file:
        # model.safetensors keeps exactly the Hub keys, and the adapter is not rounded to the model dtype.
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if not k.endswith((".lora_A", ".lora_B"))}
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        adapters = lora_state(self)
        if adapters:
            save_file(adapters, str(d / LORA_FILE), metadata={"format": "skinflow-lora",
                                                              "delta": "W + lora_B @ lora_A (scaling folded in)"})
        elif (d / LORA_FILE).exists():
            (d / LORA_FILE).unlink()  # a stale adapter from an earlier export must not be re-applied
        return d


# ===================================================================================================
# 7. Tokenizer: Qwen2 byte-level BPE, pure Python
# ===================================================================================================
# The Qwen2 pre-tokenizer pattern (Oniguruma syntax, as stored in tokenizer.json):
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Unicode White_Space: what \s means for the reference engine. (Python's \s also matches U+001C..U+001F.)
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@lru_cache(maxsize=1)
def _unicode_classes() -> tuple[str, str]:
    """Character-class bodies for \\p{L} (letters, categories L*) and \\p{N} (numbers, N*), built once from
    unicodedata as code-point ranges. Why not `[^\\W\\d_]`: Python's \\w/\\d are not L/N (\\w includes `_` and
    marks, \\d misses ² ½ Ⅷ ①), and the shortcut silently changes how `snake_case` or `x²` split."""
    # One pass over all 1,114,112 code points (~0.5 s, once per process). The ranges keep the classes short:
    # \p{L} is ~680 ranges, \p{N} ~140, so the compiled stdlib pattern stays fast to match.
    def ranges(pred):
        out, start, prev = [], None, None
        for cp in range(0x110000):
            if pred(unicodedata.category(chr(cp))):
                if start is None:
                    start = cp
                prev = cp
            elif start is not None:
                out.append((start, prev))
                start = None
        if start is not None:
            out.append((start, prev))
        esc = lambda cp: f"\\U{cp:08x}"  # noqa: E731 - escapes are safe inside a [...] class
        return "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in out)
    return ranges(lambda c: c[0] == "L"), ranges(lambda c: c[0] == "N")


@lru_cache(maxsize=1)
def _qwen2_regex() -> re.Pattern:
    """QWEN2_PATTERN translated to stdlib `re`: \\p{L}, \\p{N}, \\s, \\S become explicit classes."""
    L, N = _unicode_classes()
    S = _WHITE_SPACE
    pat = (rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{L}{N}]?[{L}]+|[{N}]| ?[^{S}{L}{N}]+[\r\n]*|"
           rf"[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+")
    return re.compile(pat)


@lru_cache(maxsize=1)
def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable char table: the 188 printable bytes (! .. ~, ¡ .. ¬, ® .. ÿ) map to
    themselves, the other 68 to U+0100, U+0101, ... in byte order. So BPE never sees a space or control char."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


class Tokenizer:
    """Byte-level BPE (the Qwen2 tokenizer) read from / written to a HF tokenizer.json.

    encode(text):  1. split out added/special tokens (longest first, literal match, before anything else)
                   2. NFC-normalise each remaining chunk, 3. regex pre-tokenise (QWEN2_PATTERN),
                   4. UTF-8 bytes -> printable chars, 5. BPE: repeatedly merge the adjacent pair with the
                   lowest merge rank until none is in the table, 6. look the pieces up in the vocab.
    decode(ids):   pieces -> bytes (inverse char table; added tokens as their text) -> UTF-8 ("replace").
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], added: list[dict],
                 pattern: str = QWEN2_PATTERN):
        if pattern != QWEN2_PATTERN:
            raise ValueError("only the Qwen2 pre-tokenizer pattern is supported")
        self.vocab = vocab
        self.merges = merges
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.added = added                                                  # [{"id", "content", "special"}]
        self.added_ids = {a["content"]: a["id"] for a in added}
        self.id_to_piece = {i: s for s, i in vocab.items()}
        self.id_to_piece.update({a["id"]: a["content"] for a in added})
        self.added_id_set = {a["id"] for a in added}
        self.char_to_byte = {c: b for b, c in _byte_to_char().items()}
        contents = sorted(self.added_ids, key=len, reverse=True)           # longest match first
        self._split = re.compile("(" + "|".join(map(re.escape, contents)) + ")") if contents else None
        self._bpe = lru_cache(maxsize=65536)(self._bpe_uncached)
        for name in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>",
                     "<|im_start|>"):
            if name not in self.added_ids:
                raise ValueError(f"tokenizer has no {name} token: not a Qwen2-style tokenizer")
        self.pad_id = self.added_ids["<|endoftext|>"]
        self.eos_id = self.added_ids["<|im_end|>"]
        self.image_pad_id = self.added_ids["<|image_pad|>"]
        self.vision_start_id = self.added_ids["<|vision_start|>"]
        self.vision_end_id = self.added_ids["<|vision_end|>"]
        self.im_start_id = self.added_ids["<|im_start|>"]

    def __len__(self) -> int:
        return max(self.id_to_piece) + 1

    # -------------------------------------------------------------------------- loading
    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        j = json.loads(Path(path).read_text(encoding="utf-8"))
        model = j["model"]
        if model.get("type", "BPE") != "BPE":
            raise ValueError(f"{path}: model type {model.get('type')} is not BPE")
        # two merge formats: "a b" strings (old files) or ["a", "b"] pairs (tokenizers >= 0.20). Byte-level
        # symbols never contain a real space (it is mapped to Ġ), so splitting on " " is unambiguous.
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        pattern = QWEN2_PATTERN
        pre = j.get("pre_tokenizer") or {}
        for p in pre.get("pretokenizers", [pre]):
            if p.get("type") == "Split":
                pattern = p["pattern"].get("Regex", pattern)
        added = [{"id": a["id"], "content": a["content"], "special": a.get("special", False)}
                 for a in j.get("added_tokens", [])]
        return cls(model["vocab"], merges, added, pattern)

    @classmethod
    def from_pretrained(cls, name_or_path) -> "Tokenizer":
        """A tokenizer.json file, a directory holding one, "tiny", or a Hub repo id (via the HF cache)."""
        if str(name_or_path).lower() == "tiny":
            return cls.tiny()
        p = Path(str(name_or_path)).expanduser()
        if p.is_file():
            return cls.from_file(p)
        if not p.is_dir():
            p = _resolve_checkpoint(str(name_or_path))
        if not (p / "tokenizer.json").exists():
            raise FileNotFoundError(f"{p} has no tokenizer.json")
        return cls.from_file(p / "tokenizer.json")

    def to_json(self) -> dict:
        """The HF tokenizers JSON (normaliser NFC, Split + ByteLevel pre-tokeniser, BPE, ByteLevel decoder)."""
        bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": a["id"], "content": a["content"], "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": a["special"]} for a in self.added],
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
                dict(bl)]},
            "post_processor": dict(bl), "decoder": dict(bl),
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": self.vocab, "merges": [list(m) for m in self.merges]},
        }

    def save(self, directory) -> Path:
        """Write DIR/tokenizer.json (loadable by HF `tokenizers` too)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.json").write_text(json.dumps(self.to_json(), ensure_ascii=False), encoding="utf-8")
        return d / "tokenizer.json"

    # -------------------------------------------------------------------------- encode / decode
    def _bpe_uncached(self, piece: str) -> tuple[int, ...]:
        """BPE on one pre-token (already byte-mapped): merge the lowest-rank adjacent pair, repeat.

        Example with merges [("l","o") rank 0, ("lo","w") rank 1, ("Ġ","low") rank 2] and piece "Ġlow":
        Ġ l o w -> Ġ lo w (rank 0) -> Ġ low (rank 1) -> Ġlow (rank 2) -> one token.
        Merge ranks, not frequencies, decide: the trained order IS the algorithm. Results are cached per
        piece because words repeat a lot in real text.
        """
        syms = list(piece)
        while len(syms) > 1:
            best, best_rank = None, None
            for i in range(len(syms) - 1):
                r = self.ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            a, b = syms[best], syms[best + 1]
            out, i = [], 0
            while i < len(syms):  # merge every occurrence of the winning pair, left to right
                if i < len(syms) - 1 and syms[i] == a and syms[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            syms = out
        try:
            return tuple(self.vocab[s] for s in syms)
        except KeyError as exc:
            raise ValueError(f"symbol {exc} is not in the vocabulary (no byte fallback)") from None

    def encode(self, text: str) -> list[int]:
        """str -> token ids (added/special tokens written literally in `text` become their ids)."""
        if not isinstance(text, str):
            raise TypeError(f"encode wants a str, got {type(text).__name__}")
        table = _byte_to_char()
        rx = _qwen2_regex()
        ids: list[int] = []
        # re.split with ONE capture group returns [text, token, text, token, ..., text]: even entries are
        # ordinary text (possibly empty), odd entries the added tokens that were matched literally
        chunks = self._split.split(text) if self._split else [text]
        for n, chunk in enumerate(chunks):
            if not chunk:
                continue
            if n % 2 == 1:                          # odd entries are the captured added tokens
                ids.append(self.added_ids[chunk])
                continue
            for piece in rx.findall(unicodedata.normalize("NFC", chunk)):
                ids.extend(self._bpe("".join(table[b] for b in piece.encode("utf-8"))))
        return ids

    def decode(self, ids) -> str:
        """token ids -> str (invalid UTF-8, e.g. a cut multi-byte char, becomes U+FFFD)."""
        out = bytearray()
        for i in (ids.tolist() if hasattr(ids, "tolist") else ids):
            piece = self.id_to_piece.get(int(i))
            if piece is None:
                continue  # ids past the tokenizer (embedding padding rows) decode to nothing
            if int(i) in self.added_id_set:
                out += piece.encode("utf-8")
            else:
                out += bytes(self.char_to_byte[c] for c in piece)
        return out.decode("utf-8", errors="replace")

    # -------------------------------------------------------------------------- training (tiny preset)
    @classmethod
    def train(cls, texts, vocab_size: int = TINY_BPE_SIZE) -> "Tokenizer":
        """Learn a byte-level BPE with `vocab_size` entries (256 bytes + vocab_size - 256 merges) and append
        the 22 Qwen special/added tokens after it, in Qwen's order.

        Classic BPE training: pre-tokenise exactly like encode, count words, then repeatedly add the most
        frequent adjacent symbol pair as a merge (ties broken by the pair's text, so it is deterministic).
        """
        if vocab_size < 256:
            raise ValueError("vocab_size must be >= 256 (the byte alphabet)")
        table = _byte_to_char()
        rx = _qwen2_regex()
        # words: each distinct pre-token as a tuple of byte-chars -> how often it occurs. Training works on
        # these counts, so the cost scales with the number of DISTINCT words, not the corpus length.
        words: dict[tuple[str, ...], int] = {}
        for text in texts:
            for piece in rx.findall(unicodedata.normalize("NFC", text)):
                w = tuple(table[b] for b in piece.encode("utf-8"))
                words[w] = words.get(w, 0) + 1
        vocab = {table[b]: b for b in range(256)}                          # ids 0..255 = the bytes
        merges: list[tuple[str, str]] = []
        word_list = [list(w) for w in words]
        counts = list(words.values())
        # Each round recounts all adjacent pairs (simple, O(merges x symbols); fine for a <1000-entry vocab;
        # a production trainer updates the counts incrementally instead).
        while len(vocab) < vocab_size:
            pairs: dict[tuple[str, str], int] = {}
            for w, c in zip(word_list, counts):
                for i in range(len(w) - 1):
                    pairs[(w[i], w[i + 1])] = pairs.get((w[i], w[i + 1]), 0) + c
            if not pairs:
                raise ValueError(f"corpus too small: only {len(vocab)} BPE entries could be learned")
            best = min(pairs, key=lambda p: (-pairs[p], p))
            merged = best[0] + best[1]
            merges.append(best)
            if merged not in vocab:
                vocab[merged] = len(vocab)
            for w in word_list:  # apply the merge in place, left to right
                i = 0
                while i < len(w) - 1:
                    if w[i] == best[0] and w[i + 1] == best[1]:
                        w[i:i + 2] = [merged]
                    i += 1
        # the specials follow the learned vocab in Qwen's order, so e.g. <|im_end|> = base + 2 and
        # <|image_pad|> = base + 12, exactly as 151645 = 151643 + 2 and 151655 = 151643 + 12 in the real vocab
        base = len(vocab)
        added = [{"id": base + i, "content": s, "special": s in QWEN_SPECIAL_TOKENS}
                 for i, s in enumerate(QWEN_SPECIAL_TOKENS + QWEN_ADDED_TOKENS)]
        return cls(vocab, merges, added)

    @classmethod
    @lru_cache(maxsize=1)
    def tiny(cls) -> "Tokenizer":
        """The tiny preset's tokenizer: 744 BPE entries learned from `tiny_corpus()` + the 22 Qwen specials
        (ids 744..765; Config.preset("tiny") has vocab 768). Trained in ~1 s and cached per process."""
        tok = cls.train(tiny_corpus(), TINY_BPE_SIZE)
        cfg = Config.preset("tiny")
        assert tok.eos_id == cfg.eos_token_id and tok.image_pad_id == cfg.image_token_id, "tiny ids drifted"
        return tok


TINY_CORPUS_LABELS = "assets/tiny_corpus_labels.txt"  # data.TAXONOMY's names, one a line (see tiny_corpus)


def tiny_corpus() -> list[str]:
    """Deterministic text the tiny tokenizer is trained on: chat-template words, the 8 caption fields and
    their usual values, and the Fitzpatrick17k label names of data.TAXONOMY (from TINY_CORPUS_LABELS)."""
    lines = [
        "system\nYou are a helpful assistant.", "user\n", "assistant\n",
        "Describe the skin lesion in this image.", "What is the most likely diagnosis? List up to six.",
        "colour: location: shape: lesion type: size: border: surface: distribution: none",
        "erythematous, salmon, pink, red, brown, dark brown, black, blue, white, yellow, violaceous, "
        "hyperpigmented, hypopigmented, skin-coloured, purple, grey, tan",
        "face, scalp, trunk, back, chest, abdomen, arm, forearm, hand, palm, finger, nail, leg, thigh, foot, "
        "sole, toe, neck, ear, lip, mouth, genital, groin, axilla, buttock, extensor surfaces, flexural",
        "round, oval, annular, irregular, linear, polygonal, targetoid, serpiginous, umbilicated, dome-shaped",
        "macule, patch, papule, plaque, nodule, vesicle, bulla, pustule, wheal, erosion, ulcer, crust, scar, "
        "cyst, tumour, telangiectasia, petechiae, purpura, lichenification, atrophy, excoriation",
        "small, medium, large, tiny, giant, less than 1 cm, 1 to 2 cm, more than 5 cm",
        "well-demarcated, ill-defined, regular, irregular, raised, rolled, sharp, blurred, pearly",
        "smooth, scaly, coarse silvery scale, crusted, ulcerated, verrucous, shiny, rough, keratotic, "
        "weeping, fissured, pitted, waxy, greasy, stuck-on",
        "single, scattered, grouped, clustered, symmetric, asymmetric, generalized, localized, dermatomal, "
        "linear, follicular, widespread, bilateral, unilateral",
        "1. 2. 3. 4. 5. 6. The most likely diagnosis is melanoma. Differential diagnosis: basal cell carcinoma, "
        "squamous cell carcinoma, seborrheic keratosis, psoriasis, eczema, acne, rosacea, vitiligo.",
        "A 45-year-old patient with Fitzpatrick skin type III presents with an itchy rash for 2 weeks.",
        "The lesion is benign. It may be malignant; a biopsy is recommended. Refer to a dermatologist.",
        "0 1 2 3 4 5 6 7 8 9 10 11 12 2024 3.5 mm 100% <think> </think>",
    ]
    # The Fitzpatrick17k label names (114 labels, then their 9 + 3 partition names), so that label tokens
    # are short. They come from data.TAXONOMY, but skinflow.py imports no project module (issue 14), so
    # they are read from a committed copy; test_skinflow.py checks that the copy equals
    # sorted(data.TAXONOMY) + the sorted set of its partition names, line for line.
    lines += (HERE / TINY_CORPUS_LABELS).read_text().splitlines()
    # each line several times so that common words win merges over rare ones
    return [ln for ln in lines for _ in range(3)]


# ===================================================================================================
# 8. Chat template and batching
#
# One prompt = system turn + user turn (image first, then text) + the opened assistant turn. The model
# then writes its answer and ends it with <|im_end|>, which is why generation stops on that id.
# Batches are LEFT padded: every row's last prompt token sits in the last column, so the first generated
# token of every row is produced by the same column and the KV cache stays rectangular.
# ===================================================================================================
DEFAULT_SYSTEM = "You are a helpful assistant."


def chat_prompt_ids(tokenizer: Tokenizer, text: str, grid_thw=None, system: str | None = DEFAULT_SYSTEM,
                    merge_size: int = 2) -> list[int]:
    """The Qwen2.5-VL Instruct template for [image, text] from the user, ready for the assistant to answer:

        <|im_start|>system\\n{system}<|im_end|>\\n
        <|im_start|>user\\n<|vision_start|><|image_pad|> x n<|vision_end|>{text}<|im_end|>\\n
        <|im_start|>assistant\\n

    n = (gh / 2) * (gw / 2) = (h'/28) * (w'/28). The image part is dropped when grid_thw is None, the system
    turn when system is None. Specials are inserted as ids, so a prompt cannot smuggle them in as text.
    """
    enc = tokenizer.encode
    ids: list[int] = []
    if system is not None:
        ids += [tokenizer.im_start_id] + enc("system\n" + system) + [tokenizer.eos_id] + enc("\n")
    ids += [tokenizer.im_start_id] + enc("user\n")
    if grid_thw is not None:
        t, gh, gw = (int(v) for v in grid_thw)
        n = t * (gh // merge_size) * (gw // merge_size)
        ids += [tokenizer.vision_start_id] + [tokenizer.image_pad_id] * n + [tokenizer.vision_end_id]
    ids += _encode_plain(tokenizer, text) + [tokenizer.eos_id] + enc("\n") + [tokenizer.im_start_id]
    ids += enc("assistant\n")
    return ids


def _encode_plain(tokenizer: Tokenizer, text: str) -> list[int]:
    """Encode user text WITHOUT turning literal special-token strings into control ids (prompt-injection
    safety): the text is cut at added-token strings and every piece, including those strings, is BPE'd."""
    if tokenizer._split is None:
        return tokenizer.encode(text)
    table, rx, ids = _byte_to_char(), _qwen2_regex(), []
    for chunk in tokenizer._split.split(text):
        for piece in rx.findall(unicodedata.normalize("NFC", chunk)):
            ids.extend(tokenizer._bpe("".join(table[b] for b in piece.encode("utf-8"))))
    return ids


def make_batch(tokenizer: Tokenizer, images, texts, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
               device="cpu", system: str | None = DEFAULT_SYSTEM) -> dict:
    """Images + user texts -> the kwargs of VLM.forward / VLM.generate (one image per prompt, LEFT padded):

    input_ids [B, T] (pad_id on the left), attention_mask [B, T], pixel_values [sum N, 1176],
    image_grid_thw [B, 3]. `images` may contain None for a text-only row.
    """
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    # pixel rows of all images are concatenated in batch order; the decoder matches them to the image-pad
    # blocks in the same order (row 0's image first), which is exactly how rope_positions walks them.
    rows, pix, grids = [], [], []
    for img, text in zip(images, texts):
        grid = None
        if img is not None:
            pv, grid = preprocess_image(img, min_pixels, max_pixels)
            pix.append(pv)
            grids.append(grid)
        rows.append(chat_prompt_ids(tokenizer, text, grid, system))
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "pixel_values": torch.cat(pix).to(device) if pix else None,
            "image_grid_thw": torch.tensor(grids, dtype=torch.long, device=device) if grids else None}


# ===================================================================================================
# 9. One-call loading (the command line moved to eval.py: `python eval.py generate|diagnose`)
# ===================================================================================================
# `load`: one name in, a ready (model, tokenizer) pair out. The entry points (rl.py, eval.py, bench.py) call
# dve.load, which is this function with the DVE hook (a SkinFlow checkpoint may hold FDLinear layers).
# The tiny preset is the CI / laptop workhorse: ~1 M parameters, a 112-px image is 16 LLM tokens, and a
# forward + 20-token generation of a batch of 2 takes well under a second on one CPU core.
def load(name_or_path_or_preset="tiny", dtype=torch.float32, device="cpu", seed: int = 0, convert=None):
    """-> (VLM, Tokenizer). "tiny": random weights (seeded) + the project's tiny tokenizer; "3b"/"7b" or a
    repo id / local dir: real weights and tokenizer via from_pretrained (the HF cache, or a download).
    `convert`: see VLM.from_pretrained; the entry points call dve.load, which passes dve.rebuild_dve."""
    name = str(name_or_path_or_preset)
    if name.lower() == "tiny":
        model = VLM(Config.preset("tiny"), seed=seed).to(device=device, dtype=dtype).eval()
        return model, Tokenizer.tiny()
    name = HUB_IDS.get(name.lower(), name)
    model = VLM.from_pretrained(name, dtype=dtype, device=device, convert=convert)
    tok_dir = Path(name) if Path(name).is_dir() else _resolve_checkpoint(name)
    return model, Tokenizer.from_pretrained(tok_dir)


# The command line moved up (issue 14): `python skinflow.py --image x.jpg` needs data.open_image and
# `diagnose` needs data, dve and eval.py, but skinflow.py imports no project module. The demo is now
# `python eval.py generate ...` (same flags) and `python eval.py diagnose IMAGE ...`.
MOVED_CLI = ("skinflow.py is the backbone library; its command line moved to eval.py: "
             "`python eval.py generate --preset tiny --image x.jpg --prompt ...` or "
             "`python eval.py diagnose IMAGE --model ...`")


def main(argv=None) -> int:
    """`python skinflow.py ...`: one line that points to eval.py's commands, exit status 2."""
    print(MOVED_CLI, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
