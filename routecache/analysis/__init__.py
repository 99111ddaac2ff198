"""Offline analysis of the event log: the parquet export and the notebook's building blocks.

Needs the `analysis` extra (pandas, pyarrow, matplotlib): `pip install routecache[analysis]`.
"""
