"""Peak memory and time of reading a large prompt file with ``FilePrompts``.

Writes a JSONL file of ``--rows`` rows (a 150-character question, an answer, a 420-character solution, an id and a
level: the prompt and answer columns are used, the other three travel as extra columns for rewards) to a temporary
folder, unless ``--file`` names one, then reads it with ``FilePrompts(...).train()`` in a fresh process and
prints the RSS after the imports, after reading, and the peak (``ru_maxrss``), in GiB, and the seconds.

    python benchmarks/prompt_file_memory.py [--rows 1000000] [--file prompts.jsonl --prompt-column question]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def write_rows(path: Path, rows: int) -> None:
    with path.open("w") as f:
        for i in range(rows):
            row = {
                "question": f"Question {i}: what is the sum of {i} and {i * 7}? " * 3,
                "answer": str(i * 8),
                "solution": f"We add {i} and {7 * i} step by step. " * 12,
                "id": i,
                "level": "hard",
            }
            f.write(json.dumps(row) + "\n")


def measure(path: str, prompt_column: str, answer_column: str) -> dict[str, float]:
    import resource
    import time

    def rss() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() / 2**30

    from gspo_lightning.data import FilePrompts

    imported = rss()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        records = FilePrompts(path, prompt_column=prompt_column, answer_column=answer_column, cache_dir=scratch).train()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"rows": len(records), "imported_gib": imported, "read_gib": rss(), "peak_gib": peak, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--file", help="read this file instead of writing one")
    parser.add_argument("--prompt-column", default="question")
    parser.add_argument("--answer-column", default="answer")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.file, args.prompt_column, args.answer_column)))
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(args.file) if args.file else Path(folder) / "prompts.jsonl"
        if not args.file:
            write_rows(path, args.rows)
        child = [sys.executable, __file__, "--measure", "--file", str(path)]
        child += ["--prompt-column", args.prompt_column, "--answer-column", args.answer_column]
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        size = path.stat().st_size / 2**20
    print(
        f"{result['rows']} rows ({size:.0f} MiB): RSS {result['imported_gib']:.2f} GiB after the imports,"
        f" {result['read_gib']:.2f} after reading, peak {result['peak_gib']:.2f}"
        f" ({result['peak_gib'] - result['imported_gib']:.2f} above the imports), {result['seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
