"""Helpers that build PyTorch/timm reference models and their checkpoints for parity tests.

timm models get random weights (trunc-normal init, then every 1-D parameter — norm scales/biases,
layer-scale gammas, biases — perturbed so that a mis-mapped norm or bias shows up in the logits).
"""
from __future__ import annotations

import re

import numpy as np

from mambaout_jax.models.mambaout import TIMM_NAMES

OFFICIAL_VARIANTS = ('mambaout_femto', 'mambaout_kobe', 'mambaout_tiny', 'mambaout_small',
                     'mambaout_base')


def timm_model(variant: str, seed: int = 0, **kwargs):
  import timm
  import torch
  torch.manual_seed(seed)
  model = timm.create_model(TIMM_NAMES[variant], pretrained=False, **kwargs).eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(torch.randn_like(p) * 0.2)
  return model


def timm_state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def timm_to_official(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Inverse of timm's checkpoint_filter_fn: timm keys -> the official MambaOut repo's keys."""
  out = {}
  for k, v in sd.items():
    k = k.replace('stem.', 'downsample_layers.0.')
    k = re.sub(r'^stages\.(\d+)\.downsample\.', r'downsample_layers.\1.', k)
    k = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.\2.', k)
    if k.startswith('head.norm.'):  # the output norm (width D) sits outside the official head
      k = 'norm.' + k[len('head.norm.'):]
    elif k.startswith('head.pre_logits.fc.'):
      k = 'head.fc1.' + k[len('head.pre_logits.fc.'):]
    elif k.startswith('head.pre_logits.norm.'):
      k = 'head.norm.' + k[len('head.pre_logits.norm.'):]
    elif k.startswith('head.fc.'):
      k = 'head.fc2.' + k[len('head.fc.'):]
    out[k] = v
  return out


def timm_logits(model, images_nhwc: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()).numpy()


def save_pth(sd: dict[str, np.ndarray], path: str, wrap: str | None = None):
  import torch
  tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
  torch.save({wrap: tensors} if wrap else tensors, path)


def save_safetensors(sd: dict[str, np.ndarray], path: str):
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path)
