"""Named feature taps: forward hooks on configured modules, no per-method model subclasses."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Outputs:
    """What a network hands to a loss: its logits and the named features the method asked for."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def detached_float(self) -> "Outputs":
        """fp32 copies outside autograd (teacher outputs made under inference_mode become normal tensors)."""
        return Outputs(self.logits.float().clone(), {k: v.float().clone() for k, v in self.features.items()})

    def float(self) -> "Outputs":
        return Outputs(self.logits.float(), {k: v.float() for k, v in self.features.items()})


class TappedModel(nn.Module):
    """Normalises [0, 1] images with the model's own mean/std, runs it, and captures the tapped features.

    `taps` maps a feature name (as used by losses, e.g. "feat") to a module path in the model (e.g. "layer3").
    One forward hook per tapped module; `close()` removes them.
    """

    def __init__(self, model: nn.Module, mean, std, taps: dict[str, str] | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self._captured: dict[str, torch.Tensor] = {}
        self._handles = []
        self.tap_paths = dict(taps or {})
        modules = dict(model.named_modules())
        for name, path in self.tap_paths.items():
            if path not in modules:
                choices = ", ".join(n for n in modules if n and "." not in n)
                raise ValueError(f"feature tap {name!r}: {type(model).__name__} has no module {path!r}; "
                                 f"top-level modules are: {choices}")
            self._handles.append(modules[path].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def capture(_module, _inputs, output):
            self._captured[name] = output
        return capture

    def forward(self, images: torch.Tensor) -> Outputs:
        self._captured = {}
        logits = self.model((images - self.mean) / self.std)
        features, self._captured = self._captured, {}
        return Outputs(logits, features)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
