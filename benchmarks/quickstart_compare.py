"""Does a code change alter results? The quickstart, small and in fp32, on two checkouts.

    # each checkout in turn (PYTHONPATH picks the code; the old flat layout is found too):
    PYTHONPATH=/path/to/old/src python benchmarks/quickstart_compare.py run --out /tmp/qs-old \
        --dump /tmp/qs-old.json
    python benchmarks/quickstart_compare.py run --out /tmp/qs-new --dump /tmp/qs-new.json
    python benchmarks/quickstart_compare.py compare /tmp/qs-old.json /tmp/qs-new.json \
        --results benchmarks/results/quickstart_compare.json

`run` uses scale 0.1 (400 train prompts, 10 steps), 32 validation and 64 test prompts, fp32
target and decoding: minutes on any CPU, bf16 emulation avoided. `compare` lines rows up
(baseline rows renamed by the redesign are matched by their new name) and writes whether every
metric, CI and example is identical.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

RENAMED = {
    "nearest neighbour (train)": "nearest neighbour",
    "constant guess (train)": "constant guess",
}


def run(out: str, dump: str) -> None:
    import logit2prompt

    try:
        qs = importlib.import_module("logit2prompt.recipes.quickstart")
    except ImportError:  # before the redesign
        qs = importlib.import_module("logit2prompt.quickstart")
    qs.TEST_PROMPTS, qs.VAL_PROMPTS = 64, 32
    cfg = qs.QuickstartConfig(out=out, scale=0.1, dtype="fp32", bf16_decoding=False, progress=False)
    t0 = time.time()
    report = qs.run_quickstart(cfg)
    Path(dump).write_text(
        json.dumps(
            {
                "code": logit2prompt.__file__,
                "results": report["results"],
                "examples": report["examples"],
                "seconds": time.time() - t0,
            },
            indent=1,
        )
    )


def compare(a_path: str, b_path: str, results: str | None) -> None:
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    rows = {}
    for name, scores in a["results"].items():
        other = b["results"].get(RENAMED.get(name, name))
        rows[RENAMED.get(name, name)] = {
            "identical": scores == other,
            **{
                m: [scores[m]["mean"], other[m]["mean"] if other else None]
                for m in ("bleu", "token_f1", "exact")
            },
        }
        print(f"{name:62} {'identical' if scores == other else 'DIFFERENT'}")
    out = {
        "benchmark": "quickstart_compare",
        "settings": "scale 0.1, fp32 target and decoding, 32 validation / 64 test prompts",
        "rows": rows,
        "examples_identical": a["examples"] == b["examples"],
        "seconds": [a["seconds"], b["seconds"]],
    }
    print("examples identical:", out["examples_identical"])
    if results:
        from logit2prompt.evaluation.results import write_results

        write_results(
            results,
            out,
            command=[
                "python",
                "benchmarks/quickstart_compare.py",
                "compare",
                a_path,
                b_path,
                "--results",
                results,
            ],
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--dump", required=True)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--results", default=None)
    args = p.parse_args()
    if args.cmd == "run":
        run(args.out, args.dump)
    else:
        compare(args.a, args.b, args.results)


if __name__ == "__main__":
    main()
