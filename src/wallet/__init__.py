"""Prepaid wallets, orders and an append-only ledger."""
