"""Selective-scan speed and memory: forward + backward per mode vs a naive materialising scan.

  python benchmarks/scan.py                       # B=8, D=192, N=16, L in 196 784 3136 12544
  python benchmarks/scan.py --lengths 196 3136 --modes sequential chunked

For each length and mode: the time of one jitted forward + backward (gradients w.r.t. all eight
inputs; the best of --repeats runs after a warm-up) and the peak memory XLA plans for it
(`compiled.memory_analysis()`: temporaries + arguments + outputs), with ratios to the naive version.
The naive version materialises exp(delta A) and delta B u as (B, L, D, N) tensors and runs
`jax.lax.associative_scan` over them, differentiated by JAX. Programs whose planned memory exceeds
--max_gib are compiled (so their memory is reported) but not run. Timings on a shared machine
are noisy.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from mambaout_jax.models.ssm import DEFAULT_CHUNK_SIZE, default_scan_mode, selective_scan

GIB = 2 ** 30


def naive_scan(u, delta, A, B, C, D, z, delta_bias):
  delta = jax.nn.softplus(delta + delta_bias)
  dA = jnp.exp(jnp.einsum('bld,dn->bldn', delta, A))
  dBu = jnp.einsum('bld,bln,bld->bldn', delta, B, u)
  _, hs = jax.lax.associative_scan(lambda x, y: (x[0] * y[0], y[0] * x[1] + y[1]), (dA, dBu),
                                   axis=1)
  y = jnp.einsum('bldn,bln->bld', hs, C) + u * D
  return y * jax.nn.silu(z)


def mode_scan(mode, chunk_size):
  def f(u, delta, A, B, C, D, z, delta_bias):
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, mode=mode,
                          chunk_size=chunk_size)
  return f


def inputs(batch, length, dim, state):
  k = jax.random.split(jax.random.key(0), 6)
  return (jax.random.normal(k[0], (batch, length, dim)),
          jax.random.normal(k[1], (batch, length, dim)) - 2.0,
          -jnp.tile(jnp.arange(1, state + 1, dtype=jnp.float32), (dim, 1)),
          jax.random.normal(k[2], (batch, length, state)),
          jax.random.normal(k[3], (batch, length, state)),
          jnp.ones((dim,)), jax.random.normal(k[4], (batch, length, dim)),
          jnp.full((dim,), -1.0))


def measure(fn, args, repeats, max_bytes):
  """(seconds or None, planned peak bytes) for jit(grad(sum(fn(args) * w))) w.r.t. all args."""
  w = jnp.cos(jnp.arange(args[0].size, dtype=jnp.float32).reshape(args[0].shape))
  step = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=tuple(range(len(args)))))
  compiled = step.lower(*args).compile()
  mem = compiled.memory_analysis()
  peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes)
  if peak > max_bytes:
    return None, peak
  jax.block_until_ready(compiled(*args))
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - t0)
  return best, peak


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--lengths', type=int, nargs='+', default=[196, 784, 3136, 12544])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--dim', type=int, default=192)
  parser.add_argument('--state', type=int, default=16)
  parser.add_argument('--modes', nargs='+', default=['sequential', 'chunked', 'associative'])
  parser.add_argument('--chunk_size', type=int, default=None,
                      help='steps per chunk (default: each mode\'s DEFAULT_CHUNK_SIZE)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--max_gib', type=float, default=6.0,
                      help='compile but do not run programs planning more memory than this')
  args = parser.parse_args()

  print(f'backend {jax.default_backend()} ({jax.devices()[0].device_kind}), auto mode = '
        f'{default_scan_mode()}; B={args.batch} D={args.dim} N={args.state} '
        f'chunk={args.chunk_size or DEFAULT_CHUNK_SIZE}; forward+backward w.r.t. all inputs, best of {args.repeats}\n')
  print('| L | version | time (s) | peak memory (MiB) | speed-up vs naive | memory vs naive |')
  print('|---:|---|---:|---:|---:|---:|')
  for length in args.lengths:
    x = inputs(args.batch, length, args.dim, args.state)
    base_t, base_m = measure(naive_scan, x, max(1, args.repeats - 1), args.max_gib * GIB)
    rows = [('naive materialising', base_t, base_m)]
    for mode in args.modes:
      rows.append((mode, *measure(mode_scan(mode, args.chunk_size), x, args.repeats,
                                  args.max_gib * GIB)))
    for name, t, m in rows:
      t_s = f'{t:.3f}' if t is not None else 'not run'
      speed = f'{base_t / t:.1f}x' if t and base_t else '-'
      print(f'| {length} | {name} | {t_s} | {m / 2 ** 20:.0f} | {speed} | {m / base_m:.3f} |',
            flush=True)


if __name__ == '__main__':
  main()
