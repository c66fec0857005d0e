r"""The paper's Sec. 3 cost argument, measured: FLOPs and activation memory against token count.

    python benchmarks/long_sequence.py [--dim=384] [--sides=14,24,32,48,64,96,128] [--json]
        [--plot=PATH.png] [--no-models]

For one token-mixing block at width D (attention = the ViT-S block, `vit.Block(D, D // 64)`; SSM =
the Mamba block, `mamba.MambaBlock(D)` with the sequential scan; Gated CNN = MambaOut's
`GatedCNNBlock(D)`) on L = side² tokens (196 .. 16384), and for the whole models (vit_small_patch16
at image size 16·side; mambaout_tiny and mamba_tiny at image size 4·side, so that their stage 1 has
L tokens), per image:
  * forward FLOPs, counted from the jaxpr (every dot/conv exactly, one FLOP per element of other
    arithmetic, scan bodies times their length) - not from a formula;
  * peak activation memory of one block's training step (input + parameter gradients): the
    compiled program's temporary buffers (`memory_analysis().temp_size_in_bytes`).
The attention core (softmax(QKᵀ)V, `jax.nn.dot_product_attention`) is counted on its own, and the
token count where its FLOPs equal the rest of the ViT block is interpolated between measured sizes
(the paper: L = 6D, 2304 for D = 384). Growth exponents are log-log slopes between the two largest
sizes (2 = quadratic, 1 = linear). Block programs are compiled on this CPU; whole models are only
traced (FLOPs), so `--no-models` only saves a few minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mambaout_jax.profile import _sub_jaxprs  # noqa: E402  (sub-programs of a jaxpr equation)

# ----------------------------------------------------------------------------------------------
# FLOPs from the jaxpr.

_FREE = {'reshape', 'broadcast_in_dim', 'transpose', 'slice', 'dynamic_slice', 'squeeze',
         'concatenate', 'pad', 'convert_element_type', 'gather', 'dynamic_update_slice', 'iota',
         'select_n', 'copy', 'copy_p', 'rev', 'expand_dims', 'stop_gradient', 'split',
         'sharding_constraint', 'device_put', 'pjit', 'closed_call', 'random_bits', 'random_wrap',
         'random_unwrap', 'random_seed', 'threefry2x32', 'argmax', 'argmin', 'sort', 'eq', 'ne',
         'lt', 'le', 'gt', 'ge', 'and', 'or', 'not', 'shift_left', 'shift_right_logical'}


def _size(aval) -> int:
  return int(np.prod(aval.shape)) if hasattr(aval, 'shape') else 1


def jaxpr_flops(jaxpr) -> float:
  """FLOPs of one evaluation: 2·M·N·K per dot, 2·out·window·in/groups per conv, one per element
  of other arithmetic (and per input element of a reduction), scan bodies times their length."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    subs = list(_sub_jaxprs(eqn))
    if name == 'scan':
      total += eqn.params['length'] * jaxpr_flops(eqn.params['jaxpr'].jaxpr)
    elif name == 'while':
      raise ValueError('a while loop has no static trip count; count with a scan instead')
    elif name == 'cond':
      total += max(jaxpr_flops(s) for s in subs)
    elif subs:  # pjit, custom_vjp_call, custom_jvp_call, remat, closed_call: the primal program
      total += jaxpr_flops(subs[0])
    elif name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      k = np.prod([eqn.invars[0].aval.shape[d] for d in lhs_contract])
      total += 2.0 * _size(eqn.outvars[0].aval) * k
    elif name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      dn = eqn.params['dimension_numbers']
      window = np.prod([rhs[d] for d in dn.rhs_spec[2:]])
      in_per_group = rhs[dn.rhs_spec[1]]
      total += 2.0 * _size(eqn.outvars[0].aval) * window * in_per_group
    elif name.startswith(('reduce_', 'cumsum', 'cumprod', 'cummax', 'argm')):
      total += _size(eqn.invars[0].aval)
    elif name not in _FREE:
      total += sum(_size(v.aval) for v in eqn.outvars)
  return total


