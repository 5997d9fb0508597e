"""bench.py: speed and memory of SkinFlow's fast paths, against their references and transformers (issue 7).

One command (on a CUDA machine, random weights of the real Qwen2.5-VL-3B / 7B shapes, bf16):

    PYTHONUNBUFFERED=1 python bench.py                    # every section, prints one table, writes JSON
    python bench.py --sections decode,logprob --quick     # a subset, fewer repetitions
    python bench.py --cpu-smoke                           # tiny shapes on the CPU (also automatic without CUDA)

What is measured (the rows of the README's performance table):
  decode    ms per decode step and tokens/s at batch 8 and 64 after a 256-token prompt: our static-cache
            decoder replayed as a CUDA graph, the same decoder eager (to show what the graph buys), and
            transformers' generate (difference of two generate lengths, so the prefill cancels out);
  logprob   log-prob of N = 4096 sampled tokens from bf16 logits [4096, 151936], forward + backward: the
            fused kernel (csrc/logprob*), its chunked PyTorch twin, and the naive log_softmax + gather;
            time and the memory allocated ON TOP of the logits;
  vision    the vision tower on 8 images of 448 x 448 (8192 patches), ours and transformers';
  policy    policy forward + backward on 8 x 512 tokens with per-layer gradient checkpointing: ours
            (chunked lm_head + fused log-prob) and transformers (full logits + log_softmax);
  grpo      one full GRPO step of the 3B (8 prompts with an image, G = 8): rollout, reference log-probs,
            policy log-probs + loss + backward per prompt, optimizer step; LoRA r = 64 trains;
  lora7b    peak memory of one 7B LoRA (r = 64) training micro-step (8 x 512 tokens) + optimizer step;
  fdlinear  FDLinear (DVE, K = 4) vs the static linear it replaces at real shapes (8 images x 1024
            tokens, 1280 -> 3420 and 3420 -> 1280), forward and forward + backward.

Correctness first: every fast path is compared with its reference on fresh random inputs BEFORE it is
timed (graph vs eager tokens, kernel vs float64, ours vs transformers logits / image features), and the
comparison lands in the JSON ("checks") and the table. Timing: CUDA events around the region, warm-up
first, median of several repetitions. Memory: torch.cuda.max_memory_allocated after a reset, minus what
was allocated before (so "extra" means extra), plus the model's own weights where a total is reported.

Nothing here is imported by the training code; transformers is optional (its columns say "n/a" without it).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

import skinflow as sf

GIB = float(2 ** 30)

# The targets of issue 7 (H100, bf16, random weights of the 3B shape) and the transformers 5.17 numbers
# measured when the issue was filed; the table prints them next to today's measurements.
TARGETS = {
    "decode_b64_ms": 6.0, "decode_b8_ms": 6.0, "logprob_ms": 1.5, "logprob_extra_gib": 1.3,
    "vision_ms": 30.0, "policy_ms": 200.0, "policy_peak_gib": 16.0,
}
ISSUE_BASELINE = {
    "decode_b64_ms": 85.9, "decode_b8_ms": 85.3, "logprob_ms": 12.0, "logprob_extra_gib": 8.1,
    "vision_ms": 179.0, "policy_ms": 284.0, "policy_peak_gib": 21.5,
}


# ===================================================================================================
# Shapes: the real ones on CUDA, tiny ones for the CPU smoke run (same code, so it never rots)
# ===================================================================================================
def shapes(smoke: bool, quick: bool) -> dict:
    """Every size the sections use. The smoke shapes keep the whole run to a few seconds on one core."""
    if smoke:
        return dict(preset="tiny", big_preset="tiny", decode_batches=(2, 4), prompt=16, decode_steps=4,
                    decode_reps=2, gen_new=6, lp_rows=64, lp_vocab=1000, lp_check_rows=16,
                    images=2, image_px=56, policy_batch=2, policy_len=32, grpo_prompts=2, grpo_G=2,
                    grpo_new=6, grpo_image_px=56, lora_rank=4, fd_images=2, fd_tokens=16, fd_dims=((64, 96), (96, 64)),
                    reps=2, warmup=1)
    return dict(preset="3b", big_preset="7b", decode_batches=(8, 64), prompt=256, decode_steps=16,
                decode_reps=3 if quick else 5, gen_new=128, lp_rows=4096, lp_vocab=151936, lp_check_rows=256,
                images=8, image_px=448, policy_batch=8, policy_len=512, grpo_prompts=8, grpo_G=8,
                grpo_new=128 if quick else 256, grpo_image_px=448, lora_rank=64, fd_images=8, fd_tokens=1024,
                fd_dims=((1280, 3420), (3420, 1280)), reps=5 if quick else 10, warmup=2)


# ===================================================================================================
# Measuring helpers
# ===================================================================================================
def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_ms(fn, dev, reps: int, warmup: int) -> float:
    """Median wall time of fn() in ms. CUDA: events recorded on the stream around each call (the GPU's own
    clock, no host timing of asynchronous work); CPU: perf_counter."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def wall_ms(fn, dev) -> float:
    """One call, synchronised before and after (for long, stateful things like a whole GRPO step)."""
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return (time.perf_counter() - t) * 1e3, out


