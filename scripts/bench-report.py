#!/usr/bin/env python3
"""scripts/bench-report.py - the results of one scripts/bench run.

Reads the figures the benchmarks recorded (JSON lines: bench, figure, value,
unit, baseline null or {what, value}, goal null or a string; see
plugin/benches/common/figures.rs) and writes, in OUT_DIR:
  latest.json  {date, commit, machine, figures}
  latest.md    a heading naming the machine, the date and the commit, then
               one table row a figure: value, its same-run baseline, and
               value / baseline.

Usage: scripts/bench-report.py --commit C FIGURES.jsonl OUT_DIR
(scripts/bench names the commit: the one it measured, taken before the run.)
"""

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
from pathlib import Path


def read(path):
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def lscpu():
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return ""


def field(text, key, sep):
    """The value of the first line "key<sep>value" of text, or None."""
    for line in text.splitlines():
        name, found, value = line.partition(sep)
        if found and name.strip() == key:
            return value.strip().strip('"')
    return None


def machine():
    mem_kib = field(read("/proc/meminfo"), "MemTotal", ":")
    return {
        # x86 names its CPU in /proc/cpuinfo; elsewhere lscpu knows it.
        "cpu": field(read("/proc/cpuinfo"), "model name", ":")
        or field(lscpu(), "Model name", ":")
        or "unknown",
        "cores": len(os.sched_getaffinity(0)),  # what nproc says
        "memory_gib": round(int(mem_kib.split()[0]) / 2**20, 1) if mem_kib else None,
        "kernel": platform.release(),
        "os": field(read("/etc/os-release"), "PRETTY_NAME", "=") or "unknown",
    }


def number(v):
    """Integers as they are; other numbers to about three significant
    digits (3,184; 25.0; 1.00; 0.560), which keeps 1.00 round trips apart
    from a count of 1."""
    if v is None or math.isnan(v):
        return "n/a"
    if isinstance(v, int) or v == 0:
        return f"{int(v):,}"
    decimals = max(0, 2 - math.floor(math.log10(abs(v))))
    return f"{v:,.{decimals}f}"


def cell(text):
    return text.replace("|", "\\|")


def row(f):
    value = number(f["value"])
    if f["value"] is not None:
        value += f" {f['unit']}"
    if f.get("goal"):
        value += f" (goal {f['goal']})"
    baseline, ratio = "", ""
    if f.get("baseline"):
        b = f["baseline"]["value"]
        baseline = f"{f['baseline']['what']}: {number(b)} {f['unit']}"
        if f["value"] is not None and b:
            ratio = f"{f['value'] / b:.2f}x"
    return "| " + " | ".join(cell(c) for c in (f["bench"], f["figure"], value, baseline, ratio)) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("figures", help="JSON lines the benchmarks wrote (ROBENCH_OUT)")
    parser.add_argument("out_dir")
    parser.add_argument("--commit", required=True, help="the commit measured")
    args = parser.parse_args()

    figures = [json.loads(line) for line in Path(args.figures).read_text().splitlines() if line.strip()]
    if not figures:
        raise SystemExit(f"{args.figures}: no figures recorded")
    now = datetime.datetime.now(datetime.timezone.utc)
    m = machine()
    report = {
        "date": now.isoformat(timespec="seconds"),
        "commit": args.commit,
        "machine": m,
        "figures": figures,
    }

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Benchmarks, {now:%Y-%m-%d %H:%M} UTC, commit {report['commit']}: {m['cpu']}, "
        f"{m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, {m['os']}",
        "",
        "| benchmark | figure | value | baseline (same run) | ratio |",
        "|---|---|---|---|---|",
        *(row(f) for f in figures),
    ]
    (out / "latest.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
