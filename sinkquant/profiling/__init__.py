"""Profiling: what a model does with its sinks and outliers, measured. `profiler.profile` runs the collectors
(collectors.py, probe.py, context.py, domains.py, interventions.py) and writes the report (report.py) with its
verdict (verdict.py); metrics.py holds the papers' metrics as pure functions. Importing the package is torch-free
(thresholds.py is read by recipe validation before torch loads)."""
