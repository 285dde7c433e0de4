"""How a migration runs its SQL: each revision keeps its schema change as plain SQL scripts
(UPGRADE, DOWNGRADE) that read as the schema does, and hands each to `run`."""

from __future__ import annotations

from alembic import op


def run(script: str) -> None:
    """Execute the script one statement at a time: the asyncpg driver prepares each statement and
    may not batch them. Statements end with a semicolon closing a line before a blank line, so a
    semicolon inside a function body or a string never splits one."""
    for statement in script.split(";\n\n"):
        if statement.strip():
            op.execute(statement.strip())
