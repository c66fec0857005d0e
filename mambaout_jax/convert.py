"""Convert PyTorch MambaOut weights (official repo or timm) into a mambaout_jax params checkpoint.

    python -m mambaout_jax.convert --variant=mambaout_femto --src=mambaout_femto.pth --out=/tmp/femto
    python -m mambaout_jax.convert --variant=mambaout_tiny --src=model.safetensors --out=/tmp/tiny
    python -m mambaout_jax.convert --variant=mambaout_tiny --src=hf-hub:timm/mambaout_tiny.in1k \
        --out=/tmp/tiny

Accepted key layouts:
  official (yuweihao/MambaOut): downsample_layers.0.* (stem), downsample_layers.i.*, stages.i.j.*,
                                norm.*, head.fc1/norm/fc2.*
  timm:                         stem.*, stages.i.downsample.*, stages.i.blocks.j.*, head.*
`.safetensors` needs no torch; `.pth`/`.pt`/`.bin` imports torch lazily and is read with
`weights_only=True` (tensors only: nothing else is unpickled). `--src` may be a gs:// path or a
timm Hub name (`hf-hub:timm/<tag>`, see `python -m mambaout_jax.pretrained`). A checkpoint that
does not fit the variant is refused with the first offending key and both shapes; `--reset_head`
keeps a freshly initialised classifier when `--num_classes` differs from the checkpoint's.
"""
from __future__ import annotations

import re
import sys
from typing import Any

import numpy as np

from mambaout_jax.params import assign_params, check_params_match, flat_params, path_str

class CheckpointFitError(ValueError):
  """A checkpoint that cannot be used for the model: a key missing, unexpected or of another
  shape, weights of another variant, or a Hub name that does not exist."""


# Our parameter leaf names -> PyTorch's.
_LEAF_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'gamma': 'gamma'}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict from .safetensors (numpy only) or .pth (torch, imported lazily)."""
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    sd = load_file(path)
  else:
    try:
      import torch
    except ImportError as e:
      raise ImportError(f'reading {path} needs torch (pip install torch); or convert it to '
                        '.safetensors first') from e
    obj = torch.load(path, map_location='cpu', weights_only=True)
    for wrapper in ('model', 'state_dict', 'model_ema', 'state_dict_ema'):
      if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
        obj = obj[wrapper]
        break
    sd = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()}
  return {k.removeprefix('module.'): np.asarray(v) for k, v in sd.items()}


def official_to_timm(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames official-repo keys to timm's layout; timm-layout dicts pass through unchanged."""
  if not any(k.startswith('downsample_layers.') for k in sd):
    return dict(sd)
  out = {}
  for k, v in sd.items():
    k = k.replace('downsample_layers.0.', 'stem.')
    k = re.sub(r'^downsample_layers\.(\d+)\.', r'stages.\1.downsample.', k)
    k = re.sub(r'^stages\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.', k)
    if k.startswith('norm.'):  # the official output norm sits in the head after pooling
      k = 'head.' + k
    else:
      k = k.replace('head.fc1.', 'head.pre_logits.fc.')
      k = k.replace('head.norm.', 'head.pre_logits.norm.')
      k = k.replace('head.fc2.', 'head.fc.')
    out[k] = v
  return out


_TOP_ORDER = {'stem': 0, 'stages': 1, 'head': 2}


def natural_key(key: str):
  """Sorts keys in model order: stem, stages, head; 'blocks.9' before 'blocks.10'."""
  tokens = key.split('.')
  return [_TOP_ORDER.get(tokens[0], 3)] + [
      (0, int(t), '') if t.isdigit() else (1, 0, t) for t in tokens]


def torch_key(path: tuple) -> str:
  return '.'.join(str(p) for p in path[:-1]) + '.' + _LEAF_TO_TORCH.get(path[-1], path[-1])


def to_jax_layout(v: np.ndarray) -> np.ndarray:
  """Linear (out, in) -> (in, out); Conv2d (out, in, kh, kw) -> (kh, kw, in, out); 1-D unchanged."""
  if v.ndim == 2:
    return v.T
  if v.ndim == 4:
    return v.transpose(2, 3, 1, 0)
  return v


def to_torch_layout(v: np.ndarray) -> np.ndarray:
  if v.ndim == 2:
    return v.T
  if v.ndim == 4:
    return v.transpose(3, 2, 0, 1)
  return v


def torch_shape(shape: tuple) -> tuple:
  """The PyTorch layout of a parameter shape (the inverse of to_jax_layout)."""
  shape = tuple(shape)
  if len(shape) == 2:
    return shape[::-1]
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


# The final classifier's parameters (MambaOut / Mamba-block models; ViT) in our path layout.
CLASSIFIER_PATHS = (('head', 'fc', 'kernel'), ('head', 'fc', 'bias'),
                    ('head', 'kernel'), ('head', 'bias'))
HEAD_MODES = ('load', 'reset', 'fit', 'drop')


