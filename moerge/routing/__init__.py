"""Routers: calibration data, pooled features, prototype initialisation, calibration and diagnostics."""
