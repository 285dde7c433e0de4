"""`make bench`: the service under load against the raw-SQL ceiling of its own statements.

run.py orchestrates one run (database, provider, service, load, pgbench, report); stack.py starts
and stops the processes; load.py drives HTTP (wrk, or a Python fallback in pyload.py);
ceiling.py turns the service's SQL into pgbench scripts; growth.py measures cost growth with a
large ledger; report.py prints and writes the table.
"""
