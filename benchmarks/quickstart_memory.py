"""Peak memory of each quickstart phase (`make demo-train`), with and without gradient
checkpointing, each in a fresh process.

    python benchmarks/quickstart_memory.py --scale 0.25

Runs `logit2prompt quickstart --scale S --dtype fp32` twice into fresh folders, with
`--no-gradient-checkpointing` (before) and `--gradient-checkpointing` (after, the default),
and reads the peak resident memory the quickstart logs at the start of every phase (so each
phase's peak is read at the start of the next) and the child's final peak. Writes
benchmarks/results/quickstart_memory.json.
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from logit2prompt.evaluation.results import write_results

RESULTS = Path(__file__).parent / "results" / "quickstart_memory.json"
STAMP = re.compile(r"\[quickstart [0-9:]+, peak ([0-9.]+) GB\] (.*)")


def run(args: argparse.Namespace, checkpointing: bool, out: Path) -> dict:
    cmd = [
        str(Path(sys.executable).parent / "logit2prompt"),
        "quickstart",
        "--out",
        str(out),
        "--scale",
        str(args.scale),
        "--dtype",
        args.dtype,
        "--gradient-checkpointing" if checkpointing else "--no-gradient-checkpointing",
    ]  # not --no-progress: that also silences the log lines with the peaks
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    stamps = [(float(m[1]), m[2]) for m in STAMP.finditer(proc.stderr + proc.stdout)]
    # The peak logged when a phase starts closes the phase before it.
    phases: dict[str, float] = {}
    previous = "start-up"
    for peak, msg in stamps:
        phases[previous] = peak
        if msg.startswith("collecting"):
            previous = "collect " + msg.split()[2]
        elif msg.startswith("training the inverter"):
            previous = "training"
        elif msg.startswith("evaluating"):
            previous = "evaluation"
        elif msg.startswith("target:"):
            previous = "corpus + target"
        else:
            previous = msg.split(";")[0]
    return {
        "command": cmd[1:],
        "seconds": seconds,
        "phase_peak_gb": phases,
        # ru_maxrss of children is the largest child so far: only meaningful if it grew.
        "process_peak_gb": child_peak if child_peak * 1e6 > before else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--dtype", default="fp32", help="target weights (quickstart --dtype)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    results: dict = {"scale": args.scale, "dtype": args.dtype, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, checkpointing in (("before", False), ("after", True)):
            results["runs"][name] = run(args, checkpointing, Path(tmp) / name)
            write_results(args.results, results, command=["python", *sys.argv])
    phases = list(results["runs"]["before"]["phase_peak_gb"])
    print("| peak RSS (GB) at the end of | no gradient checkpointing | gradient checkpointing |")
    print("| --- | --- | --- |")
    for phase in phases:
        cells = [results["runs"][r]["phase_peak_gb"].get(phase) for r in ("before", "after")]
        print(f"| {phase} | " + " | ".join(f"{c:.2f}" if c else "-" for c in cells) + " |")
    for r in ("before", "after"):
        run_ = results["runs"][r]
        peak = run_["process_peak_gb"]
        print(f"{r}: {run_['seconds']:.0f} s, process peak {peak if peak else '-'} GB")


if __name__ == "__main__":
    main()
