-- Web: one short point read (its own transaction). Run with PGAPPNAME=web and -D scale=N.
\set aid random(1, 100000 * :scale)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
