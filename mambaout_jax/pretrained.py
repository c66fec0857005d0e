"""Pretrained weights from anywhere: params checkpoints, PyTorch files and timm Hub names.

    python -m mambaout_jax.pretrained            # the timm Hub tags: resolution, crop, timm's top-1

A *source* is one of
  * a params checkpoint directory (`python -m mambaout_jax.convert` output, or a run's
    `WORKDIR/export`), local or gs://;
  * an official `.pth` or a timm `.safetensors` / `.pth` / `.bin` file, local or gs://, converted
    on the fly (`.pth` is read with `torch.load(weights_only=True)`: nothing else is unpickled);
  * `hf-hub:timm/<tag>`, e.g. `hf-hub:timm/mambaout_tiny.in1k`: the file is taken from the
    huggingface_hub cache when it is there (nothing is contacted then), else downloaded into it.
    `HF_HUB_OFFLINE=1` never contacts the Hub; `HF_HUB_CACHE` moves the cache.

`init_params` puts a source's weights into a model's freshly initialised params (the trainer's
`config.init_from`); `load` builds a ready model from a source (predict, the web demo, Colab);
`eval_overrides` gives the eval transform that a Hub tag was evaluated with.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from typing import Any

import numpy as np
from absl import logging

from mambaout_jax.convert import CheckpointFitError

HUB_PREFIX = 'hf-hub:'
HUB_FILES = ('model.safetensors', 'pytorch_model.bin')  # timm's order of preference
TIMM_RESULTS = ('timm results/results-imagenet.csv (pytorch-image-models commit aa4b585, '
                'Aug 2026)')


@dataclasses.dataclass(frozen=True)
class HubTag:
  """A timm pretrained tag: its classifier and the eval transform of its pretrained config."""
  num_classes: int
  image_size: int            # pretrained_cfg input_size
  crop_pct: float
  interpolation: str
  crop_mode: str             # 'center'; 'squash' resizes the whole image to image_size (r384)
  test_image_size: int       # pretrained_cfg test_input_size (evaluated at crop_pct test_crop_pct)
  test_crop_pct: float | None
  top1: float | None         # timm's ImageNet-1k top-1 at image_size (TIMM_RESULTS)
  top1_test: float | None    # ... at test_image_size


def _tag(num_classes, image_size, crop_pct, interpolation, crop_mode, test_image_size,
         test_crop_pct, top1, top1_test):
  return HubTag(num_classes, image_size, crop_pct, interpolation, crop_mode, test_image_size,
                test_crop_pct, top1, top1_test)


# Every tag `timm.list_pretrained('mambaout*')` lists in timm 1.0.31 with its pretrained_cfg
# (tests/test_pretrained.py compares this table with the installed timm), and the top-1 that
# TIMM_RESULTS reports for it (None: not an ImageNet-1k classifier).
TIMM_TAGS: dict[str, HubTag] = {
    'mambaout_femto.in1k': _tag(1000, 224, 1.0, 'bicubic', 'center', 288, None, 78.880, 79.912),
    'mambaout_kobe.in1k': _tag(1000, 224, 1.0, 'bicubic', 'center', 288, None, 79.986, 81.064),
    'mambaout_tiny.in1k': _tag(1000, 224, 1.0, 'bicubic', 'center', 288, None, 82.742, 83.452),
    'mambaout_small.in1k': _tag(1000, 224, 1.0, 'bicubic', 'center', 288, None, 84.094, 84.512),
    'mambaout_base.in1k': _tag(1000, 224, 1.0, 'bicubic', 'center', 288, None, 84.194, 84.730),
    'mambaout_small_rw.sw_e450_in1k': _tag(1000, 224, 1.0, 'bicubic', 'center', 288, None,
                                           84.040, 84.604),
    'mambaout_base_short_rw.sw_e500_in1k': _tag(1000, 224, 0.95, 'bicubic', 'center', 288, 1.0,
                                                84.364, 84.842),
    'mambaout_base_tall_rw.sw_e500_in1k': _tag(1000, 224, 0.95, 'bicubic', 'center', 288, 1.0,
                                               84.436, 84.988),
    'mambaout_base_wide_rw.sw_e500_in1k': _tag(1000, 224, 0.95, 'bicubic', 'center', 288, 1.0,
                                               84.448, 84.966),
    'mambaout_base_plus_rw.sw_e150_in12k': _tag(11821, 224, 1.0, 'bicubic', 'center', 288, None,
                                                None, None),
    'mambaout_base_plus_rw.sw_e150_in12k_ft_in1k': _tag(1000, 224, 1.0, 'bicubic', 'center', 288,
                                                        None, 86.642, 86.916),
    'mambaout_base_plus_rw.sw_e150_r384_in12k_ft_in1k': _tag(1000, 384, 1.0, 'bicubic', 'squash',
                                                             384, None, 87.508, 87.508),
}


def tag_variant(tag: str) -> str:
  """'mambaout_tiny.in1k' -> 'mambaout_tiny' (timm's model names are ours)."""
  return tag.split('.', 1)[0]


# ----------------------------------------------------------------------------------------------
# Resolving a source to local files.

def hub_repo(source: str) -> str | None:
  """'hf-hub:timm/mambaout_tiny.in1k' -> 'timm/mambaout_tiny.in1k'; None for other sources."""
  if not source.startswith(HUB_PREFIX):
    return None
  repo = source[len(HUB_PREFIX):].strip('/')
  if repo.count('/') != 1:
    raise CheckpointFitError(f'{source!r} is not a Hub name; write hf-hub:OWNER/NAME, e.g. '
                             'hf-hub:timm/mambaout_tiny.in1k')
  owner, name = repo.split('/')
  if owner == 'timm' and name not in TIMM_TAGS:
    raise CheckpointFitError(f'{source!r}: timm has no MambaOut weights named {name!r}; the tags '
                             f'are {", ".join(TIMM_TAGS)}')
  return repo


def check_variant(source: str, variant: str):
  """A timm Hub tag names its model ('mambaout_tiny.in1k' is mambaout_tiny): refuse another."""
  repo = hub_repo(source)
  if repo is not None and repo.startswith('timm/'):
    name = tag_variant(repo.split('/', 1)[1])
    if name != variant:
      raise CheckpointFitError(f'{source} holds {name} weights, but the model is {variant}; use '
                               f'{name} (--config.model.name={name} / --variant={name}) or a '
                               f'{variant} tag')


def hub_tag(source: str) -> HubTag | None:
  """The timm tag of a `hf-hub:timm/<tag>` source, else None."""
  repo = hub_repo(source)
  if repo is None or not repo.startswith('timm/'):
    return None
  return TIMM_TAGS[repo.split('/', 1)[1]]


def hub_file(source: str) -> str:
  """Local path of a Hub source's weights: the huggingface_hub cache first, then a download.

  The environment is read at each call (HF_HUB_OFFLINE, HF_HUB_CACHE), so a process may set it
  after importing huggingface_hub.
  """
  repo = hub_repo(source)
  try:
    import huggingface_hub
  except ImportError:
    raise ImportError(f'{source} needs huggingface_hub (pip install huggingface_hub)') from None
  cache_dir = os.environ.get('HF_HUB_CACHE') or None
  for filename in HUB_FILES:  # the cache first: nothing is contacted when the file is there
    path = huggingface_hub.try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
    if isinstance(path, str):
      return path
  offline = os.environ.get('HF_HUB_OFFLINE', '').strip().upper() in ('1', 'ON', 'YES', 'TRUE')
  where = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
  fix = (f'download it where the Hub is reachable (`hf download {repo} {HUB_FILES[0]}`, '
         f'cache {where}) or pass a local .safetensors file')
  if offline:
    raise FileNotFoundError(f'{source}: {HUB_FILES[0]} is not in the Hugging Face cache {where} '
                            f'and HF_HUB_OFFLINE=1 forbids a download; {fix}')
  from huggingface_hub import errors
  try:
    return huggingface_hub.hf_hub_download(repo, HUB_FILES[0], cache_dir=cache_dir)
  except errors.RemoteEntryNotFoundError:  # an older repository with only a .bin
    try:
      return huggingface_hub.hf_hub_download(repo, HUB_FILES[1], cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - whatever the Hub says, one line
      raise FileNotFoundError(f'{source}: no {" or ".join(HUB_FILES)} on the Hub '
                              f'({type(e).__name__})') from None
  except errors.RepositoryNotFoundError:
    raise FileNotFoundError(f'{source}: no such repository on the Hugging Face Hub (or it is '
                            'private: log in with `hf auth login`)') from None
  except Exception as e:  # noqa: BLE001 - not cached and the Hub not reachable
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise FileNotFoundError(f'{source}: not in the Hugging Face cache {where} and the Hub is '
                            f'not reachable ({reason[:120]}); {fix}') from None


def _exists(path: str) -> tuple[bool, bool]:
  """(exists, is a directory), local or gs://."""
  if '://' not in path:
    return os.path.exists(path), os.path.isdir(path)
  from etils import epath
  p = epath.Path(path)
  return p.exists(), p.is_dir()


def _local_copy(path: str) -> str:
  """A gs:// (or other URL-like) file copied to a temporary local file; local paths as they are."""
  if '://' not in path:
    return path
  from etils import epath
  fd, local = tempfile.mkstemp(suffix=os.path.splitext(path)[1])
  with os.fdopen(fd, 'wb') as f:
    f.write(epath.Path(path).read_bytes())
  return local


def _refuse_workdir(directory: str):
  """A training workdir given where its params export is meant: say which directory to pass."""
  from mambaout_jax.params import META_FILE
  export = os.path.join(directory, 'export')
  if not _exists(os.path.join(directory, META_FILE))[0] and _exists(os.path.join(export,
                                                                                 META_FILE))[0]:
    raise FileNotFoundError(f'{directory} is a training workdir; pass its params export {export}')


def read_source(source: str) -> tuple[str, dict, dict]:
  """('params', {path tuple: array}, meta) for a params checkpoint directory, or
  ('state_dict', {torch key: array}, {}) for a PyTorch file or a Hub name."""
  from mambaout_jax import convert, params as params_lib
  if not source:
    raise ValueError('no pretrained source given (empty string)')
  if hub_repo(source) is not None:
    return 'state_dict', convert.read_state_dict(hub_file(source)), {}
  exists, is_dir = _exists(source)
  if not exists:
    raise FileNotFoundError(f'{source}: no such file or directory; give a params checkpoint '
                            'directory, a .pth/.safetensors file or hf-hub:timm/<tag>')
  if is_dir:
    _refuse_workdir(source)
    params, meta = params_lib.read_params(source)
    return 'params', params, meta
  local = _local_copy(source)
  try:
    return 'state_dict', convert.read_state_dict(local), {}
  finally:
    if local != source:
      os.remove(local)


# ----------------------------------------------------------------------------------------------
# Putting a source's weights into params.

def _flatten(tree: dict, prefix=()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: dict[tuple, Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def init_params(source: str, params: dict, *, variant: str, init_head: str = '',
                backbone_only: bool = False) -> dict:
  """`params` (a model's freshly initialised params, nested dict) with every entry from `source`.

  init_head='reset': a classifier whose shape differs from the source's (another number of
  classes) keeps its fresh initialisation; with '' such a classifier is refused. backbone_only:
  the source's `head.*` keys are dropped and every key of `params` must come from the source,
  except a dense-task backbone's output norms (`norm0`..`norm3`), which keep their fresh init when
  the source (a classification checkpoint) has none.
  Any other missing, unexpected or mis-shaped key is refused with a one-line ValueError.
  """
  from mambaout_jax import convert
  from mambaout_jax.models.mambaout import DENSE_OUTPUT_NORMS
  from mambaout_jax.params import path_str
  if init_head not in ('', 'reset'):
    raise ValueError(f"unknown init_head {init_head!r}; use '' (load the classifier) or 'reset' "
                     "(re-initialise it when the number of classes differs)")
  check_variant(source, variant)
  head = 'drop' if backbone_only else ('fit' if init_head == 'reset' else 'load')
  hint = 'another number of classes: set --config.init_head=reset to re-initialise the classifier'
  expected = _flatten(params)
  keep_fresh = DENSE_OUTPUT_NORMS if backbone_only else ()
  kind, weights, meta = read_source(source)
  if kind == 'params':
    if meta.get('variant') not in (None, variant) and not backbone_only:
      raise CheckpointFitError(
          f'{source} holds a {meta["variant"]} checkpoint, but the model is {variant}; set '
          f'--config.model.name={meta["variant"]}')
    by_str = {path_str(p): v for p, v in weights.items()}
    flat = convert.map_params(by_str, expected, name_of=path_str, variant=variant,
                              source_name=source, head=head, classes_hint=hint,
                              keep_fresh=keep_fresh)
  else:
    flat = convert.params_from_state_dict(weights, expected, variant=variant, source=source,
                                          head=head, classes_hint=hint, keep_fresh=keep_fresh)
  return _unflatten({p: np.asarray(v) for p, v in flat.items()})


def eval_overrides(source: str) -> dict[str, Any]:
  """Config overrides that evaluate a timm Hub tag with its pretrained config's eval transform
  (input size, crop_pct, interpolation); {} for other sources."""
  tag = hub_tag(source) if source else None
  if tag is None:
    return {}
  return {'image_size': tag.image_size, 'aug.crop_pct': tag.crop_pct,
          'aug.eval_interpolation': tag.interpolation}


def load(variant: str, source: str, *, seed: int = 0, **overrides):
  """Builds `variant` with the weights of any source (see the module docstring), in eval mode.

  The number of classes comes from the source (a Hub tag's, a checkpoint's meta, or the shape of
  a state dict's classifier) unless `num_classes` is given.
  """
  from mambaout_jax import convert, params as params_lib
  from mambaout_jax.params import assign_params, build_uninitialised, check_params_match
  check_variant(source, variant)
  if source and hub_repo(source) is None and _exists(source)[1]:
    _refuse_workdir(source)
    return params_lib.load_pretrained(variant, source, seed=seed, **overrides)
  _, weights, _ = read_source(source)
  weights = convert.official_to_timm(weights)
  if 'num_classes' not in overrides:
    fc = weights.get('head.fc.weight', weights.get('head.weight'))
    if fc is not None:
      overrides['num_classes'] = int(fc.shape[0])
  model = build_uninitialised(variant, seed=seed, **overrides)
  params = convert.params_from_state_dict(weights, model, variant=variant, source=source)
  check_params_match(model, params, source=source, variant=variant)
  assign_params(model, params)
  model.eval()
  return model


# ----------------------------------------------------------------------------------------------
# The README table.

def tags_table() -> str:
  """Markdown: every timm tag, the eval transform it is validated with, timm's top-1."""
  lines = ['| `hf-hub:timm/<tag>` | classes | eval size | crop_pct | interpolation | timm top-1 '
           '| timm top-1 at test size |', '|---|---|---|---|---|---|---|']
  for name, t in TIMM_TAGS.items():
    crop = f'{t.crop_pct}' + (' (squash)' if t.crop_mode == 'squash' else '')
    top1 = '—' if t.top1 is None else f'{t.top1:.3f}'
    test = '—' if t.top1_test is None else (
        f'{t.top1_test:.3f} @ {t.test_image_size} (crop {t.test_crop_pct or t.crop_pct})')
    lines.append(f'| `{name}` | {t.num_classes} | {t.image_size} | {crop} | {t.interpolation} '
                 f'| {top1} | {test} |')
  return '\n'.join(lines) + f'\n\nTop-1 from {TIMM_RESULTS}.'


def main(argv=None) -> int:
  import argparse
  p = argparse.ArgumentParser(prog='python -m mambaout_jax.pretrained', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.parse_args(argv)
  print(tags_table())
  return 0


if __name__ == '__main__':
  sys.exit(main())


def apply_eval_overrides(config, argv, *, mode: str):
  """--mode=eval of a timm Hub tag (--config.init_from=hf-hub:timm/<tag>) uses the eval transform
  of the tag's pretrained config (image size, crop_pct, interpolation), except for the keys the
  command line sets itself."""
  if mode != 'eval' or not config.get('init_from'):
    return
  overrides = eval_overrides(config.init_from)  # CheckpointFitError: bad Hub name
  explicit = {a.split('=')[0][len('--config.'):] for a in argv if a.startswith('--config.')}
  overrides = {k: v for k, v in overrides.items() if k not in explicit}
  if overrides:
    logging.info('evaluating %s with its pretrained eval transform: %s', config.init_from,
                 ', '.join(f'{k}={v}' for k, v in overrides.items()))
    config.update_from_flattened_dict(overrides)
