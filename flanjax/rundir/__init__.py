"""A run directory: its checkpoints, the files that describe its model, and its metrics.

Below both `train` (which writes run directories) and `eval` (which reads them), so that
neither imports the other for these.
"""
