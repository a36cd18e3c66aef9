#!/usr/bin/env python3
"""psycopg 3 through Sluice: many clients over a small pool, prepared statements, pipeline mode.

Reads SLUICE_HOST, SLUICE_PORT, SLUICE_USER, SLUICE_PASSWORD, SLUICE_DB (and optionally
SLUICE_CLIENTS, default 50, SLUICE_ITERATIONS, default 20). Expects the harness's fixture table
sluice_fixture(id, label = 'item-' || id) with ids 1..1000 in SLUICE_DB.

Clients take turns at three modes so that named server-side statements meet transaction pooling:
  - "threshold": psycopg's default prepare_threshold (5): from the 6th run a query is prepared
    under a name (_pg3_N) and later executions only Bind/Execute it, on whatever server
    connection the pooler picks;
  - "prepare": execute(..., prepare=True) prepares on first use;
  - "pipeline": pipeline mode, several queries per Sync.
Exits 1 with the first mismatches on any failure.
"""
import os
import sys
import threading
import traceback

import psycopg

DOUBLE = "select %s::int * 2, %s::text"
FIXTURE = "select label from sluice_fixture where id = %s"


def conninfo():
    return dict(
        host=os.environ["SLUICE_HOST"],
        port=int(os.environ["SLUICE_PORT"]),
        user=os.environ["SLUICE_USER"],
        password=os.environ.get("SLUICE_PASSWORD") or None,
        dbname=os.environ["SLUICE_DB"],
        connect_timeout=30,
        application_name="psycopg_check",
    )


def check(what, got, want):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def client(n, mode, iterations, errors):
    try:
        with psycopg.connect(autocommit=True, **conninfo()) as conn:
            for i in range(iterations):
                a, s, fid = n * 1000 + i, f"c{n}-i{i}", (n * 37 + i) % 1000 + 1
                if mode == "pipeline":
                    with conn.pipeline() as p:
                        c1 = conn.execute(DOUBLE, (a, s))
                        c2 = conn.execute(FIXTURE, (fid,))
                        c3 = conn.execute(DOUBLE, (a + 1, s + "'x"))
                        p.sync()
                        check("pipeline double", c1.fetchone(), (2 * a, s))
                        check("pipeline fixture", c2.fetchone(), (f"item-{fid}",))
                        check("pipeline double 2", c3.fetchone(), (2 * (a + 1), s + "'x"))
                else:
                    prepare = True if mode == "prepare" else None
                    row = conn.execute(DOUBLE, (a, s), prepare=prepare).fetchone()
                    check(f"{mode} double", row, (2 * a, s))
                    row = conn.execute(FIXTURE, (fid,), prepare=prepare).fetchone()
                    check(f"{mode} fixture", row, (f"item-{fid}",))
            # Still a sane session afterwards.
            check("final", conn.execute("select 41 + 1").fetchone(), (42,))
    except Exception as e:  # noqa: BLE001 - report every failure
        errors.append(f"client {n} ({mode}): {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")


def main():
    clients = int(os.environ.get("SLUICE_CLIENTS", "50"))
    iterations = int(os.environ.get("SLUICE_ITERATIONS", "20"))
    modes = ["threshold", "prepare", "pipeline"]
    errors = []
    threads = [
        threading.Thread(target=client, args=(n, modes[n % 3], iterations, errors), daemon=True)
        for n in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
        if t.is_alive():
            errors.append("a client did not finish within 240 s")
            break
    if errors:
        print(f"psycopg {psycopg.__version__}: {len(errors)} of {clients} clients failed", file=sys.stderr)
        for e in errors[:5]:
            print(e, file=sys.stderr)
        sys.exit(1)
    print(f"psycopg {psycopg.__version__}: ok, {clients} clients x {iterations} iterations")


if __name__ == "__main__":
    main()
