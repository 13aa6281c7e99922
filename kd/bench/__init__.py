"""`python -m kd.bench`: the harness against the classic DataLoader loop, measured side by side in one process.

`classic.py` is the baseline (the original notebook's pipeline and loop), `measure.py` the three timed
comparisons, `report.py` the table and the ratios, `__main__.py` the command line (Hydra overrides, with the
benchmark's own settings in `conf/bench/default.yaml`).
"""
