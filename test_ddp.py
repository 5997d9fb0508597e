"""test_ddp.py: rl.py's distributed path (section 6, `torchrun --nproc_per_node N rl.py ...`) on the CPU.

Two processes with the gloo backend (torch.multiprocessing.spawn, the same environment variables torchrun
sets) run a few GRPO steps of the tiny preset. The oracle is the ONE-process trainer on the same global
batch: 2 ranks x B prompts must equal 1 process x 2B prompts (same data positions; --prompt-seeds makes the
completions of a prompt a function of its global data position, so both runs sample the same tokens).
Checked after every optimizer step:
  (a) the ranks hold bit-identical trainable tensors (gradients were summed, not left local);
  (b) those tensors equal the single-process run's within float tolerance (only the summation order of
      the loss and of the gradient all-reduce differs), and the logged global numbers agree;
plus: log / checkpoint written once, every rank's sampler state in the checkpoint, and a 2-rank run that
is stopped after 2 steps and resumed logs exactly what an uninterrupted 2-rank run logs.
How this test can fail: with a LOCAL token count as the token-mean normaliser (each rank dividing by its
own tokens) or averaged instead of summed gradients, (b) breaks by orders of magnitude more than the
tolerance (checked by hand when this was written; the update size is asserted to dwarf the tolerance).
"""
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rl

_DDP_WORLD = 2
_DDP_STEPS = 3
_DDP_ATOL = 1e-5  # weights move by ~2e-3 per step (lr 1e-3, mu = 2); summation-order noise stays < 3e-6
# (Adam amplifies it on near-zero gradient entries); a local normaliser misses by 1.4e-4 after one step
_DDP_FSDP = dict(train="llm", steps=2, prompts=2)  # full fine-tuning run (FSDP2 on the 2 ranks)
_DDP_DROP = ("step_s", "rollout_s", "sample")  # timing, and rank 0's first completion


def _ddp_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_fake_reward(stage, text, item):
    """Deterministic, non-trivial reward for the random tiny model's text: its share of vowels."""
    vow = sum(c in "aeiou" for c in text)
    return vow / max(len(text), 1), {"malformed": False, "format": 1.0, "rank": 0,
                                     **{f"field/{f}": 0.0 for f in rl._rl_caption_fields()}}


def _ddp_cfg(out, **kw):
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
    saved_reward = rl._stage_reward
    rl._stage_reward = _ddp_fake_reward
    try:
        single = _ddp_train(_ddp_cfg(out / "single", prompts=2 * _DDP_WORLD))
        single_fsdp = _ddp_train(_ddp_cfg(out / "single_fsdp", **{**_DDP_FSDP, "prompts": 2 * _DDP_WORLD}))
    finally:
        rl._stage_reward = saved_reward
        os.environ.update(mp_env)
    return {"ranks": ranks, "single": single, "single_fsdp": single_fsdp, "out": out}


def test_ddp_ranks_stay_in_sync(ddp_runs):
    r0, r1 = (r["equal"] for r in ddp_runs["ranks"])
    assert len(r0["snaps"]) == _DDP_STEPS + 1 and r0["names"] == r1["names"]
    for s, (a, b) in enumerate(zip(r0["snaps"], r1["snaps"])):
        for name, x, y in zip(r0["names"], a, b):
            assert torch.equal(x, y), f"rank 0 and rank 1 differ in {name} after step {s}"


def test_ddp_two_ranks_equal_one_process(ddp_runs):
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
    assert len({r["loss"] for r in la}) > 1 and any(r["zero_std_groups"] < r["groups"] for r in la)


def test_ddp_logs_and_checkpoints_written_once(ddp_runs):
    r0, r1 = (r["equal"] for r in ddp_runs["ranks"])
    assert len(r0["log"]) == _DDP_STEPS  # one line per step (rank 1 never appends)
    assert r0["log"][-1]["groups"] == 2 * _DDP_WORLD  # the groups of BOTH ranks are counted
    keys = ddp_runs["ranks"][0]["ckpt_keys"]
    assert {f"rng/sampler/rank{r}" for r in range(_DDP_WORLD)} <= set(keys)


def test_ddp_resume_continues_identically(ddp_runs):
    for r in ddp_runs["ranks"]:
        a = [{k: v for k, v in x.items() if k not in ("step_s", "rollout_s")} for x in r["straight"]]
        b = [{k: v for k, v in x.items() if k not in ("step_s", "rollout_s")} for x in r["resumed"]]
        assert a == b and len(a) == _DDP_STEPS


def test_ddp_fsdp_full_finetune_equals_one_process(ddp_runs):
    """--train llm on 2 ranks: FSDP2 shards the decoder layers; same numbers as one unsharded process."""
    r0, r1 = (r["fsdp"] for r in ddp_runs["ranks"])
    one = ddp_runs["single_fsdp"]
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
