"""What content fingerprints add to planning a run whose data is large (issue 17's figure).

Writes a JSONL corpus of --gb gigabytes, plans `run.stages=[pretrain,sft]` on it with task=jsonl
(the same file as pretrain and sft split), and prints the planning time with the fingerprints and
with them replaced by a constant, plus the fingerprint of the file alone, warm (in the page
cache) and, when run as root, cold (page cache dropped first).

    python benchmarks/fingerprint_planning.py --gb 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import artifacts, runner  # noqa: E402
from pipeline.config import compose_config  # noqa: E402


def write_corpus(path: Path, gigabytes: float) -> None:
    line = json.dumps({"text": "Q: 12+34=?\n12+34=46\nA: 46", "prompt": "12+34", "completion": "46", "answer": "46"}) + "\n"
    block = line * (1 << 20 // len(line))
    with open(path, "w") as f:
        for _ in range(int(gigabytes * (1 << 30) / len(block))):
            f.write(block)


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "corpus.jsonl"
        write_corpus(data, args.gb)
        size = data.stat().st_size
        cfg = compose_config([
            "preset=smoke", "task=jsonl", "run.stages=[pretrain,sft]", f"task.splits.pretrain={data}",
            f"task.splits.sft={data}", f"task.splits.eval={data}", f"run.dir={tmp}/run",
        ])
        plan = lambda: runner.plan_stages(cfg, Path(tmp) / "run")  # noqa: E731
        with_fingerprints = timed(plan)
        real = artifacts.fingerprint
        artifacts.fingerprint = lambda path, **_: "constant"
        try:
            without = timed(plan)
        finally:
            artifacts.fingerprint = real
        warm = timed(lambda: artifacts.fingerprint(data))
        cold = None
        if drop_page_cache():
            start = time.perf_counter()
            artifacts.fingerprint(data)
            cold = time.perf_counter() - start
    print(f"data file: {size / (1 << 30):.2f} GiB; plan_stages on [pretrain, sft], median of 5")
    print(f"  planning with content fingerprints   {with_fingerprints * 1000:8.1f} ms")
    print(f"  planning without (constant)          {without * 1000:8.1f} ms")
    print(f"  added by the fingerprints            {(with_fingerprints - without) * 1000:8.1f} ms")
    print(f"  one fingerprint of the file, warm    {warm * 1000:8.1f} ms")
    print(f"  one fingerprint of the file, cold    {'n/a (not root)' if cold is None else f'{cold * 1000:8.1f} ms'}")


if __name__ == "__main__":
    main()
