"""Parameters, MACs and the paper's long-sequence ratio L / 6D for any registered variant.

    python -m mambaout_jax.profile --variant=mambaout_tiny [--resolution=224] [--json]
    python -m mambaout_jax.profile --variant=upernet_mambaout_tiny --resolution=512x2048 --json

MACs are counted from the traced computation (no weights are materialised), in fvcore's convention
(the one behind the paper's table): every `dot_general` contributes out_size x contraction, every
convolution out_size x kernel_area x in_channels/groups, every affine LayerNorm 5 x its input size;
activations, pooling, resizing, BatchNorm and the SSM's elementwise recurrence are not counted.
`macs_matmul_conv` leaves the norms out (what `torch.utils.flop_counter` counts, halved).
Segmentation models (UperNet) count every parameter but only the inference forward's MACs (no
auxiliary head): the convention that reproduces the paper's Table 3; `aux_head_params` and
`aux_head_macs` give the auxiliary head's share. The paper's argument (Sec. 3): a token mixer with
attention's quadratic cost matters when L > 6D, i.e. the ratio L / 6D > 1; ImageNet at 224 px
stays far below it, ADE20K at 512x2048 is above it in the first three stages.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys

import jax
import jax.numpy as jnp
from flax import nnx


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for item in (v if isinstance(v, (list, tuple)) else (v,)):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def count_macs(jaxpr) -> int:
  """Multiply-accumulates of all dot_general / conv_general_dilated ops in a jaxpr (recursive)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (lc, _), _ = eqn.params['dimension_numbers']
      lhs_shape = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in lc)
    elif name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      dn = eqn.params['dimension_numbers']
      kernel_spatial = math.prod(rhs[d] for d in dn.rhs_spec[2:])
      in_per_group = rhs[dn.rhs_spec[1]]
      total += math.prod(eqn.outvars[0].aval.shape) * kernel_spatial * in_per_group
    else:
      mult = eqn.params.get('length', 1) if name == 'scan' else 1
      total += mult * sum(count_macs(sub) for sub in _sub_jaxprs(eqn))
  return total


@contextlib.contextmanager
def _record_layernorm_sizes(sizes: list):
  """While active, every nnx.LayerNorm call appends its input's element count to `sizes`."""
  original = nnx.LayerNorm.__call__

  def recording_call(self, x, *args, **kwargs):
    sizes.append(math.prod(x.shape))
    return original(self, x, *args, **kwargs)

  nnx.LayerNorm.__call__ = recording_call
  try:
    yield sizes
  finally:
    nnx.LayerNorm.__call__ = original


def _use_grouped_convs(model):
  """Depthwise convs as grouped convolutions so they are counted as convolutions."""
  from mambaout_jax.models.layers import DepthwiseConv2d
  for _, module in nnx.iter_modules(model):
    if isinstance(module, DepthwiseConv2d):
      module.impl = 'conv'


def parse_resolution(text) -> tuple[int, int]:
  """'224' -> (224, 224); '512x2048' -> (512, 2048) (height x width)."""
  parts = str(text).lower().split('x')
  try:
    h, w = (int(parts[0]),) * 2 if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    if len(parts) > 2 or h < 1 or w < 1:
      raise ValueError
  except ValueError:
    raise ValueError(f'bad resolution {text!r}; give one size (224) or HEIGHTxWIDTH (512x2048)') \
        from None
  return h, w


def profile(variant: str, resolution: int | str | tuple = 224, **overrides) -> dict:
  from mambaout_jax.models.registry import create_model
  model = nnx.eval_shape(lambda: create_model(variant, rngs=nnx.Rngs(0), **overrides))
  _use_grouped_convs(model)
  model.eval()
  graphdef, state = nnx.split(model)
  params = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  h, w = resolution if isinstance(resolution, tuple) else parse_resolution(resolution)
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)

  def forward(state, x):
    return nnx.merge(graphdef, state)(x)

  with _record_layernorm_sizes([]) as norm_sizes:
    macs = count_macs(jax.make_jaxpr(forward)(state, x).jaxpr)

  extra = {}
  if getattr(model, 'auxiliary_head', None) is not None:
    # Segmentation models: `params` counts every parameter (the auxiliary head's too), `macs` the
    # inference forward, which does not run the training-only auxiliary head (mmsegmentation's
    # get_flops convention, the one that reproduces the paper's Table 3).
    def forward_aux(state, x):
      return nnx.merge(graphdef, state)(x, return_aux=True)

    with _record_layernorm_sizes([]) as aux_norm_sizes:
      macs_aux = count_macs(jax.make_jaxpr(forward_aux)(state, x).jaxpr)
    extra = {'aux_head_params': int(sum(math.prod(v.shape) for v in jax.tree.leaves(
                 nnx.state(model.auxiliary_head, nnx.Param)))),
             'aux_head_macs': int(macs_aux + 5 * sum(aux_norm_sizes)
                                  - macs - 5 * sum(norm_sizes))}

  def features(state, x):
    return nnx.merge(graphdef, state).forward_features(x)

  stages = []
  if hasattr(model, 'forward_features'):
    feats = jax.eval_shape(features, state, x)
    if isinstance(feats, (list, tuple)):
      for i, f in enumerate(feats):
        if len(f.shape) == 4:
          _, fh, fw, d = f.shape
          tokens = fh * fw
        else:  # (B, L, D) token sequences
          _, tokens, d = f.shape
        stages.append({'stage': i, 'tokens': int(tokens), 'width': int(d),
                       'L_over_6D': tokens / (6 * d)})
  return {'variant': variant, 'resolution': h if h == w else f'{h}x{w}', 'params': int(params),
          'macs': int(macs + 5 * sum(norm_sizes)), 'macs_matmul_conv': int(macs), **extra,
          'stages': stages}


def main(argv=None) -> int:
  import argparse
  p = argparse.ArgumentParser(prog='python -m mambaout_jax.profile', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--variant', required=True)
  p.add_argument('--resolution', default='224', help='SIZE or HEIGHTxWIDTH, e.g. 512x2048')
  p.add_argument('--json', action='store_true', help='print one JSON object')
  args = p.parse_args(argv)
  try:
    r = profile(args.variant, args.resolution)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps(r))
    return 0
  print(f'{r["variant"]} @ {r["resolution"]}px: {r["params"] / 1e6:.2f}M params, '
        f'{r["macs"] / 1e9:.2f}G MACs')
  if 'aux_head_params' in r:
    print(f'(params include the training-only auxiliary head: {r["aux_head_params"] / 1e6:.2f}M; '
          f'MACs do not: it would add {r["aux_head_macs"] / 1e9:.2f}G)')
  if r['stages']:
    print(f'{"stage":>5} {"tokens L":>9} {"width D":>8} {"L/6D":>7}')
    for s in r['stages']:
      print(f'{s["stage"]:>5} {s["tokens"]:>9} {s["width"]:>8} {s["L_over_6D"]:>7.3f}')
    print('The paper calls a stage long-sequence when L/6D > 1 (attention\'s quadratic term would '
          'then dominate a block\'s FLOPs).')
  return 0


if __name__ == '__main__':
  sys.exit(main())