def peak_extra_gib(fn, dev):
    """(GiB allocated at the peak of fn() beyond what was allocated before it, fn's result); None on CPU."""
    if dev.type != "cuda":
        return None, fn()
    sync(dev)
    gc.collect()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    out = fn()
    sync(dev)
    return (torch.cuda.max_memory_allocated(dev) - base) / GIB, out


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (the METHOD's error measure; NaN never passes a < test)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def param_gib(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / GIB


def free(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ===================================================================================================
# Models with random weights (never zeros: zeros hide unwritten outputs and make kernels look faster)
# ===================================================================================================
@torch.no_grad()
def randomize(model, seed: int, dev):
    """Weights ~ N(0, 0.02), biases ~ N(0, 0.02), norm scales ~ 1 + N(0, 0.05), drawn ON the device."""
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32)
        if name.endswith("norm.weight") or "layernorm" in name or "norm1" in name or "norm2" in name or "ln_q" in name:
            p.copy_(1.0 + 0.05 * noise)
        else:
            p.copy_(0.02 * noise)


def build_ours(preset: str, dtype, dev, seed: int = 0):
    """Our VLM with the preset's shape, built on the meta device (no memory, no init work), materialised
    directly in `dtype` on `dev`, then filled with random numbers on the device (fast even for 7B)."""
    cfg = sf.Config.preset(preset)
    with torch.device("meta"):
        m = sf.VLM(cfg, init=False)
    m = m.to(dtype).to_empty(device=dev)
    randomize(m, seed, dev)
    return m.eval()


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
        return True
    except Exception:
        return False


def build_hf_like(ours, dev):
    """transformers' Qwen2_5_VLForConditionalGeneration with OUR config (written as a Hub config.json)
    and OUR weights (Hub names -> transformers' in-memory names), in our dtype on our device."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(ours.cfg.to_dict()))
        hcfg = AutoConfig.from_pretrained(d)
    with contextlib.suppress(Exception):
        hcfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(ours.dtype)
    try:
        with torch.device(dev):
            hf = Qwen2_5_VLForConditionalGeneration(hcfg)
    finally:
        torch.set_default_dtype(old)
    hf = hf.eval()  # no .to(dtype): that would also round transformers' float32 RoPE buffers to bf16
    sd = {}
    for k, v in ours.state_dict().items():
        if k.startswith("visual."):
            sd["model." + k] = v
        elif k.startswith("model."):
            sd["model.language_model." + k[len("model."):]] = v
        else:
            sd[k] = v
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and ours.cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"weight transfer to transformers: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if ours.cfg.tie_word_embeddings:
        with torch.no_grad():
            hf.lm_head.weight = hf.model.language_model.embed_tokens.weight
    return hf


def hf_forward(hf, **kw):
    """transformers forward; mm_token_type_ids (image-token marks, needed by 5.2x for M-RoPE positions)
    is passed when this version takes it."""
    ids = kw["input_ids"]
    try:
        return hf(mm_token_type_ids=(ids == hf.config.image_token_id).int(), **kw)
    except (TypeError, ValueError):
        return hf(**kw)


def hf_image_features(hf, pixel_values, grid):
    out = hf.model.get_image_features(pixel_values, grid)
    feats = getattr(out, "pooler_output", out)
    return torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats


@contextlib.contextmanager
def _fdlinear_kernel(on: bool):
    """on=False hides the compiled fdlinear op from dve.py for a moment, so its PyTorch path runs."""
    import dve

    saved = dve._EXT
    if not on:
        dve._EXT = None
    try:
        yield
    finally:
        dve._EXT = saved


@contextlib.contextmanager
def layer_checkpointing(model):
    """Per-decoder-layer activation checkpointing for OUR model, applied from outside: each layer's
    forward runs under torch.utils.checkpoint while autograd records, so only layer inputs are kept."""
    wrapped = []
    for layer in model.model.layers:
        inner = layer.forward

        def fwd(*args, _inner=inner, **kw):
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kw)
            return _inner(*args, **kw)

        layer.forward = fwd
        wrapped.append(layer)
    try:
        yield model
    finally:
        for layer in wrapped:
            del layer.forward  # back to the class method


# ===================================================================================================
# Inputs
# ===================================================================================================
def text_ids(cfg, B, T, seed, dev):
    """Random ordinary-token ids (below every special token) [B, T], all real (no padding)."""
    g = torch.Generator().manual_seed(seed)
    hi = min(cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.image_token_id) - 1
    return torch.randint(0, hi, (B, T), generator=g).to(dev)


def image_batch(cfg, n, px, seed, dev, text=12):
    """n prompts, one random px x px image each: ids [n, T] = text <vs> pads <ve> text, pixel rows, grid."""
    g = torch.Generator().manual_seed(seed)
    side = px // cfg.vision.patch_size
    grid = torch.tensor([[1, side, side]] * n)
    n_img = side * side // cfg.vision.spatial_merge_size ** 2
    hi = min(cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.image_token_id) - 1
    rows = []
    for _ in range(n):
        a = torch.randint(0, hi, (text,), generator=g).tolist()
        b = torch.randint(0, hi, (text,), generator=g).tolist()
        rows.append(a + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id] + b)
    ids = torch.tensor(rows, device=dev)
    pix = torch.randn(n * side * side, 1176, generator=g).to(dev)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix, image_grid_thw=grid)


# ===================================================================================================
# The sections. Each returns a dict of numbers; checks go through `check(...)`.
# ===================================================================================================
class Bench:
    def __init__(self, args):
        self.args = args
        self.dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
        self.smoke = self.dev.type == "cpu"
        self.S = shapes(self.smoke, args.quick)
        self.dtype = torch.bfloat16 if self.dev.type == "cuda" else torch.float32
        self.use_hf = hf_available() and not args.no_hf
        self.out_dir = Path(args.out or os.environ.get("OUT") or "bench_out")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.results = {"meta": self.meta(), "sections": {}, "checks": [], "errors": {}}
        self.ours = None
        self.hf = None

    # ----------------------------------------------------------------------------- bookkeeping
    def meta(self) -> dict:
        m = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "python": platform.python_version(),
             "device": "cpu", "argv": sys.argv[1:]}
        if torch.cuda.is_available() and not self.args.cpu_smoke:
            p = torch.cuda.get_device_properties(0)
            m.update(device=p.name, sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / GIB, 1),
                     cuda=torch.version.cuda)
        if hf_available():
            import transformers
            m["transformers"] = transformers.__version__
        return m

    def log(self, msg):
        print(f"[bench {time.time() - self.t0:6.1f}s] {msg}", flush=True)

    def check(self, name, value, tol, kind="rel_err"):
        """Record one correctness comparison; value <= tol passes (NaN never does)."""
        ok = bool(value <= tol) if isinstance(value, (int, float)) and not math.isnan(value) else False
        self.results["checks"].append({"name": name, kind: value, "tol": tol, "ok": ok})
        self.log(f"check {name}: {kind} {value:.3g} (tol {tol:g}) {'OK' if ok else 'FAIL'}")
        return ok

    def save(self):
        (self.out_dir / "bench.json").write_text(json.dumps(self.results, indent=1, default=str))

    def model(self):
        if self.ours is None:
            self.log(f"building our {self.S['preset']} model ({self.dtype}, random weights) on {self.dev}")
            self.ours = build_ours(self.S["preset"], self.dtype, self.dev, seed=0)
        return self.ours

    def hf_model(self):
        if not self.use_hf:
            return None
        if self.hf is None:
            self.log("building transformers' model with the same weights")
            try:
                self.hf = build_hf_like(self.model(), self.dev)
            except Exception as exc:  # an incompatible transformers version: go on without its columns
                self.results["errors"]["transformers"] = f"{type(exc).__name__}: {exc}\n" + traceback.format_exc()[-1500:]
                self.log(f"transformers model unavailable ({type(exc).__name__}: {exc}); continuing without it")
                self.use_hf = False
                free(self.dev)
        return self.hf

    def drop_models(self):
        self.ours, self.hf = None, None
        free(self.dev)

    # ----------------------------------------------------------------------------- logprob
    def sec_logprob(self):
        import rl

        S, dev = self.S, self.dev
        N, V = S["lp_rows"], S["lp_vocab"]
        dt = self.dtype
        has_ext = rl._logprob_ext() is not None
        impls = (["ext"] if has_ext else []) + ["torch", "naive"]
        fn = {"ext": lambda x, y: rl.selective_log_softmax(x, y, impl="ext"),
              "torch": lambda x, y: rl.selective_log_softmax(x, y, impl="torch"),
              "naive": rl.selective_log_softmax_naive}
        out = {"N": N, "V": V, "dtype": str(dt), "ext_built": has_ext}
        # correctness on fresh random rows against float64 (with a -inf entry and a dominant logit)
        g = torch.Generator().manual_seed(1234)
        n = S["lp_check_rows"]
        xc = (torch.randn(n, V, generator=g) * 3).to(dt)
        xc[0, :5] = float("-inf")
        xc[1, 7] = 40.0
        yc = torch.randint(5, V, (n,), generator=g)
        gc_ = torch.randn(n, generator=g)
        ref_lp = torch.log_softmax(xc.double(), -1).gather(1, yc[:, None])[:, 0]
        ref_dx = (F.one_hot(yc, V).double() - torch.softmax(xc.double(), -1)) * gc_.double()[:, None]
        for impl in impls:
            x = xc.detach().clone().to(dev).requires_grad_(True)   # a fresh leaf per impl
            lp = fn[impl](x, yc.to(dev))
            (lp * gc_.to(dev)).sum().backward()
            self.check(f"logprob[{impl}] fwd vs float64", rel_err(lp, ref_lp), 1e-5)
            self.check(f"logprob[{impl}] bwd vs float64", rel_err(x.grad, ref_dx), 1e-2 if dt == torch.bfloat16 else 1e-5)
        # timing + memory at the real size, fresh random logits
        gd = torch.Generator(device=dev).manual_seed(99)
        logits = (torch.randn(N, V, generator=gd, device=dev, dtype=torch.float32) * 3).to(dt)
        idx = torch.randint(0, V, (N,), generator=gd, device=dev)
        gout = torch.randn(N, generator=gd, device=dev)
        for impl in impls:
            x = logits.detach().requires_grad_(True)

            def run(impl=impl, x=x):
                x.grad = None
                (fn[impl](x, idx) * gout).sum().backward()

            run()
            extra, _ = peak_extra_gib(run, dev)
            # x.grad of the previous call is freed inside run(): the extra includes the grad itself
            ms = time_ms(run, dev, S["reps"], S["warmup"])
            out[impl] = {"ms": ms, "extra_gib": extra}
            self.log(f"logprob {impl}: {ms:.3f} ms fwd+bwd, extra {extra if extra is None else round(extra, 3)} GiB")
            del x
            free(dev)
        return out

    # ----------------------------------------------------------------------------- vision
    @torch.no_grad()
    def sec_vision(self):
        S, dev = self.S, self.dev
        m, hf = self.model(), self.hf_model()
        cfg = m.cfg
        b = image_batch(cfg, S["images"], S["image_px"], seed=7, dev=dev)
        pix, grid = b["pixel_values"].to(self.dtype), b["image_grid_thw"]
        out = {"images": S["images"], "px": S["image_px"], "patches": int(pix.shape[0])}
        ours = m.encode_images(pix, grid)
        if hf is not None:
            ref = hf_image_features(hf, pix, grid.to(dev))
            self.check("vision ours vs transformers (same weights)", rel_err(ours, ref),
                       3e-2 if self.dtype == torch.bfloat16 else 1e-4)
        out["ours_ms"] = time_ms(lambda: m.encode_images(pix, grid), dev, S["reps"], S["warmup"])
        if hf is not None:
            gd = grid.to(dev)
            out["hf_ms"] = time_ms(lambda: hf_image_features(hf, pix, gd), dev, max(2, S["reps"] // 2), 1)
        self.log(f"vision: ours {out['ours_ms']:.1f} ms, transformers {out.get('hf_ms', float('nan')):.1f} ms")
        return out

    # ----------------------------------------------------------------------------- parity (logits)
    @torch.no_grad()
    def sec_parity(self):
        """Ours vs transformers on the same weights and inputs (2 prompts with an image each): logits."""
        m, hf = self.model(), self.hf_model()
        if hf is None:
            return {"skipped": "transformers not installed"}
        b = image_batch(m.cfg, 2, self.S["image_px"], seed=11, dev=self.dev)
        b["pixel_values"] = b["pixel_values"].to(self.dtype)
        ours = m(**b).float()
        ref = hf_forward(hf, input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"].to(self.dev)).logits.float()
        err = rel_err(ours, ref)
        agree = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
        self.check(f"logits ours vs transformers ({self.S['preset']} shape, image prompts)", err,
                   5e-2 if self.dtype == torch.bfloat16 else 1e-4)
        return {"rel_err": err, "argmax_agree": agree, "T": int(b["input_ids"].shape[1])}

    # ----------------------------------------------------------------------------- decode
    @torch.no_grad()
    def _ours_decode_ms(self, m, ids, graph: bool):
        S, dev = self.S, self.dev
        steps, reps = S["decode_steps"], S["decode_reps"]
        total = 1 + 2 + steps * (reps + 1) + 2
        dec = sf.StaticDecoder(m, ids, torch.ones_like(ids), total, 1.0, 1.0, True, None, None)
        dec.record(dec.prefill(None, None, None))
        if graph:
            dec.capture()
            if dec.graph is None:
                raise RuntimeError("CUDA graph capture failed (see the warning above)")
        step = dec.replay if graph else dec.step

        def run():
            for _ in range(steps):
                step()

        ms = time_ms(run, dev, reps, 1) / steps
        dec.release()
        return ms

    @torch.no_grad()
    def _hf_decode_ms(self, hf, ids):
        S, dev = self.S, self.dev
        cfg = self.model().cfg
        n1, n2 = 2, 2 + S["decode_steps"]

        def gen(n):
            kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id)
            return hf.generate(**kw)

        gen(n1)  # warm-up
        t1 = min(wall_ms(lambda: gen(n1), dev)[0] for _ in range(2))
        t2 = min(wall_ms(lambda: gen(n2), dev)[0] for _ in range(2))
        return (t2 - t1) / (n2 - n1)

    def sec_decode(self):
        S, dev = self.S, self.dev
        m, hf = self.model(), self.hf_model()
        cfg = m.cfg
        out = {"prompt": S["prompt"], "steps_timed": S["decode_steps"]}
        # correctness: graph replay vs eager static decoding, greedy, same prompts -> same tokens
        ids = text_ids(cfg, S["decode_batches"][0], S["prompt"], seed=5, dev=dev)
        if dev.type == "cuda":
            import warnings
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                a = m.generate(ids, max_new_tokens=24, greedy=True, cuda_graph=True)
            capture_failed = [str(w.message) for w in caught if "capture" in str(w.message)]
            out["graph_capture_error"] = capture_failed[0] if capture_failed else None
            self.check("decode CUDA graph captured (failures)", float(len(capture_failed)), 0, "count")
            b = m.generate(ids, max_new_tokens=24, greedy=True, cuda_graph=False)
            same = bool(torch.equal(a.tokens, b.tokens))
            self.check("decode CUDA graph vs eager: greedy tokens differ (count)", float((a.tokens != b.tokens).sum()), 0, "count")
            self.check("decode CUDA graph vs eager: log-probs", float((a.logprobs - b.logprobs).abs().max()), 1e-3, "max_abs")
            out["graph_equals_eager"] = same
        # correctness: the static-cache decoder vs a cache-free forward over prompt + completion
        with torch.no_grad():
            g = m.generate(ids[:2], max_new_tokens=8, greedy=True, cuda_graph=False, output_logits=True)
            full = m(torch.cat([ids[:2], g.tokens], 1)).float()[:, S["prompt"] - 1:S["prompt"] - 1 + g.tokens.shape[1]]
        self.check("decode cached logits vs full recompute", rel_err(g.logits, full),
                   3e-2 if self.dtype == torch.bfloat16 else 1e-5)
        for B in S["decode_batches"]:
            ids = text_ids(cfg, B, S["prompt"], seed=B, dev=dev)
            row = {}
            if dev.type == "cuda":
                try:
                    row["graph_ms"] = self._ours_decode_ms(m, ids, graph=True)
                except Exception as exc:  # keep the eager and transformers numbers of this batch size
                    row["graph_error"] = f"{type(exc).__name__}: {exc}"
                    self.log(f"decode B={B}: graph path failed: {row['graph_error']}")
            row["eager_ms"] = self._ours_decode_ms(m, ids, graph=False)
            best = row.get("graph_ms", row["eager_ms"])
            row["tok_s"] = B / best * 1e3
            if hf is not None:
                row["hf_ms"] = self._hf_decode_ms(hf, ids)
                row["hf_tok_s"] = B / row["hf_ms"] * 1e3
            # end to end: prefill + capture + sampling, tokens per second of generate() itself
            gen = torch.Generator(device=dev).manual_seed(0)
            ms, res = wall_ms(lambda: m.generate(ids, max_new_tokens=S["gen_new"], generator=gen), dev)
            row["generate_ms"] = ms
            row["generate_tokens"] = int(res.mask.sum())
            row["generate_tok_s"] = row["generate_tokens"] / ms * 1e3
            out[f"b{B}"] = row
            self.log(f"decode B={B}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in row.items()))
            free(dev)
        return out

    # ----------------------------------------------------------------------------- policy fwd + bwd
    def sec_policy(self):
        import rl

        S, dev = self.S, self.dev
        m, hf = self.model(), self.hf_model()
        B, T = S["policy_batch"], S["policy_len"]
        ids = text_ids(m.cfg, B, T, seed=3, dev=dev)
        prompt = {"input_ids": ids[:, :1], "attention_mask": torch.ones_like(ids[:, :1])}
        comp, cmask = ids[:, 1:], torch.ones(B, T - 1, device=dev)
        out = {"B": B, "T": T, "trainable": "whole LLM (vision frozen)"}
        rl.set_trainable(m, lora=False, dve_layers=False, llm=True)
        m.train()

        def ours_step():
            for p in m.parameters():
                p.grad = None
            with layer_checkpointing(m):
                lp = rl.completion_logprobs(m, prompt, comp, cmask)               # [B, T-1] float32
            loss = -(lp * cmask).sum() / cmask.sum()
            loss.backward()
            return lp.detach()

        lp_ours = ours_step()
        extra, _ = peak_extra_gib(ours_step, dev)
        out["ours_ms"] = time_ms(ours_step, dev, max(2, S["reps"] // 2), 1)
        out["ours_peak_gib"] = None if extra is None else extra + param_gib(m)
        for p in m.parameters():
            p.grad = None
            p.requires_grad_(False)
        m.eval()
        free(dev)
        if hf is not None:
            for p in hf.parameters():
                p.requires_grad_(False)
            for p in hf.model.language_model.parameters():
                p.requires_grad_(True)
            hf.train()
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

            def hf_step():
                for p in hf.parameters():
                    p.grad = None
                logits = hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits  # [B, T, V]
                lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, comp[..., None])[..., 0]
                loss = -lp.mean()
                loss.backward()
                return lp.detach()

            lp_hf = hf_step()
            # centred per-token log-probs (the mean is ~ -log V for random weights and would hide errors)
            self.check("policy log-probs ours vs transformers", rel_err(lp_ours - lp_ours.mean(), lp_hf - lp_hf.mean()),
                       1e-2 if self.dtype == torch.bfloat16 else 1e-4)
            extra, _ = peak_extra_gib(hf_step, dev)
            out["hf_ms"] = time_ms(hf_step, dev, max(2, S["reps"] // 2), 1)
            out["hf_peak_gib"] = None if extra is None else extra + param_gib(hf)
            for p in hf.parameters():
                p.grad = None
                p.requires_grad_(False)
            hf.gradient_checkpointing_disable()
            hf.eval()
            free(dev)
        self.log("policy: " + ", ".join(f"{k} {v}" for k, v in out.items()))
        return out

    # ----------------------------------------------------------------------------- one GRPO step
    def sec_grpo(self):
        import rl

        S, dev = self.S, self.dev
        self.hf = None  # the step needs the memory; transformers is not part of it
        free(dev)
        m = self.model()
        P, G = S["grpo_prompts"], S["grpo_G"]
        if not any(isinstance(x, rl.LoRALinear) for x in m.modules()):
            rl.apply_lora(m, rank=S["lora_rank"], alpha=2.0 * S["lora_rank"])
            m.to(dev)
            with torch.no_grad():  # B = 0 would make policy == reference: draw it too
                for lyr in rl.lora_layers(m):
                    lyr.lora_B.normal_(0, 0.01)
        counts = rl.set_trainable(m, lora=True, dve_layers=False, llm=False)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-6)
        batch = image_batch(m.cfg, P, S["grpo_image_px"], seed=21, dev=dev)
        batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        gen = torch.Generator(device=dev).manual_seed(1)
        phases = {}

        def step():
            t = time.perf_counter()
            m.eval()
            with torch.no_grad():
                emb = m.encode_images(batch["pixel_values"], batch["image_grid_thw"])   # [sum M, D]
                big, big_emb = rl._repeat_groups(batch, emb, G)                          # [P*G, T0]
                roll = m.generate(big["input_ids"], big["attention_mask"], None, big["image_grid_thw"],
                                  max_new_tokens=S["grpo_new"], temperature=1.0, generator=gen, image_embeds=big_emb)
            sync(dev)
            phases["rollout_ms"] = (time.perf_counter() - t) * 1e3
            phases["completion_tokens"] = int(roll.mask.sum())
            t = time.perf_counter()
            # rewards would come from rl.reward_caption / reward_differential on decoded text; random
            # rewards cost the same GPU work and need no tokenizer
            rewards = torch.rand(P * G, generator=torch.Generator().manual_seed(2))
            adv = rl.group_advantages(rewards, G).to(dev)
            mask = roll.mask
            with torch.no_grad(), rl.reference_policy(m):
                ref = rl.completion_logprobs(m, big, roll.tokens, mask, image_embeds=big_emb)
            sync(dev)
            phases["reference_ms"] = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            m.train()
            n_tok = float(mask.sum())
            for b0 in range(P):  # micro-batch = one prompt's G completions
                sub, sub_emb = rl._slice_batch(big, big_emb, b0, b0 + 1, G)
                rows = slice(b0 * G, (b0 + 1) * G)
                with layer_checkpointing(m):
                    lp = rl.completion_logprobs(m, sub, roll.tokens[rows], mask[rows], image_embeds=sub_emb)
                loss, _ = rl.grpo_loss(lp, roll.logprobs[rows], ref[rows], adv[rows], mask[rows],
                                       num_tokens=n_tok, num_seqs=P * G, max_len=S["grpo_new"])
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(dev)
            phases["train_ms"] = (time.perf_counter() - t) * 1e3
            return roll

        extra, _ = peak_extra_gib(step, dev)
        first = dict(phases)
        ms, _ = wall_ms(step, dev)
        out = {"prompts": P, "G": G, "max_new_tokens": S["grpo_new"], "lora_rank": S["lora_rank"],
               "trainable_params": counts["lora"], "step_ms": ms, **phases,
               "first_step": first, "peak_gib": None if extra is None else extra + param_gib(m) - 0.0}
        self.log("grpo: " + ", ".join(f"{k} {v}" for k, v in out.items()))
        m.eval()
        return out

    # ----------------------------------------------------------------------------- 7B LoRA memory
    def sec_lora7b(self):
        import rl

        S, dev = self.S, self.dev
        self.drop_models()
        self.log(f"building {S['big_preset']} for the LoRA memory test")
        m = build_ours(S["big_preset"], self.dtype, dev, seed=1)
        rl.apply_lora(m, rank=S["lora_rank"], alpha=2.0 * S["lora_rank"])
        m.to(dev)
        counts = rl.set_trainable(m, lora=True, dve_layers=False, llm=False)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-6)
        B, T = S["policy_batch"], S["policy_len"]
        ids = text_ids(m.cfg, B, T, seed=4, dev=dev)
        prompt = {"input_ids": ids[:, :1], "attention_mask": torch.ones_like(ids[:, :1])}
        comp, cmask = ids[:, 1:], torch.ones(B, T - 1, device=dev)
        m.train()

        def step():
            with layer_checkpointing(m):
                lp = rl.completion_logprobs(m, prompt, comp, cmask)
            (-(lp * cmask).sum() / cmask.sum()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if dev.type == "cuda":
            sync(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        ms, _ = wall_ms(step, dev)   # the first step allocates the AdamW states: the true peak
        out = {"preset": S["big_preset"], "lora_rank": S["lora_rank"], "trainable_params": counts["lora"],
               "weights_gib": param_gib(m), "first_step_ms": ms,
               "peak_gib": torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else None}
        self.log("lora7b: " + ", ".join(f"{k} {v}" for k, v in out.items()))
        del m, opt, params
        free(dev)
        return out

    # ----------------------------------------------------------------------------- FDLinear
    def sec_fdlinear(self):
        import dve

        S, dev, dt = self.S, self.dev, self.dtype
        n_img, n_tok = S["fd_images"], S["fd_tokens"]
        cu = torch.arange(0, (n_img + 1) * n_tok, n_tok, dtype=torch.int32, device=dev)   # [n_img + 1]
        out = {"images": n_img, "tokens_per_image": n_tok, "K": dve.DEFAULT_K,
               "kernel_built": dve._extension() is not None}
        g = torch.Generator(device=dev).manual_seed(5)
        for d_in, d_out in S["fd_dims"]:
            lin = torch.nn.Linear(d_in, d_out, device=dev, dtype=torch.float32)
            with torch.no_grad():
                lin.weight.normal_(0, 0.02, generator=g)
                lin.bias.normal_(0, 0.02, generator=g)
            ref_layer = dve.FDLinear(lin, dve.DEFAULT_K)
            with torch.no_grad():
                for p in ref_layer.ksm.parameters():
                    p.normal_(0, 0.1, generator=g)
            layer = dve.FDLinear(lin, dve.DEFAULT_K)
            layer.load_state_dict(ref_layer.state_dict())
            layer = layer.to(dt)
            x = (torch.randn(n_img * n_tok, d_in, generator=g, device=dev) + torch.randn(n_img, 1, d_in, generator=g, device=dev)
                 .expand(n_img, n_tok, d_in).reshape(-1, d_in)).to(dt)
            W, bias = lin.weight.to(dt), lin.bias.to(dt)
            ref_layer.impl = "reference"
            with torch.no_grad():
                want = ref_layer(x.float(), cu)                                            # fp32 reference
            row = {}
            # "bases" runs the csrc mix-on-load op when it is built; "bases_torch" is the same math in
            # PyTorch (einsum + bmm); "spectral" builds each image's weight with one batched irfft2
            impls = ["bases", "spectral"] + (["bases_torch"] if out["kernel_built"] else [])
            for impl in impls:
                layer.impl = impl.replace("_torch", "")
                with torch.no_grad(), _fdlinear_kernel(impl != "bases_torch"):
                    got = layer(x, cu)
                self.check(f"fdlinear {d_in}->{d_out} [{impl}] vs fp32 reference", rel_err(got, want),
                           2e-2 if dt == torch.bfloat16 else 1e-4)
            xg = x.detach().requires_grad_(True)

            def static_fwd():
                return F.linear(x, W, bias)

            def static_fb():
                xg.grad = None
                F.linear(xg, W, bias).sum().backward()

            row["static_fwd_ms"] = time_ms(static_fwd, dev, S["reps"], S["warmup"])
            row["static_fwdbwd_ms"] = time_ms(static_fb, dev, S["reps"], S["warmup"])
            for impl in impls:
                layer.impl = impl.replace("_torch", "")
                on = impl != "bases_torch"

                def fd_fwd(on=on):
                    with torch.no_grad(), _fdlinear_kernel(on):
                        return layer(x, cu)

                def fd_fb(on=on):
                    xg.grad = None
                    for p in layer.ksm.parameters():
                        p.grad = None
                    with _fdlinear_kernel(on):
                        layer(xg, cu).sum().backward()

                row[f"{impl}_fwd_ms"] = time_ms(fd_fwd, dev, S["reps"], S["warmup"])
                row[f"{impl}_fwdbwd_ms"] = time_ms(fd_fb, dev, S["reps"], S["warmup"])
                row[f"{impl}_fwd_x"] = row[f"{impl}_fwd_ms"] / row["static_fwd_ms"]
            out[f"{d_in}x{d_out}"] = row
            self.log(f"fdlinear {d_in}->{d_out}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
            free(dev)
        return out

    # ----------------------------------------------------------------------------- driver
    # Model sections first; the two csrc kernels last: a kernel that faults (illegal address) poisons the
    # CUDA context of the whole process, so it must not be able to take the other numbers with it.
    SECTIONS = ("parity", "vision", "decode", "policy", "grpo", "lora7b", "logprob", "fdlinear")

    def run(self, sections):
        for name in sections:
            if time.time() - self.t0 > self.args.budget_s:
                self.results["errors"][name] = f"skipped: past the {self.args.budget_s:.0f} s budget"
                self.log(f"SKIP {name} (time budget)")
                continue
            self.log(f"--- {name}")
            t = time.time()
            try:
                self.results["sections"][name] = getattr(self, f"sec_{name}")()
            except Exception as exc:  # one broken section must not lose the others' numbers
                self.results["errors"][name] = f"{type(exc).__name__}: {exc}\n" + traceback.format_exc()[-2000:]
                self.log(f"ERROR in {name}: {type(exc).__name__}: {exc}")
                if "out of memory" in str(exc).lower():
                    self.drop_models()
                free(self.dev)
            self.results["sections"].setdefault(name, {})["section_s"] = round(time.time() - t, 1)
            self.save()
        table = self.table()
        print(table, flush=True)
        (self.out_dir / "bench.md").write_text(table + "\n")
        self.save()
        return self.results

    # ----------------------------------------------------------------------------- the table
    def table(self) -> str:
        r, s = self.results, self.results["sections"]
        meta = r["meta"]

        def get(sec, *keys):
            v = s.get(sec, {})
            for k in keys:
                v = v.get(k) if isinstance(v, dict) else None
            return v

        def f(v, unit="", nd=1):
            return "n/a" if v is None else f"{v:.{nd}f}{unit}"

        def met(v, key):
            return "" if v is None or self.smoke else ("yes" if v <= TARGETS[key] else "NO")

        rows = []
        bs = self.S["decode_batches"]
        for B, key in ((bs[1], "decode_b64_ms"), (bs[0], "decode_b8_ms")):
            ours = get("decode", f"b{B}", "graph_ms") or get("decode", f"b{B}", "eager_ms")
            tok = get("decode", f"b{B}", "tok_s")
            hf = get("decode", f"b{B}", "hf_ms")
            rows.append((f"decode step, batch {B}, {self.S['prompt']}-token prompt",
                         f"{f(hf, ' ms', 1)}" + (f" ({get('decode', f'b{B}', 'hf_tok_s'):.0f} tok/s)" if hf else ""),
                         f"{f(ours, ' ms', 2)}" + (f" ({tok:.0f} tok/s)" if tok else ""),
                         f"{f(get('decode', f'b{B}', 'eager_ms'), ' ms', 2)} eager", f"<= {TARGETS[key]} ms", met(ours, key)))
        lp = s.get("logprob", {})
        best = lp.get("ext") or lp.get("torch") or {}
        naive = lp.get("naive") or {}
        rows.append((f"log-prob fwd+bwd, logits [{self.S['lp_rows']}, {self.S['lp_vocab']}]",
                     f"{f(naive.get('ms'), ' ms', 2)}, {f(naive.get('extra_gib'), ' GiB', 2)} (naive, ours)",
                     f"{f(best.get('ms'), ' ms', 2)}, {f(best.get('extra_gib'), ' GiB', 2)} ({'kernel' if 'ext' in lp else 'torch twin'})",
                     f"torch twin {f((lp.get('torch') or {}).get('ms'), ' ms', 2)}",
                     "<= 1.5 ms, <= 1.3 GiB",
                     met(best.get("ms"), "logprob_ms") + ("" if best.get("extra_gib") is None else
                                                         "/" + met(best.get("extra_gib"), "logprob_extra_gib"))))
        rows.append((f"vision tower, {self.S['images']} images {self.S['image_px']}x{self.S['image_px']}",
                     f(get("vision", "hf_ms"), " ms"), f(get("vision", "ours_ms"), " ms"), "", "<= 30 ms",
                     met(get("vision", "ours_ms"), "vision_ms")))
        rows.append((f"policy fwd+bwd, {self.S['policy_batch']} x {self.S['policy_len']}, grad ckpt",
                     f"{f(get('policy', 'hf_ms'), ' ms')}, {f(get('policy', 'hf_peak_gib'), ' GiB')}",
                     f"{f(get('policy', 'ours_ms'), ' ms')}, {f(get('policy', 'ours_peak_gib'), ' GiB')}", "",
                     "<= 200 ms, <= 16 GiB", met(get("policy", "ours_ms"), "policy_ms") + "/" +
                     met(get("policy", "ours_peak_gib"), "policy_peak_gib")))
        g = s.get("grpo", {})
        rows.append((f"GRPO step ({self.S['preset']}, {g.get('prompts', '?')} prompts x G={g.get('G', '?')}, "
                     f"{g.get('max_new_tokens', '?')} new tokens, LoRA r={g.get('lora_rank', '?')})", "",
                     f"{f(g.get('step_ms', None) and g['step_ms'] / 1e3, ' s', 2)}, peak {f(g.get('peak_gib'), ' GiB')}",
                     f"rollout {f(g.get('rollout_ms'), ' ms', 0)} / ref {f(g.get('reference_ms'), ' ms', 0)} / "
                     f"train {f(g.get('train_ms'), ' ms', 0)}", "", ""))
        l7 = s.get("lora7b", {})
        rows.append((f"{self.S['big_preset']} LoRA r={l7.get('lora_rank', '?')} train step, {self.S['policy_batch']} x "
                     f"{self.S['policy_len']}", "", f"peak {f(l7.get('peak_gib'), ' GiB')}",
                     f"weights {f(l7.get('weights_gib'), ' GiB')}", "", ""))
        fd = s.get("fdlinear", {})
        for d_in, d_out in self.S["fd_dims"]:
            row = fd.get(f"{d_in}x{d_out}", {})
            rows.append((f"FDLinear K=4 {d_in}->{d_out}, {self.S['fd_images']} img x {self.S['fd_tokens']} tok",
                         "", f"static {f(row.get('static_fwd_ms'), ' ms', 3)} / bases {f(row.get('bases_fwd_ms'), ' ms', 3)} "
                         f"/ spectral {f(row.get('spectral_fwd_ms'), ' ms', 3)} (fwd)",
                         f"fwd+bwd: static {f(row.get('static_fwdbwd_ms'), ' ms', 3)} / bases "
                         f"{f(row.get('bases_fwdbwd_ms'), ' ms', 3)}", "", ""))
        head = ("| what | transformers | ours | notes | target | met |\n|---|---|---|---|---|---|")
        lines = [f"# bench.py: {meta.get('device')} | torch {meta.get('torch')} | transformers "
                 f"{meta.get('transformers', 'n/a')} | {meta.get('date')}" +
                 (" | CPU SMOKE RUN (tiny shapes, numbers meaningless)" if self.smoke else ""), "", head]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        n_ok = sum(c["ok"] for c in r["checks"])
        lines += ["", f"correctness checks: {n_ok}/{len(r['checks'])} passed"]
        lines += [f"  FAIL {c['name']}: {c}" for c in r["checks"] if not c["ok"]]
        lines += [f"  section {k}: {v.splitlines()[0]}" for k, v in r["errors"].items()]
        return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="SkinFlow speed/memory benchmark (issue 7)")
    p.add_argument("--sections", default=",".join(Bench.SECTIONS),
                   help=f"comma-separated subset of {','.join(Bench.SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="fewer repetitions, shorter GRPO rollouts")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (automatic without CUDA)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else ./bench_out)")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="skip the remaining sections once this many seconds have passed")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in Bench.SECTIONS]
    if bad:
        print(f"bench.py: unknown section(s) {bad}; choose from {', '.join(Bench.SECTIONS)}", file=sys.stderr)
        return 2
    bench = Bench(args)
    bench.log(f"device {bench.results['meta']['device']}, dtype {bench.dtype}, transformers "
              f"{'on' if bench.use_hf else 'off'}, out {bench.out_dir}")
    res = bench.run(sections)
    return 0 if all(c["ok"] for c in res["checks"]) and not res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
