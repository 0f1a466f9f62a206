"""Pareto analysis, plots, report and export of finished sweeps. Lands with the analysis issue."""
