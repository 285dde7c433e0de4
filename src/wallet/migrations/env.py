"""Alembic runs on the connection `wallet.database.migrate` hands it (already holding the lock)."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
