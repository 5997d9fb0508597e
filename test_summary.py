import json, math
from pathlib import Path
import numpy as np
import eval as sf_eval_sum
from PIL import Image


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
    assert sf_eval_sum.paired_bootstrap_delta([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)
    # b beats a on every case by exactly 1: no resample can change that
    assert sf_eval_sum.paired_bootstrap_delta([0, 0, 0, 0], [1, 1, 1, 1]) == (1.0, 1.0, 1.0)
    # 2 of 4 cases gain 1: delta 0.5; resample means are k/4 for k in 0..4, so the interval lies in [0, 1]
    d, lo, hi = sf_eval_sum.paired_bootstrap_delta([0, 0, 1, 1], [1, 1, 1, 1], n_boot=4000, seed=1)
    assert d == 0.5 and 0.0 <= lo < 0.5 < hi <= 1.0
    # the paired interval matches the textbook normal approximation on a large random sample
    rng = np.random.default_rng(7)
    a = rng.integers(0, 2, 2000)
    b = np.where(rng.random(2000) < 0.2, 1, a)        # b copies a, and flips ~10 % of cases to 1
    d, lo, hi = sf_eval_sum.paired_bootstrap_delta(a, b, n_boot=3000)
    diff = b - a
    half = 1.96 * diff.std(ddof=1) / math.sqrt(diff.size)
    assert abs(d - diff.mean()) < 1e-12
    assert abs((hi - lo) / 2 - half) < 0.25 * half


def test_sum_run_table_curves_and_ablation(tmp_path):
    rng = np.random.default_rng(0)
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
    row = tmp_path / "ablation" / "stage1_stage2_dve"
    _sum_write_stage(row, "stage2", better, truths)
    out = sf_eval_sum.summarize_run(tmp_path, n_boot=500)
    rows = {r["stage"]: r for r in out["rows"]}
    assert out["reference"] == "warmup" and rows["warmup"]["delta_top1"] is None
    d, lo, hi = rows["stage2"]["delta_top1"]
    assert abs(d - (sum(better) - sum(warm)) / 60) < 1e-12 and lo > 0      # every case gained or tied
    md = (tmp_path / "results.md").read_text()
    assert "Learning shown" in md and "29.19" in md and "stage2" in md
    png = Image.open(tmp_path / "curves.png")
    assert png.size[0] > 400 and png.size[1] >= 200
    # a stage evaluated on different images gets no paired Δ (it would compare apples with oranges)
    _sum_write_stage(tmp_path, "stage1", warm[:30], truths[:30])
    rows = {r["stage"]: r for r in sf_eval_sum.summarize_run(tmp_path, n_boot=200)["rows"]}
    assert rows["stage1"]["delta_top1"] is None
    assert sf_eval_sum.summary_main([str(tmp_path / "missing")]) == 2
