"""python .ci/identity_compare.py OLD_OUT NEW_OUT: are two runs of .ci/identity.sh the same run?

Issue 14 moves code without changing behaviour; this is its proof on the tiny chain. Every file the chain
wrote is compared:
  * *.safetensors (exported models, training checkpoints): every tensor bit for bit, and the metadata
  * *.json / *.jsonl (logs, metrics, predictions, cases, results, config, tokenizer): value for value,
    after dropping the fields that measure wall-clock time (keys ending in "_s", or naming time/eta/elapsed)
  * *.md: text, with each run folder's path replaced by "OUT" and timing numbers masked
  * *.png: bytes (they are drawn from the numbers above)
Prints one line per file and exits 1 when anything differs or a file exists on one side only.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

TIMING = re.compile(r"(_s$|time|elapsed|eta$|wall|per_s)")


def drop_timing(v):
    """The same JSON value without its wall-clock fields (recursively)."""
    if isinstance(v, dict):
        return {k: drop_timing(x) for k, x in v.items() if not TIMING.search(k)}
    if isinstance(v, list):
        return [drop_timing(x) for x in v]
    return v


def same_safetensors(a: Path, b: Path) -> str | None:
    from safetensors import safe_open
    import torch

    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        if sorted(fa.keys()) != sorted(fb.keys()):
            return "different tensor names"
        for k in fa.keys():
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return f"tensor {k} differs"
        ma, mb = fa.metadata() or {}, fb.metadata() or {}
    for meta in (ma, mb):
        for k in list(meta):
            try:
                meta[k] = drop_timing(json.loads(meta[k]))
            except ValueError:
                pass
    return None if drop_timing(ma) == drop_timing(mb) else "metadata differs"


def same_file(a: Path, b: Path, root_a: Path, root_b: Path) -> str | None:
    if a.suffix == ".safetensors":
        return same_safetensors(a, b)
    if a.suffix == ".json":
        return None if drop_timing(json.loads(a.read_text())) == drop_timing(json.loads(b.read_text())) else "values differ"
    if a.suffix == ".jsonl":
        ra = [drop_timing(json.loads(l)) for l in a.read_text().splitlines() if l.strip()]
        rb = [drop_timing(json.loads(l)) for l in b.read_text().splitlines() if l.strip()]
        if len(ra) != len(rb):
            return f"{len(ra)} vs {len(rb)} lines"
        bad = [i + 1 for i, (x, y) in enumerate(zip(ra, rb)) if x != y]
        return f"lines {bad[:5]} differ" if bad else None
    if a.suffix == ".md":
        def norm(p, root):
            t = p.read_text().replace(str(root), "OUT")
            return re.sub(r"\d+(\.\d+)?\s*(s|min|m\d+s)\b", "T", t)   # timings in the tables
        return None if norm(a, root_a) == norm(b, root_b) else "text differs"
    return None if a.read_bytes() == b.read_bytes() else "bytes differ"


def main(argv) -> int:
    old, new = Path(argv[0]), Path(argv[1])
    files_a = {p.relative_to(old) for p in old.rglob("*") if p.is_file()}
    files_b = {p.relative_to(new) for p in new.rglob("*") if p.is_file()}
    bad = 0
    for rel in sorted(files_a | files_b):
        if rel not in files_a or rel not in files_b:
            print(f"ONLY IN {'old' if rel in files_a else 'new'}: {rel}")
            bad += 1
            continue
        why = same_file(old / rel, new / rel, old, new)
        print(f"{'same' if why is None else 'DIFF'}  {rel}" + ("" if why is None else f"  ({why})"))
        bad += why is not None
    print(f"{len(files_a | files_b)} files, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
