"""Our jitted forward / train step vs timm's eager PyTorch, in one process, on this machine's CPU.

    python benchmarks/cpu_vs_timm.py [--variants=mambaout_femto,mambaout_tiny] [--batch=16]

Both sides: same architecture at 224², batch 16, float32. Forward = inference logits; train step =
cross-entropy + backward + AdamW update (optax.adamw vs torch.optim.AdamW). Prints images/s and the
ratio ours / timm (> 1 means we are faster). Targets: forward >= 1.5x, train step >= 1.0x.
Also times our depthwise-conv formulations against each other, so the per-backend choice is
visible. Run it on an otherwise idle machine: both frameworks use all cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import mambaout_jax as mo  # noqa: E402
from mambaout_jax.models.mambaout import TIMM_NAMES  # noqa: E402


def best_time(fn, reps: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def ours(variant, batch, reps, impl):
  model = mo.create_model(variant, rngs=nnx.Rngs(0), dwconv_impl=impl)
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jnp.asarray(np.random.RandomState(0).randn(batch, 224, 224, 3), jnp.float32)
  y = jnp.asarray(np.random.RandomState(1).randint(0, 1000, batch))

  @jax.jit
  def forward(params, x):
    return nnx.merge(graphdef, params, rest)(x)

  tx = optax.adamw(1e-3, weight_decay=0.05)
  opt_state = tx.init(params)

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params, rest)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [params, opt_state]

  def step():
    state[0], state[1], loss = train_step(state[0], state[1], x, y)
    loss.block_until_ready()

  fwd = best_time(lambda: forward(params, x).block_until_ready(), reps)
  trn = best_time(step, reps)
  return batch / fwd, batch / trn


def timm_side(variant, batch, reps):
  import timm
  model = timm.create_model(TIMM_NAMES[variant], pretrained=False)
  x = torch.randn(batch, 3, 224, 224)
  y = torch.randint(0, 1000, (batch,))
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
  model.eval()

  def forward():
    with torch.no_grad():
      model(x)

  def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()

  fwd = best_time(forward, reps)
  model.train()
  trn = best_time(step, reps)
  return batch / fwd, batch / trn


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--variants', default='mambaout_femto,mambaout_tiny')
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--impls', default='shift,conv', help="depthwise formulations to time ('auto' picks)")
  args = p.parse_args()
  print(f'jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} '
        f'({torch.get_num_threads()} threads), batch {args.batch}, 224px, median of {args.reps}')
  print(f'{"variant":<16} {"impl":<6} {"fwd img/s":>10} {"timm":>8} {"ratio":>6}   '
        f'{"train img/s":>11} {"timm":>8} {"ratio":>6}')
  for variant in args.variants.split(','):
    t_fwd, t_trn = timm_side(variant, args.batch, args.reps)
    for impl in args.impls.split(','):
      o_fwd, o_trn = ours(variant, args.batch, args.reps, impl)
      print(f'{variant:<16} {impl:<6} {o_fwd:>10.1f} {t_fwd:>8.1f} {o_fwd / t_fwd:>6.2f}   '
            f'{o_trn:>11.1f} {t_trn:>8.1f} {o_trn / t_trn:>6.2f}', flush=True)


if __name__ == '__main__':
  main()
