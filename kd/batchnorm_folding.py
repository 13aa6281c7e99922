"""Fold each eval-mode BatchNorm into the convolution that feeds it, for a frozen teacher.

A frozen teacher's BatchNorm is a fixed per-channel affine map, so it can live in the preceding convolution's
weights and bias: the same function up to float rounding, one pass over each feature map fewer (about 10% of a
ResNet-18 forward on CPU). The module tree keeps its names: the BatchNorm's place is taken by an Identity, so
feature taps on blocks and stages still see the same outputs.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, batchnorm) module paths where the BatchNorm is the only consumer of the convolution's output."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # data-dependent control flow: leave such a model as it is
        log.info("not folding BatchNorm: %s cannot be traced (%s)", type(model).__name__, err)
        return []
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d) or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op == "call_module" and isinstance(modules[user.target], nn.BatchNorm2d):
            pairs.append((node.target, user.target))
    return pairs


def fold_batchnorm(model: nn.Module, keep: Iterable[str] = ()) -> int:
    """Fold in place every conv -> BatchNorm pair of an eval-mode `model`, except pairs touching a module
    path in `keep` (tapped modules: a hook there must keep seeing what it saw). Returns the number folded."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode: a training BatchNorm is not a fixed map")
    keep = set(keep)
    folded = 0
    for conv_path, bn_path in conv_bn_pairs(model):
        if conv_path in keep or bn_path in keep:
            continue
        conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
        with torch.no_grad():
            fused = fuse_conv_bn_eval(conv, bn).requires_grad_(False)
        model.set_submodule(conv_path, fused)
        model.set_submodule(bn_path, nn.Identity())
        folded += 1
    return folded
