"""Persistence: the DuckDB warehouse and the model registry."""
