#!/usr/bin/env node
// node-postgres through Sluice: named queries ({name, text, values}) from many clients.
//
// Reads SLUICE_HOST, SLUICE_PORT, SLUICE_USER, SLUICE_PASSWORD, SLUICE_DB (and optionally
// SLUICE_CLIENTS, default 50, SLUICE_ITERATIONS, default 20); needs `pg` on NODE_PATH.
// Expects sluice_fixture(id, label) with ids 1..1000 in SLUICE_DB.
//
// A named query is parsed once per connection under its name and then only bound and executed,
// on whatever server connection the pooler picks. Exits 1 with the first mismatches on failure.
'use strict';
const { Client } = require('pg');

const env = (k, d) => {
  const v = process.env[k];
  if (v === undefined && d === undefined) throw new Error(`missing ${k}`);
  return v === undefined ? d : v;
};

function check(what, got, want) {
  const g = JSON.stringify(got), w = JSON.stringify(want);
  if (g !== w) throw new Error(`${what}: got ${g}, want ${w}`);
}

async function client(n, iterations) {
  const c = new Client({
    host: env('SLUICE_HOST'),
    port: Number(env('SLUICE_PORT')),
    user: env('SLUICE_USER'),
    password: env('SLUICE_PASSWORD', '') || undefined,
    database: env('SLUICE_DB'),
    application_name: 'node_pg_check',
    connectionTimeoutMillis: 30000,
  });
  await c.connect();
  try {
    for (let i = 0; i < iterations; i++) {
      const a = n * 1000 + i, s = `c${n}-i${i}`, fid = ((n * 37 + i) % 1000) + 1;
      let r = await c.query({ name: 'double', text: 'select $1::int * 2 as d, $2::text as t', values: [a, s] });
      check('named double', r.rows, [{ d: 2 * a, t: s }]);
      r = await c.query({ name: 'fixture', text: 'select label from sluice_fixture where id = $1', values: [fid] });
      check('named fixture', r.rows, [{ label: `item-${fid}` }]);
      r = await c.query('select $1::int + 1 as p', [a]); // unnamed statement
      check('unnamed', r.rows, [{ p: a + 1 }]);
    }
  } finally {
    await c.end();
  }
}

async function main() {
  const clients = Number(env('SLUICE_CLIENTS', '50'));
  const iterations = Number(env('SLUICE_ITERATIONS', '20'));
  const version = require('pg/package.json').version;
  const results = await Promise.allSettled([...Array(clients).keys()].map((n) => client(n, iterations)));
  const failed = results
    .map((r, n) => (r.status === 'rejected' ? `client ${n}: ${r.reason && r.reason.stack || r.reason}` : null))
    .filter(Boolean);
  if (failed.length) {
    console.error(`node-postgres ${version}: ${failed.length} of ${clients} clients failed`);
    failed.slice(0, 5).forEach((f) => console.error(f));
    process.exit(1);
  }
  console.log(`node-postgres ${version}: ok, ${clients} clients x ${iterations} iterations`);
}

const timer = setTimeout(() => { console.error('node_pg_check: timed out after 240 s'); process.exit(1); }, 240000);
timer.unref();
main().catch((e) => { console.error(e && e.stack || e); process.exit(1); });
