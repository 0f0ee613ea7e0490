"""Two versions of samhq measured in one run on one machine: `benchmarks/run.py` of a baseline commit
and of the working tree, case by case, alternating which goes first, each with its own references.

    python benchmarks/compare_commits.py BASELINE_COMMIT [--cases TEXT] [--amg-side 16]

The baseline is checked out into a temporary git worktree; each side's `benchmarks/run.py` imports
its own `samhq` (run.py puts its tree first on sys.path). For every case and implementation the
report gives both medians, their ratio (new / baseline) and each side's ratio to the faster
reference measured beside it, so drift between the two halves of a case shows too. Writes
benchmarks/compare.json and benchmarks/compare.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASES = ["vit_b encoder", "vit_b one prompt", "vit_b 64 boxes", "vit_b automatic masks", "vit_tiny encoder",
         "vit_tiny one prompt", "vit_h embed"]


def run_side(tree: Path, case: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, str(tree / "benchmarks" / "run.py"), "--cases", case, "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{tree.name}: {case}: {tail}")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("baseline", help="the commit to compare with (e.g. the one before a change)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case name fragments")
    ap.add_argument("--amg-side", type=int, default=None, help="points per side of the AMG grid (run.py's option)")
    ap.add_argument("--out", default=str(HERE / "compare.json"))
    args = ap.parse_args(argv)
    extra = ["--amg-side", str(args.amg_side)] if args.amg_side else []
    sha = subprocess.run(["git", "rev-parse", "--short", args.baseline], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "samhq"], capture_output=True, text=True, cwd=ROOT).stdout)
    start = time.time()
    rows, machine = [], None
    with tempfile.TemporaryDirectory(prefix="samhq-compare-") as tmp:
        base_tree = Path(tmp) / f"samhq-{sha}"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), sha], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for i, case in enumerate(c.strip() for c in args.cases.split(",") if c.strip()):
                sides = [("baseline", base_tree), ("new", ROOT)]
                if i % 2:
                    sides.reverse()
                got = {}
                for label, tree in sides:
                    print(f"{case}: {label} ...", flush=True)
                    got[label] = run_side(tree, case, Path(tmp) / f"{label}-{i}.json", extra)
                machine = machine or got["new"]["machine"]
                new_rows = {(r["case"], r["impl"]): r for r in got["new"]["rows"]}
                for r in got["baseline"]["rows"]:
                    n = new_rows.get((r["case"], r["impl"]))
                    if not n or "median_s" not in r or "median_s" not in n or not r["impl"].startswith("samhq"):
                        continue
                    rows.append({"case": r["case"], "impl": r["impl"], "baseline_s": r["median_s"], "new_s": n["median_s"],
                                 "new_vs_baseline": round(n["median_s"] / r["median_s"], 3),
                                 "baseline_vs_faster_ref": r.get("vs_faster_ref"), "new_vs_faster_ref": n.get("vs_faster_ref"),
                                 "baseline_peak_mb": r.get("peak_mb"), "new_peak_mb": n.get("peak_mb")})
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, capture_output=True)
    report = {"baseline": sha, "new": head + ("+changes" if dirty else ""), "machine": machine, "rows": rows,
              "wall_s": round(time.time() - start, 1)}
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    lines = [f"samhq {report['new']} against {sha}, one run (`python benchmarks/compare_commits.py {sha}`)", "",
             f"Machine: {machine}", "",
             "| case | implementation | baseline s | new s | new / baseline | baseline × faster ref | new × faster ref |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['impl']} | {r['baseline_s']:.3f} | {r['new_s']:.3f} | {r['new_vs_baseline']:.3f} "
                     f"| {r['baseline_vs_faster_ref']} | {r['new_vs_faster_ref']} |")
    md = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(md, encoding="utf-8")
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
