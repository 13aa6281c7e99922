"""Optimizers the harness adds to torch's, each selected by a `conf/optim/<name>.yaml` (its `optimizer._target_`).

An optimizer with a `step_parts(task_loss, distillation_loss)` method gets a loss's two parts apart and does its
own backward passes (`kd/trainer.py`); every other optimizer sees the summed loss.
"""
