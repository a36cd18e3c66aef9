-- Scraper: a slow transaction that holds a server connection for about 50 ms.
-- Run with PGAPPNAME=scraper and -D scale=N.
\set aid random(1, 100000 * :scale)
BEGIN;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SELECT pg_sleep(0.05);
END;
