#!/usr/bin/env python3
"""Summarise storm.sh runs from pgbench per-transaction logs; write CSVs, a chart, a Markdown report.

Usage: storm_analyze.py --prefix PATH [--header TEXT] [--repo DIR] SETUP=DIR [SETUP=DIR ...]

Each DIR holds web.out/web.err and web.<pid>[.<thread>] logs, and for storms also the same for
"scraper". A pgbench 15 log line is: client_id transaction_no latency_us script_no epoch_s epoch_us
(the time the transaction ended). The window is that of the web run: from the first web
transaction's start to the last one's end; scraper figures are counted inside that window.

Writes PREFIX.csv (one row per setup), PREFIX-buckets.csv (per class and 1-second bucket since the
window start: count, p50, p95, p99) and PREFIX.svg (chart.py), and prints Markdown on stdout.
"""
import argparse
import csv
import glob
import math
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pgbench_parse  # noqa: E402


def read_log(dir_, cls):
    """[(end_s, latency_ms)] from every per-thread log file of class cls."""
    out = []
    for path in sorted(glob.glob(os.path.join(dir_, f"{cls}.[0-9]*"))):
        with open(path, errors="replace") as f:
            for line in f:
                p = line.split()
                if len(p) < 6 or not p[2].isdigit():
                    continue  # "failed"/"skipped" markers or partial lines
                end = int(p[4]) + int(p[5]) / 1e6
                out.append((end, int(p[2]) / 1000.0))
    out.sort()
    return out


def pct(sorted_vals, q):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def summary_of(dir_, cls):
    out_path, err_path = (os.path.join(dir_, f"{cls}.{ext}") for ext in ("out", "err"))
    if not os.path.exists(out_path):
        return None
    with open(out_path, errors="replace") as f:
        out = f.read()
    with open(err_path, errors="replace") as f:
        err = f.read()
    return pgbench_parse.parse(out, err)


