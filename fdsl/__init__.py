"""FDSL: Feature Discrepancy guided Score Learning for few-shot anomaly detection.

Importing the package has no side effects; see `fdsl.core.model.FDSL` for the detector.
"""
__version__ = "0.1.0"
