"""Parameters, MACs and the paper's long-sequence ratio L / 6D for any registered variant.

    python -m mambaout_jax.profile --variant=mambaout_tiny [--resolution=224] [--json]

MACs are counted from the traced computation (no weights are materialised), in fvcore's convention
(the one behind the paper's table): every `dot_general` contributes out_size x contraction, every
convolution out_size x kernel_area x in_channels/groups, every affine LayerNorm 5 x its input size;
activations, pooling and the SSM's elementwise recurrence are not counted. `macs_matmul_conv` leaves
the norms out (what `torch.utils.flop_counter` counts, halved). The paper's argument (Sec. 3): a token mixer with attention's quadratic
cost matters when L > 6D, i.e. the ratio L / 6D > 1; ImageNet at 224 px stays far below it.
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


def profile(variant: str, resolution: int = 224, **overrides) -> dict:
  from mambaout_jax.models.registry import create_model
  model = nnx.eval_shape(lambda: create_model(variant, rngs=nnx.Rngs(0), **overrides))
  _use_grouped_convs(model)
  model.eval()
  graphdef, state = nnx.split(model)
  params = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  x = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)

  def forward(state, x):
    return nnx.merge(graphdef, state)(x)

  with _record_layernorm_sizes([]) as norm_sizes:
    macs = count_macs(jax.make_jaxpr(forward)(state, x).jaxpr)

  def features(state, x):
    return nnx.merge(graphdef, state).forward_features(x)

  stages = []
  if hasattr(model, 'forward_features'):
    feats = jax.eval_shape(features, state, x)
    if isinstance(feats, (list, tuple)):
      for i, f in enumerate(feats):
        if len(f.shape) == 4:
          _, h, w, d = f.shape
          tokens = h * w
        else:  # (B, L, D) token sequences
          _, tokens, d = f.shape
        stages.append({'stage': i, 'tokens': int(tokens), 'width': int(d),
                       'L_over_6D': tokens / (6 * d)})
  return {'variant': variant, 'resolution': resolution, 'params': int(params),
          'macs': int(macs + 5 * sum(norm_sizes)), 'macs_matmul_conv': int(macs), 'stages': stages}


def main(argv=None) -> int:
  import argparse
  p = argparse.ArgumentParser(prog='python -m mambaout_jax.profile', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--variant', required=True)
  p.add_argument('--resolution', type=int, default=224)
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
  if r['stages']:
    print(f'{"stage":>5} {"tokens L":>9} {"width D":>8} {"L/6D":>7}')
    for s in r['stages']:
      print(f'{s["stage"]:>5} {s["tokens"]:>9} {s["width"]:>8} {s["L_over_6D"]:>7.3f}')
    print('The paper calls a stage long-sequence when L/6D > 1 (attention\'s quadratic term would '
          'then dominate a block\'s FLOPs).')
  return 0


if __name__ == '__main__':
  sys.exit(main())
