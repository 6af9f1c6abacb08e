"""The bad-input table: every case of tests/unit/test_bad_inputs.py run as a real
`python -m pipeline` subprocess, as a user types it. Prints case, exit code, seconds to fail and
the first line of the message.

    python benchmarks/bad_inputs.py                  # every case (about 5 s each on 2 cores)
    python benchmarks/bad_inputs.py --only jsonl     # the cases whose name contains "jsonl"

Run it alone: the seconds are mostly interpreter start and imports, which other processes on
the same cores slow down.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.unit.test_bad_inputs import CASES, make_bad_files


def first_message_line(stderr: str) -> str:
    """The pipeline's "error: ..." line, else the first line Hydra printed."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    chosen = next((line for line in lines if line.startswith("error:")), lines[0] if lines else "")
    return chosen if len(chosen) <= 200 else chosen[:197] + "..."


def run_case(overrides: list[str], env: dict[str, str], run_dir: Path) -> tuple[int, float, str]:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", *overrides, f"run.dir={run_dir}"], check=False, cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=600)
    return proc.returncode, time.perf_counter() - start, first_message_line(proc.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this text")
    args = parser.parse_args()
    # the runaway row, too big for the unit test: one 60 MB line under the default task.max_chars
    huge = ("jsonl one 60 MB row", ["task=jsonl", "run.stages=[pretrain]", "task.splits.eval={files}/good.jsonl",
                                    "task.splits.pretrain={files}/huge.jsonl"], {}, "huge.jsonl")
    cases = [case for case in [*CASES, huge] if args.only in case[0]]
    with tempfile.TemporaryDirectory() as tmp:
        files = make_bad_files(Path(tmp) / "files")
        if huge in cases:
            (files / "huge.jsonl").write_text(json.dumps({"text": "x" * 60_000_000}) + "\n")
        print("| case | exit code | seconds to fail | message (first line) |")
        print("| --- | --- | --- | --- |")
        codes = []
        for index, (name, overrides, env, _) in enumerate(cases):
            code, seconds, message = run_case([o.replace("{files}", str(files)) for o in overrides], env,
                                              Path(tmp) / f"run-{index}")
            codes.append(code)
            message = message.replace(str(files), "<files>").replace("|", "\\|")
            print(f"| {name} | {code} | {seconds:.1f} | {message} |", flush=True)
    print(f"\n{sum(c == 2 for c in codes)} of {len(codes)} cases exited 2")


if __name__ == "__main__":
    main()