def fmt(v, digits=1):
    return "—" if v is None else f"{v:,.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--header", default="")
    ap.add_argument("--repo", default="")
    ap.add_argument("setups", nargs="+", help="SETUP=DIR")
    a = ap.parse_args()

    rows, buckets = [], []
    for arg in a.setups:
        setup, dir_ = arg.split("=", 1)
        web = read_log(dir_, "web")
        scr = read_log(dir_, "scraper")
        row = dict(setup=setup)
        if web:
            start = min(e - l / 1000 for e, l in web)
            end = max(e for e, _ in web)
        else:
            start = end = None
        span = (end - start) if web else 0
        lat = sorted(l for _, l in web)
        row.update(
            web_tx=len(web),
            web_tps=len(web) / span if span > 0 else None,
            web_p50_ms=pct(lat, 50), web_p95_ms=pct(lat, 95), web_p99_ms=pct(lat, 99),
            web_max_ms=lat[-1] if lat else None,
        )
        ws = summary_of(dir_, "web") or {}
        row["web_errors"] = ws.get("errors", 0)
        row["web_note"] = ws.get("note", "")
        ss = summary_of(dir_, "scraper")
        if ss is None:
            row.update(scraper_tx=None, scraper_tps=None, scraper_p99_ms=None, scraper_errors=None, scraper_note="")
        else:
            inside = [l for e, l in scr if start is not None and start <= e <= end]
            slat = sorted(inside)
            row.update(
                scraper_tx=len(inside),
                scraper_tps=len(inside) / span if span > 0 else None,
                scraper_p99_ms=pct(slat, 99),
                scraper_errors=ss["errors"],
                scraper_note=ss["note"],
            )
        rows.append(row)
        if start is None:
            continue
        for cls, data in (("web", web), ("scraper", scr)):
            per = {}
            for e, l in data:
                if start <= e <= end:
                    per.setdefault(int(e - start), []).append(l)
            for sec in sorted(per):
                v = sorted(per[sec])
                buckets.append(dict(setup=setup, cls=cls, second=sec, count=len(v),
                                    p50_ms=pct(v, 50), p95_ms=pct(v, 95), p99_ms=pct(v, 99)))

    cols = ["setup", "web_tps", "web_p50_ms", "web_p95_ms", "web_p99_ms", "web_max_ms", "web_tx",
            "web_errors", "scraper_tps", "scraper_tx", "scraper_p99_ms", "scraper_errors",
            "web_note", "scraper_note"]
    with open(a.prefix + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else (round(r[k], 3) if isinstance(r[k], float) else r[k]))
                        for k in cols})
    with open(a.prefix + "-buckets.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["setup", "class", "second", "count", "p50_ms", "p95_ms", "p99_ms"])
        w.writeheader()
        for b in buckets:
            w.writerow({"setup": b["setup"], "class": b["cls"], "second": b["second"], "count": b["count"],
                        "p50_ms": round(b["p50_ms"], 3), "p95_ms": round(b["p95_ms"], 3),
                        "p99_ms": round(b["p99_ms"], 3)})
    svg = a.prefix + ".svg"
    chart = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "chart.py"),
         a.prefix + "-buckets.csv", svg, "--class", "web",
         "--title", "Web p99 latency under a scraper storm (per 1-s bucket)"],
        capture_output=True, text=True)
    if chart.returncode != 0:
        print(chart.stderr, file=sys.stderr)

    def rel(p):
        p = os.path.abspath(p)
        repo = os.path.abspath(a.repo) if a.repo else None
        return os.path.relpath(p, repo) if repo and p.startswith(repo + os.sep) else p
    print(f"# Priority under storm — {os.path.basename(a.prefix)}")
    print()
    if a.header:
        print(f"- {a.header}")
    print("- latencies from pgbench per-transaction logs (nearest-rank percentiles); scraper figures"
          " counted inside the web run's window")
    print()
    print("| setup | web TPS | web p50 ms | web p95 ms | web p99 ms | web max ms | web errors |"
          " scraper TPS | scraper p99 ms | scraper errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setup']} | {fmt(r['web_tps'])} | {fmt(r['web_p50_ms'], 2)} | {fmt(r['web_p95_ms'], 2)} | "
              f"{fmt(r['web_p99_ms'], 2)} | {fmt(r['web_max_ms'], 1)} | {r['web_errors']} | "
              f"{fmt(r['scraper_tps'])} | {fmt(r['scraper_p99_ms'], 1)} | "
              f"{'—' if r['scraper_errors'] is None else r['scraper_errors']} |")
    notes = [(r["setup"], c, r[f"{c}_note"]) for r in rows for c in ("web", "scraper") if r.get(f"{c}_note")]
    if notes:
        print()
        for setup, c, n in notes:
            print(f"- {setup} {c}: {n}")

    # Targets.
    by = {r["setup"]: r for r in rows}
    base_name = next((n for n in ("baseline", "baseline-pgbouncer") if n in by and by[n]["web_p99_ms"]), None)
    print()
    print("Targets:")
    print()
    if base_name:
        base = by[base_name]["web_p99_ms"]
        print(f"- web p99 ≤ 2× baseline p99 ({base_name}: {base:.2f} ms, limit {2 * base:.2f} ms):")
        for r in rows:
            if r["setup"].startswith("baseline") or r["web_p99_ms"] is None:
                continue
            ratio = r["web_p99_ms"] / base
            verdict = ("PASS" if ratio <= 2 else "FAIL") if r["setup"].startswith("sluice-priority") else "(reference)"
            print(f"  - {r['setup']}: {r['web_p99_ms']:.2f} ms = {ratio:.1f}× baseline {verdict}")
    else:
        print("- web p99 ≤ 2× baseline p99: no baseline setup in this run")
    print("- scrapers still complete transactions:")
    for r in rows:
        if r["scraper_tx"] is None:
            continue
        ok = r["scraper_tx"] > 0
        print(f"  - {r['setup']}: {r['scraper_tx']} transactions in the window ({fmt(r['scraper_tps'])}/s), "
              f"{r['scraper_errors']} errors {'PASS' if ok else 'FAIL'}")
    print()
    latest = os.path.join(os.path.dirname(svg), "storm.svg")
    print(f"Chart: {rel(svg)} (also copied to {rel(latest)}): web p99 per 1-s bucket, log scale.")
    print(f"Data: {rel(a.prefix + '.csv')}, {rel(a.prefix + '-buckets.csv')}")


if __name__ == "__main__":
    main()
