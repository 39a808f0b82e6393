"""Metrics: pure NumPy/SciPy functions (AUROC, AP, F1-max, PRO), their input checks, and the metric vocabulary."""
