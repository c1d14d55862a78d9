"""Training-speed surgery on a timm image tower, each change stated by a config field (model.ExprCLIP applies them).

fold_batchnorm (--image-bn fold), freeze_stages (--freeze-image-stages N), freeze_depthwise (--freeze-depthwise) and
depthwise_in_fp32 (always: depthwise convolutions skip CPU bf16 autocast). Why each exists, and what it costs in
accuracy at equal epochs: BENCHMARKS.md, "Training throughput of the FER+ recipe" and the issue-21 sections.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d
from timm.models import group_modules
from torch.nn.utils.fusion import fuse_conv_bn_eval

from utils import UserError


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a Conv2d among its parent's children (timm's EfficientNets and
    ResNets) into that convolution: weight scaled, bias added (torch.nn.utils.fusion); a timm BatchNormAct2d leaves
    its dropout and activation behind. The network then trains with fixed statistics and no normalisation compute."""
    names = list(module._modules)
    for prev, name in zip([None, *names], names):
        child, owner, key = module._modules[name], module, prev
        while isinstance(owner._modules.get(key), nn.Sequential) and len(owner._modules[key]):   # a deep stem
            owner, key = owner._modules[key], list(owner._modules[key]._modules)[-1]
        conv = owner._modules.get(key) if key else None
        if isinstance(child, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d) and conv.out_channels == child.num_features:
            fused = fuse_conv_bn_eval(conv.eval(), child.eval())
            fused.bias.requires_grad_(fused.weight.requires_grad)       # the BN shift trains on as the conv bias
            owner._modules[key] = fused
            module._modules[name] = nn.Sequential(child.drop, child.act) if isinstance(child, BatchNormAct2d) \
                else nn.Identity()
        elif child is not None:
            fold_batchnorm(child)
    return module


def freeze_stages(encoder: nn.Module, n: int) -> list[str]:
    """No gradients for the stem and the first n stages (timm's coarse group_matcher: group 0 is the stem); returns
    the frozen modules' names (ExprCLIP keeps them in eval mode). Nothing before them needs a backward pass."""
    if n <= 0:
        return []
    if not hasattr(encoder, "group_matcher"):
        raise UserError(f"--freeze-image-stages: {type(encoder).__name__} names no stages; use 0")
    groups = group_modules(encoder, encoder.group_matcher(coarse=True))
    if n >= len(groups) - 1:
        raise UserError(f"--freeze-image-stages {n}: this image tower has {len(groups) - 2} stages besides its stem "
                        "and head; pass fewer (or --freeze-image true for the whole tower)")
    names = [m for g in sorted(groups)[:n + 1] for m in groups[g]]
    for name in names:
        encoder.get_submodule(name).requires_grad_(False)
    return names


def depthwise_convs(encoder: nn.Module) -> list[nn.Conv2d]:
    """The depthwise convolutions (one filter per channel: groups == in_channels > 1) of an image tower."""
    return [m for m in encoder.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels]


def freeze_depthwise(encoder: nn.Module) -> int:
    """No gradients for the depthwise filters (the pointwise convolutions, BatchNorm and head still train); returns
    how many. On CPU their weight gradient is most of a step's backward (BENCHMARKS.md); the input gradient that
    flows through them to earlier layers is still computed."""
    convs = depthwise_convs(encoder)
    if not convs:
        raise UserError(f"--freeze-depthwise: {type(encoder).__name__} has no depthwise convolutions; use false")
    for conv in convs:
        conv.weight.requires_grad_(False)     # only the filter: a bias (BatchNorm folded into it) trains on
    return len(convs)


class _Fp32OnCpu:
    """Mixin: under CPU autocast the convolution runs in fp32 (oneDNN's bf16 depthwise kernels are slower than fp32
    ones, so bf16 autocast of a depthwise network was 0.67x fp32; only the pointwise layers gain from AMX)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


_FP32_CLASSES: dict[type, type] = {}


def depthwise_in_fp32(encoder: nn.Module) -> nn.Module:
    """Make every depthwise convolution skip CPU bf16 autocast (class swap: weights and state-dict keys unchanged,
    timm's Conv2dSame padding kept). Nothing changes in fp32 or on CUDA."""
    for conv in depthwise_convs(encoder):
        cls = type(conv)
        if issubclass(cls, _Fp32OnCpu):
            continue
        if cls not in _FP32_CLASSES:
            _FP32_CLASSES[cls] = type(f"Fp32{cls.__name__}", (_Fp32OnCpu, cls), {})
        conv.__class__ = _FP32_CLASSES[cls]
    return encoder