def flops(fn, *args) -> float:
  return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def train_temp_bytes(module, x) -> int:
  """Temporary memory of the compiled gradient (w.r.t. input and parameters) of sum(block(x))."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def loss(params, x):
    return nnx.merge(graphdef, params, rest)(x).sum()

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


# ----------------------------------------------------------------------------------------------
# Analysis of the measured curves.

def crossover(tokens, quadratic, rest) -> float:
  """Token count where `quadratic` (rising faster) reaches `rest`, log-log interpolated."""
  t, q, r = (np.log(np.asarray(v, float)) for v in (tokens, quadratic, rest))
  d = q - r
  if d[0] >= 0:
    return float('nan') if d[0] > 0 else float(tokens[0])
  for i in range(1, len(t)):
    if d[i] >= 0:
      frac = -d[i - 1] / (d[i] - d[i - 1])
      return float(np.exp(t[i - 1] + frac * (t[i] - t[i - 1])))
  return float('nan')  # not reached within the measured sizes


def exponent(tokens, values) -> float:
  """Log-log slope between the two largest sizes: 2 = quadratic, 1 = linear."""
  return float(math.log(values[-1] / values[-2]) / math.log(tokens[-1] / tokens[-2]))


# ----------------------------------------------------------------------------------------------
# The three blocks and the three models.

def blocks(dim: int):
  from mambaout_jax.models import mamba
  from mambaout_jax.models import vit
  from mambaout_jax.models.mambaout import GatedCNNBlock
  rngs = nnx.Rngs(0)
  return {
      'attention': (vit.Block(dim, max(dim // 64, 1), rngs=rngs), 'tokens'),
      'ssm': (mamba.MambaBlock(dim, scan_mode='sequential', rngs=rngs), 'image'),
      'gated_cnn': (GatedCNNBlock(dim, rngs=rngs), 'image'),
  }


def measure_blocks(dim: int, sides, memory: bool = True) -> list[dict]:
  heads = max(dim // 64, 1)
  mods = blocks(dim)
  rows = []
  for side in sides:
    n = side * side
    row = {'tokens': n, 'side': side}
    for name, (module, layout) in mods.items():
      x = jnp.zeros((1, n, dim) if layout == 'tokens' else (1, side, side, dim), jnp.float32)
      graphdef, state = nnx.split(module)
      row[f'{name}_flops'] = flops(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
      if memory:
        row[f'{name}_train_temp_bytes'] = train_temp_bytes(module, x)
    q = jnp.zeros((1, n, heads, dim // heads), jnp.float32)
    row['attention_core_flops'] = flops(jax.nn.dot_product_attention, q, q, q)
    row['attention_rest_flops'] = row['attention_flops'] - row['attention_core_flops']
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  return rows


MODELS = {'vit_small_patch16': 16, 'mambaout_tiny': 4, 'mamba_tiny': 4}  # pixels per stage-1 token


def measure_models(sides) -> list[dict]:
  import mambaout_jax as mo
  rows = []
  for side in sides:
    row = {'tokens': side * side}
    for name, scale in MODELS.items():
      size = side * scale
      kw = {'img_size': size} if name.startswith('vit') else {}
      if name.startswith('mamba_'):
        kw['scan_mode'] = 'sequential'
      model = mo.create_model(name, rngs=nnx.Rngs(0), **kw)
      graphdef, state = nnx.split(model)
      x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
      row[f'{name}_image_size'] = size
      row[f'{name}_flops'] = flops(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  return rows


def summarize(dim: int, rows: list[dict]) -> dict:
  tokens = [r['tokens'] for r in rows]
  out = {'dim': dim, 'paper_crossover_tokens': 6 * dim,
         'attention_crossover_tokens': crossover(tokens, [r['attention_core_flops'] for r in rows],
                                                 [r['attention_rest_flops'] for r in rows]),
         'flops_exponents': {}, 'memory_exponents': {}}
  for name in ('attention', 'attention_core', 'attention_rest', 'ssm', 'gated_cnn'):
    out['flops_exponents'][name] = exponent(tokens, [r[f'{name}_flops'] for r in rows])
    if f'{name}_train_temp_bytes' in rows[0]:
      out['memory_exponents'][name] = exponent(tokens, [r[f'{name}_train_temp_bytes']
                                                        for r in rows])
  return out


def plot(path: str, rows: list[dict], model_rows: list[dict], summary: dict) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  tokens = [r['tokens'] for r in rows]
  panels = 3 if model_rows else 2
  fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
  ax = axes[0]
  for key, label in (('attention_flops', 'attention block (ViT-S)'),
                     ('attention_core_flops', '  of which softmax(QK^T)V'),
                     ('ssm_flops', 'Mamba (SSM) block'), ('gated_cnn_flops', 'Gated CNN block')):
    ax.loglog(tokens, [r[key] / 1e9 for r in rows], 'o-', label=label)
  ax.axvline(summary['attention_crossover_tokens'], color='gray', ls='--',
             label=f"measured crossover L={summary['attention_crossover_tokens']:.0f}")
  ax.axvline(summary['paper_crossover_tokens'], color='gray', ls=':', label=f"paper 6D={6 * summary['dim']}")
  ax.set(xlabel='tokens L', ylabel='forward GFLOPs per image', title=f"one block, D={summary['dim']}")
  ax.legend(fontsize=7)
  if 'attention_train_temp_bytes' in rows[0]:
    ax = axes[1]
    for name in ('attention', 'ssm', 'gated_cnn'):
      ax.loglog(tokens, [r[f'{name}_train_temp_bytes'] / 2 ** 20 for r in rows], 'o-', label=name)
    ax.set(xlabel='tokens L', ylabel='MiB per image', title='one block: training activations')
    ax.legend(fontsize=7)
  if model_rows:
    ax = axes[-1]
    mt = [r['tokens'] for r in model_rows]
    for name in MODELS:
      ax.loglog(mt, [r[f'{name}_flops'] / 1e9 for r in model_rows], 'o-', label=name)
    ax.set(xlabel='tokens L (stage 1)', ylabel='forward GFLOPs per image', title='whole model')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--dim', type=int, default=384)
  p.add_argument('--sides', default='14,24,32,48,64,96,128', help='tokens = side²')
  p.add_argument('--no-models', dest='models', action='store_false')
  p.add_argument('--no-memory', dest='memory', action='store_false')
  p.add_argument('--json', action='store_true')
  p.add_argument('--plot', default='')
  args = p.parse_args()
  sides = [int(s) for s in args.sides.split(',')]
  rows = measure_blocks(args.dim, sides, args.memory)
  model_rows = measure_models(sides) if args.models else []
  summary = summarize(args.dim, rows)
  if args.plot:
    plot(args.plot, rows, model_rows, summary)
  if args.json:
    print(json.dumps({**summary, 'rows': rows, 'model_rows': model_rows}))
    return
  mem = args.memory
  print(f"D={args.dim}: attention's softmax(QK^T)V equals the rest of the ViT block at "
        f"L = {summary['attention_crossover_tokens']:.0f} tokens (paper: 6D = {6 * args.dim})")
  print('growth exponents (largest two sizes), FLOPs: ' + ', '.join(
      f'{k} {v:.2f}' for k, v in summary['flops_exponents'].items()) + (
      '; training memory: ' + ', '.join(f'{k} {v:.2f}' for k, v in
                                         summary['memory_exponents'].items()) if mem else ''))
  print('| tokens L | attention GFLOPs (core) | SSM GFLOPs | Gated CNN GFLOPs |' +
        (' attention / SSM / Gated CNN train MiB |' if mem else ''))
  for r in rows:
    line = (f"| {r['tokens']} | {r['attention_flops'] / 1e9:.3g} ({r['attention_core_flops'] / 1e9:.3g})"
            f" | {r['ssm_flops'] / 1e9:.3g} | {r['gated_cnn_flops'] / 1e9:.3g} |")
    if mem:
      line += ' ' + ' / '.join(f"{r[f'{k}_train_temp_bytes'] / 2 ** 20:.0f}"
                               for k in ('attention', 'ssm', 'gated_cnn')) + ' |'
    print(line)
  if model_rows:
    print('| stage-1 tokens | ' + ' | '.join(f'{m} GFLOPs (image)' for m in MODELS) + ' |')
    for r in model_rows:
      print(f"| {r['tokens']} | " + ' | '.join(
          f"{r[f'{m}_flops'] / 1e9:.4g} ({r[f'{m}_image_size']}²)" for m in MODELS) + ' |')


if __name__ == '__main__':
  main()
