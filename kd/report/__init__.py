"""The sweep comparison report: `python -m kd.report <sweep folder>`.

Reads run folders (`.hydra/config.yaml`, `results.json`, `student.pt`); never imports the trainer.
collect -> evaluate (logits) -> metrics, complexity -> tables -> plots, markdown -> files (and W&B).
"""
