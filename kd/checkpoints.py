"""Loading weights into a model, with errors that name the file and the keys that do not fit."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class CheckpointMismatch(RuntimeError):
    pass


def extract_state_dict(obj) -> dict[str, torch.Tensor]:
    """Accepts a plain state dict or a dict with a `state_dict` key; strips DataParallel `module.` prefixes."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise CheckpointMismatch(f"expected a state dict, found {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path, assign: bool = False) -> None:
    """The checkpoint's weights into `model` (`assign`: the checkpoint's tensors replace the model's, as a model
    made on the meta device needs)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointMismatch(f"cannot read checkpoint {path}: {err}") from err
    state = extract_state_dict(obj)
    expected = model.state_dict()
    # checkpoints saved before PyTorch 0.4.1 have no BatchNorm step counters; they do not affect the outputs
    counters = {k: v for k, v in expected.items() if k.endswith("num_batches_tracked") and k not in state}
    state = {**state, **counters}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                         for k, v in expected.items() if k in state and state[k].shape != v.shape)
    if missing or unexpected or wrong_shape:
        def brief(keys):
            return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "") or "none"
        raise CheckpointMismatch(
            f"checkpoint {path} does not match {type(model).__name__}: missing keys: {brief(missing)}; "
            f"unexpected keys: {brief(unexpected)}; shape mismatches: {brief(wrong_shape)}")
    model.load_state_dict(state, assign=assign)
