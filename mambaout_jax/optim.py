"""The paper's optimisation recipe in optax: AdamW, a weight-decay mask, timm's cosine schedule.

The official MambaOut scripts train with timm 0.6.11: `create_optimizer_v2(opt='adamw',
filter_bias_and_bn=True)` and `CosineLRScheduler(t_initial=epochs, lr_min, warmup_lr_init,
warmup_t=warmup_epochs, cycle_limit=1)` stepped once per epoch, with `cooldown_epochs` at `lr_min`
after the cosine. `cosine_schedule` reproduces those semantics as a function of the optimizer step,
either per epoch (`t = floor(step / steps_per_epoch)`, timm's default) or per step
(`t = step / steps_per_epoch`, a smooth version of the same curve).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# Parameters named like this get no weight decay whatever their rank: layer scale, the SSM's A_log
# and D, and ViT's position embedding and class token (timm's `no_weight_decay()`).
NO_DECAY_NAMES = ('bias', 'gamma', 'A_log', 'D', 'pos_embed', 'cls_token')


def learning_rate(config) -> float:
  """Peak lr: `lr` per `lr_base_batch` images, scaled linearly with the global batch (timm)."""
  return config.lr * config.batch_size / config.lr_base_batch if config.lr_base_batch else config.lr


def cosine_schedule(*, base_lr: float, steps_per_epoch: int, epochs: float, warmup_epochs: float,
                    warmup_lr: float, min_lr: float, per_step: bool = True) -> optax.Schedule:
  """timm 0.6.11 `CosineLRScheduler` (warmup_prefix=False, cycle_limit=1) as an optax schedule.

  t < warmup: warmup_lr + t * (base_lr - warmup_lr) / warmup
  t < epochs: min_lr + (base_lr - min_lr) * (1 + cos(pi * t / epochs)) / 2   (t is NOT shifted by
              the warm-up, as in timm without warmup_prefix)
  afterwards: min_lr (the cool-down epochs; timm trains `epochs + cooldown_epochs` in all).
  """
  def schedule(step):
    t = jnp.asarray(step, jnp.float32) / steps_per_epoch
    if not per_step:
      t = jnp.floor(t)
    warm = warmup_lr + t * (base_lr - warmup_lr) / max(warmup_epochs, 1e-12)
    cos = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * t / epochs))
    lr = jnp.where(t < epochs, cos, min_lr)
    return jnp.where(t < warmup_epochs, warm, lr)
  return schedule


def decay_mask(params) -> dict:
  """True where weight decay applies: every array with ndim > 1 except NO_DECAY_NAMES (timm's
  `filter_bias_and_bn` plus `no_weight_decay()` names)."""
  def rule(path, x):
    name = str(getattr(path[-1], 'key', path[-1]))
    return x.ndim > 1 and name not in NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(rule, params)


def create_optimizer(config, steps_per_epoch: int) -> tuple[optax.GradientTransformation,
                                                            optax.Schedule]:
  schedule = cosine_schedule(
      base_lr=learning_rate(config), steps_per_epoch=steps_per_epoch, epochs=config.num_epochs,
      warmup_epochs=config.warmup_epochs, warmup_lr=config.warmup_lr, min_lr=config.min_lr,
      per_step=config.schedule_per_step)
  if config.optimizer != 'adamw':
    raise ValueError(f"unknown optimizer {config.optimizer!r}; the paper's 'adamw' is the only one")
  tx = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                   weight_decay=config.weight_decay, mask=decay_mask)
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx, schedule
