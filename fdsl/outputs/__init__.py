"""Torch-free outputs floor: verdicts, thresholds, rows, pictures, the folder run, contracts."""
