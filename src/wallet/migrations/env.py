"""Alembic runs on the connection `wallet.database.migrate` hands it, inside the transaction
that holds the migration lock: the pending migrations commit together, or none does."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection)
with context.begin_transaction():
    context.run_migrations()
