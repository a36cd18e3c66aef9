#!/usr/bin/env python3
"""asyncpg through Sluice: direct connections and a client-side pool, default statement cache.

Reads SLUICE_HOST, SLUICE_PORT, SLUICE_USER, SLUICE_PASSWORD, SLUICE_DB (and optionally
SLUICE_CLIENTS, default 50, SLUICE_ITERATIONS, default 20). Expects sluice_fixture(id, label) with
ids 1..1000 in SLUICE_DB.

asyncpg prepares every query under a name (__asyncpg_stmt_N__) and caches it per connection, so
each execution after the first is a Bind/Execute of a named statement, whichever server
connection the pooler picks. Phase 1: SLUICE_CLIENTS direct connections, each also reusing an
explicit conn.prepare(). Phase 2: 100 tasks sharing asyncpg.create_pool(max_size=20).
Exits 1 with the first mismatches on any failure.
"""
import asyncio
import os
import sys
import traceback

import asyncpg

DOUBLE = "select $1::int * 2, $2::text"
FIXTURE = "select label from sluice_fixture where id = $1"


def params():
    return dict(
        host=os.environ["SLUICE_HOST"],
        port=int(os.environ["SLUICE_PORT"]),
        user=os.environ["SLUICE_USER"],
        password=os.environ.get("SLUICE_PASSWORD") or None,
        database=os.environ["SLUICE_DB"],
        timeout=30,
        server_settings={"application_name": "asyncpg_check"},
    )


def check(what, got, want):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


async def work(conn, n, i, stmt=None):
    a, s, fid = n * 1000 + i, f"c{n}-i{i}", (n * 37 + i) % 1000 + 1
    row = await conn.fetchrow(DOUBLE, a, s)
    check("double", tuple(row), (2 * a, s))
    check("fixture", await conn.fetchval(FIXTURE, fid), f"item-{fid}")
    if stmt is not None:
        check("prepared", tuple(await stmt.fetchrow(a + 1, s)), (2 * (a + 1), s))


async def direct(n, iterations, errors):
    try:
        conn = await asyncpg.connect(**params())
        try:
            stmt = await conn.prepare(DOUBLE)
            for i in range(iterations):
                await work(conn, n, i, stmt)
        finally:
            await conn.close()
    except Exception as e:  # noqa: BLE001
        errors.append(f"direct client {n}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")


async def pooled(pool, n, iterations, errors):
    try:
        for i in range(iterations):
            async with pool.acquire() as conn:
                await work(conn, n, i)
    except Exception as e:  # noqa: BLE001
        errors.append(f"pooled task {n}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")


async def main():
    clients = int(os.environ.get("SLUICE_CLIENTS", "50"))
    iterations = int(os.environ.get("SLUICE_ITERATIONS", "20"))
    errors = []
    await asyncio.wait_for(asyncio.gather(*(direct(n, iterations, errors) for n in range(clients))), 240)
    pool = await asyncpg.create_pool(min_size=1, max_size=20, **params())
    try:
        await asyncio.wait_for(
            asyncio.gather(*(pooled(pool, n, iterations, errors) for n in range(100))), 240
        )
    finally:
        await pool.close()
    if errors:
        print(f"asyncpg {asyncpg.__version__}: {len(errors)} clients/tasks failed", file=sys.stderr)
        for e in errors[:5]:
            print(e, file=sys.stderr)
        sys.exit(1)
    print(f"asyncpg {asyncpg.__version__}: ok, {clients} direct clients + 100 pooled tasks x {iterations} iterations")


if __name__ == "__main__":
    asyncio.run(main())
