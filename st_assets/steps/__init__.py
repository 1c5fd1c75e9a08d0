"""Plain-Python pipeline steps: DataFrames and paths in, DataFrames, paths and dataclasses out."""