def map_params(source: dict[str, np.ndarray], expected: dict[tuple, Any], *, name_of,
               variant: str, source_name: str, head: str = 'load', to_model=lambda v: v,
               shape_in_source=lambda s: tuple(s), classes_hint: str = '',
               keep_fresh: tuple[str, ...] = ()) -> dict[tuple, Any]:
  """Takes every parameter of `expected` ({path: array}) from `source` ({name: array}).

  `name_of(path)` is a parameter's name in the source, `to_model` turns a source array into our
  layout and `shape_in_source` a shape of ours into the source's (for messages). `head` says what
  happens to the final classifier (CLASSIFIER_PATHS):
    'load'   it must fit like every other parameter (`classes_hint` is added to the message when
             only the number of classes differs);
    'reset'  always the fresh one from `expected`; the source's classifier is ignored;
    'fit'    the source's when the shapes agree, else the fresh one;
    'drop'   every source key under `head.` is dropped (a backbone without a head).
  Parameters under a top-level name in `keep_fresh` that the source lacks keep `expected`'s value
  (a dense-task backbone's output norms, which classification checkpoints do not have).
  Any other missing, unexpected or mis-shaped key: ValueError naming the first one, in model order.
  """
  if head not in HEAD_MODES:
    raise ValueError(f'unknown head mode {head!r}; choose one of {HEAD_MODES}')
  classifier = {name_of(p) for p in CLASSIFIER_PATHS if p in expected}
  if head == 'drop':
    source = {k: v for k, v in source.items() if not k.startswith('head.')}
  by_name = {name_of(p): p for p in expected}
  ignored = classifier if head == 'reset' else set()
  for k in sorted(source, key=natural_key):
    if k not in by_name and k not in ignored:
      raise CheckpointFitError(f'{source_name} does not fit {variant}: unexpected key {k!r} (shape '
                       f'{tuple(np.shape(source[k]))}); is it a checkpoint of another variant?')
  params = {}
  for k, path in sorted(by_name.items(), key=lambda kv: natural_key(kv[0])):
    want = tuple(np.shape(expected[path]))
    if k in classifier and (head == 'reset' or (
        head == 'fit' and k in source and tuple(np.shape(to_model(source[k]))) != want)):
      params[path] = np.asarray(expected[path])
      continue
    if k not in source and path[0] in keep_fresh:
      params[path] = np.asarray(expected[path])
      continue
    if k not in source:
      raise CheckpointFitError(f'{source_name} does not fit {variant}: missing key {k!r} (expected '
                       f'shape {shape_in_source(want)})')
    v = to_model(np.asarray(source[k]))
    if v.shape != want:
      other_classes = k in classifier and v.shape[:-1] == want[:-1]
      hint = f' ({classes_hint})' if other_classes and classes_hint else ''
      raise CheckpointFitError(f'{source_name} does not fit {variant}: key {k!r} has shape '
                       f'{tuple(np.shape(source[k]))} but {variant} expects '
                       f'{shape_in_source(want)}{hint}')
    params[path] = v.astype(getattr(expected[path], 'dtype', np.float32))
  return params


def params_from_state_dict(sd: dict[str, np.ndarray], model_or_params, *, variant: str,
                           source: str, head: str = 'load', reset_head: bool = False,
                           classes_hint: str = 'a different number of classes: pass '
                                               '--num_classes and --reset_head',
                           keep_fresh: tuple[str, ...] = ()) -> dict[tuple, Any]:
  """Maps a timm/official state dict onto a model's parameter paths, checking every key and shape.

  `model_or_params`: the model, or its {path: array}; see map_params for `head`
  (`reset_head=True` is head='reset').
  """
  expected = model_or_params if isinstance(model_or_params, dict) else flat_params(model_or_params)
  return map_params(official_to_timm(sd), expected, name_of=torch_key, variant=variant,
                    source_name=source, head='reset' if reset_head else head,
                    to_model=to_jax_layout, shape_in_source=torch_shape,
                    classes_hint=classes_hint, keep_fresh=keep_fresh)


def convert(variant: str, src: str, out: str, *, num_classes: int | None = None,
            reset_head: bool = False, seed: int = 0, model_kwargs: dict | None = None) -> str:
  """`model_kwargs`: structural keywords of a checkpoint that is not the variant's own shape (e.g.
  `depths` of a shortened model); saved with the params, so `load_pretrained(variant, out)`
  rebuilds the same model."""
  from flax import nnx
  from mambaout_jax.params import build_uninitialised, save_params
  from mambaout_jax.models.registry import create_model
  overrides = dict(model_kwargs or {})
  if num_classes is not None:
    overrides['num_classes'] = num_classes
  if reset_head:  # the fresh classifier needs a real random init
    model = create_model(variant, rngs=nnx.Rngs(seed), **overrides)
  else:
    model = build_uninitialised(variant, seed=seed, **overrides)
  from mambaout_jax import pretrained
  pretrained.check_variant(src, variant)
  kind, sd, _ = pretrained.read_source(src)
  if kind != 'state_dict':
    raise ValueError(f'{src} is already a params checkpoint: load it with '
                     f'mo.load_pretrained({variant!r}, {src!r})')
  params = params_from_state_dict(sd, model, variant=variant, source=src, reset_head=reset_head)
  check_params_match(model, params, source=src, variant=variant)
  assign_params(model, params)
  return save_params(out, model, variant=variant, model_kwargs=overrides,
                     extra_meta={'source': src, 'reset_head': reset_head})


def main(argv=None):
  import argparse
  p = argparse.ArgumentParser(prog='python -m mambaout_jax.convert', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--variant', required=True, help='model name, see mambaout_jax.list_models()')
  p.add_argument('--src', required=True, help='.pth / .pt / .bin / .safetensors state dict, or '
                 'hf-hub:timm/<tag>')
  p.add_argument('--out', required=True, help='output directory (params checkpoint)')
  p.add_argument('--num_classes', type=int, default=None, help='classifier size (default: 1000)')
  p.add_argument('--reset_head', action='store_true',
                 help='re-initialise the final classifier instead of loading it')
  p.add_argument('--seed', type=int, default=0, help='seed for a re-initialised head')
  args = p.parse_args(argv)
  try:
    out = convert(args.variant, args.src, args.out, num_classes=args.num_classes,
                  reset_head=args.reset_head, seed=args.seed)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {args.variant} params to {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())


__all__ = ['convert', 'read_state_dict', 'official_to_timm', 'params_from_state_dict', 'path_str']
