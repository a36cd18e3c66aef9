#!/usr/bin/env python3
"""Markdown tables for pgbench-compare.sh from its CSV.

Usage: results_table.py RESULTS.csv
Prints a summary table (median over rounds, per workload and target, in run order: on a noisy
machine one disturbed run moves a mean far more than a median) followed by one row per run.
CSV columns: workload,target,round,clients,tps,latency_ms,pooler_cpu_us_per_tx,transactions,
errors,exit_code,note
"""
import csv
import statistics
import sys
from collections import OrderedDict


def num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def median(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, digits=1):
    return "—" if v is None else f"{v:,.{digits}f}"


def main() -> None:
    with open(sys.argv[1], newline="") as f:
        rows = list(csv.DictReader(f))
    groups = OrderedDict()
    for r in rows:
        groups.setdefault((r["workload"], r["target"]), []).append(r)

    direct_tps = {w: median(num(r["tps"]) for r in rs) for (w, t), rs in groups.items() if t == "direct"}
    dagger = False
    print("| workload | target | TPS | vs direct | latency ms | pooler CPU µs/tx | errors | rounds | note |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for (workload, target), rs in groups.items():
        tps = median(num(r["tps"]) for r in rs)
        lat = median(num(r["latency_ms"]) for r in rs)
        cpu = median(num(r["pooler_cpu_us_per_tx"]) for r in rs)
        errors = sum(int(r["errors"] or 0) for r in rs)
        failed_runs = sum(1 for r in rs if r["exit_code"] not in ("0", ""))
        notes = sorted({r["note"] for r in rs if r["note"]})
        note = notes[0] if notes else ""
        mark = ""
        if failed_runs:
            note = f"exit≠0 in {failed_runs}/{len(rs)} runs" + (f"; {note}" if note else "")
            mark, dagger = " †", True
        base = direct_tps.get(workload)
        ratio = f"{tps / base:.2f}×" if tps is not None and base and target != "direct" else "—"
        print(
            f"| {workload} | {target} | {fmt(tps)}{mark if tps is not None else ''} | {ratio} | "
            f"{fmt(lat, 3)}{mark if lat is not None else ''} | {fmt(cpu)} | {errors} | {len(rs)} | {note} |"
        )
    if dagger:
        print()
        print("† pgbench exited with an error: clients aborted or could not connect, so TPS and latency cover only")
        print("the clients that kept running (or are missing when pgbench gave up before the run).")

    print()
    print("Per run (in execution order):")
    print()
    print("| workload | round | target | clients | TPS | latency ms | pooler CPU µs/tx | transactions | errors | exit |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['workload']} | {r['round']} | {r['target']} | {r['clients']} | {fmt(num(r['tps']))} | "
            f"{fmt(num(r['latency_ms']), 3)} | {fmt(num(r['pooler_cpu_us_per_tx']))} | {r['transactions']} | "
            f"{r['errors']} | {r['exit_code']} |"
        )


if __name__ == "__main__":
    main()
