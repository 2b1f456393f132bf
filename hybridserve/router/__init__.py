"""Routing: the live economics table and policies over it (pure; no HTTP, no engines)."""
