#!/usr/bin/env python3
"""Markdown tables for pgbench-compare.sh and side-by-side.sh from their CSV.

Usage: results_table.py RESULTS.csv [MORE.csv ...]
Prints a summary table (median over rounds, per workload and target, in run order: on a noisy
machine one disturbed run moves a mean far more than a median), the verdict table (each Sluice
target against PgBouncer, round by round) and one row per run. Several CSVs (runs of the same
binaries) are pooled: their rounds count together.
CSV columns: workload,target,round,clients,tps,latency_ms,pooler_cpu_us_per_tx,transactions,
errors,exit_code,note
"""
import csv
import math
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


def median_interval(values):
    """A 95 % confidence interval for the median of `values`, from order statistics: with n
    rounds, the k-th smallest and k-th largest values, k the largest with
    P(Binomial(n, 1/2) < k) <= 2.5 %. Needs no assumption about the distribution; with fewer
    than 6 rounds there is none (None)."""
    xs = sorted(values)
    n = len(xs)
    k, below = 0, 0.0
    while True:
        below += math.comb(n, k) / 2**n
        if below > 0.025:
            break
        k += 1
    return (xs[k - 1], xs[n - k]) if k >= 1 else None


def verdict(rows):
    """Sluice ÷ PgBouncer per round, for CPU per transaction and TPS: the two run back to back
    in each round (pgbench-compare.sh) or at the same time (side-by-side.sh), so the ratio
    cancels what the machine did to both."""
    rounds = {}
    for r in rows:
        rounds.setdefault((r["source"], r["workload"], r["round"]), {})[r["target"]] = r
    targets = [t for t in dict.fromkeys(r["target"] for r in rows) if t.startswith("sluice")]
    if not targets or not any("pgbouncer" in x for x in rounds.values()):
        return
    print()
    print("Sluice ÷ PgBouncer, round by round (below 1 is less CPU, above 1 more TPS): the median,")
    print("a 95 % confidence interval for it, and in how many rounds Sluice did at least as well.")
    print()
    print("| workload | target | rounds | CPU/tx: median | 95 % CI | rounds ≤ 1 | TPS: median | 95 % CI | rounds ≥ 1 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for workload in dict.fromkeys(r["workload"] for r in rows):
        for t in targets:
            cpu, tps = [], []
            for (_, w, _), x in rounds.items():
                if w != workload or t not in x or "pgbouncer" not in x:
                    continue
                a, b = x[t], x["pgbouncer"]
                ca, cb = num(a["pooler_cpu_us_per_tx"]), num(b["pooler_cpu_us_per_tx"])
                ta, tb = num(a["tps"]), num(b["tps"])
                if ca and cb and ta and tb:
                    cpu.append(ca / cb)
                    tps.append(ta / tb)
            if not cpu:
                continue

            def cells(vals, good):
                ci = median_interval(vals)
                ci = f"{ci[0]:.2f}–{ci[1]:.2f}" if ci else "—"
                return f"{statistics.median(vals):.2f} | {ci} | {sum(1 for v in vals if good(v))}"

            print(
                f"| {workload} | {t} | {len(cpu)} | {cells(cpu, lambda v: v <= 1)} | "
                f"{cells(tps, lambda v: v >= 1)} |"
            )


def main() -> None:
    rows = []
    for path in sys.argv[1:]:
        with open(path, newline="") as f:
            rows += [dict(r, source=path) for r in csv.DictReader(f)]
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

    verdict(rows)

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
