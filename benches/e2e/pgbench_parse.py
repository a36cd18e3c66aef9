#!/usr/bin/env python3
"""Parse one pgbench (PostgreSQL 15) run: its stdout summary and its stderr.

Usage: pgbench_parse.py STDOUT_FILE STDERR_FILE
Prints one line, fields separated by \\x1f: tps, latency_ms, transactions, errors, note.

errors = failed transactions reported in the summary (serialization/deadlock, PG15)
       + error lines on stderr (a client that aborts, a connection that fails, ...).
pgbench 15 aborts a client at its first non-retryable error, so each aborted client is one line.
note   = the most frequent error message (shortened), with how many times it occurred.
"""
import collections
import re
import sys


def parse(stdout: str, stderr: str) -> dict:
    def first(pattern, text=stdout, cast=float):
        m = re.search(pattern, text, re.M)
        return cast(m.group(1)) if m else None

    tps = first(r"^tps = ([0-9.]+)")
    latency = first(r"^latency average = ([0-9.]+) ms")
    transactions = first(r"^number of transactions actually processed: (\d+)", cast=int)
    failed = first(r"^number of failed transactions: (\d+)", cast=int) or 0

    messages = collections.Counter()
    for line in stderr.splitlines():
        if "error" not in line.lower() and "fatal" not in line.lower():
            continue
        # Drop the per-client prefix so identical causes group together.
        msg = re.sub(r"^pgbench: (error|fatal): ", "", line.strip())
        msg = re.sub(r"client \d+ (script \d+ )?aborted in command \d+ \(\w+\) of script \d+; ", "", msg)
        msg = re.sub(r"client \d+ ", "client N ", msg)
        msg = re.sub(r"connection to server at \"[^\"]*\"( \([^)]*\))?, port \d+ failed: ", "connect: ", msg)
        msg = re.sub(r"\"P\d+_\d+\"", '"P_n"', msg)
        messages[msg] += 1
    # Lines that only repeat that the run was aborted are not extra errors.
    for k in list(messages):
        if k.startswith("Run was aborted"):
            del messages[k]
    errors = failed + sum(messages.values())
    aborted = len(re.findall(r"client \d+ (?:script \d+ )?aborted", stderr))
    no_conn = re.search(r"could not create connection for client (\d+)", stderr)
    notes = []
    if aborted:
        notes.append(f"{aborted} clients aborted")
    if no_conn:
        notes.append(f"pgbench gave up at client {no_conn.group(1)} (could not connect)")
    if messages:
        # Prefer the real cause (the server's message) over pgbench's own follow-up lines.
        ranked = sorted(messages.items(), key=lambda kv: (("ERROR" in kv[0] or "FATAL" in kv[0]), kv[1]), reverse=True)
        msg, n = ranked[0]
        msg = re.sub(r"\s+", " ", msg.replace("|", "/"))
        if len(msg) > 100:
            msg = msg[:97] + "..."
        notes.append(f"{n}x {msg}")
    note = "; ".join(notes)
    if transactions is None:
        note = (note + "; " if note else "") + "no summary (pgbench failed)"
    return dict(tps=tps, latency_ms=latency, transactions=transactions or 0, errors=errors, note=note)


def main() -> None:
    with open(sys.argv[1], errors="replace") as f:
        out = f.read()
    with open(sys.argv[2], errors="replace") as f:
        err = f.read()
    r = parse(out, err)
    fmt = lambda v: "" if v is None else str(v)
    # \x1f (unit separator), not a tab: bash `read` would merge empty tab-separated fields.
    print("\x1f".join(fmt(r[k]) for k in ("tps", "latency_ms", "transactions", "errors", "note")))


if __name__ == "__main__":
    main()
