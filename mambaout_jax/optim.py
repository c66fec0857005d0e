"""The paper's optimisation recipe in optax: AdamW, a weight-decay mask, timm's cosine schedule.

The official MambaOut scripts train with timm 0.6.11: `create_optimizer_v2(opt='adamw',
filter_bias_and_bn=True)` and `CosineLRScheduler(t_initial=epochs, lr_min, warmup_lr_init,
warmup_t=warmup_epochs, cycle_limit=1)` stepped once per epoch, with `cooldown_epochs` at `lr_min`
after the cosine. `cosine_schedule` reproduces those semantics as a function of the optimizer step,
either per epoch (`t = floor(step / steps_per_epoch)`, timm's default) or per step
(`t = step / steps_per_epoch`, a smooth version of the same curve).

Segmentation (`config.schedule = 'poly'`) uses mmsegmentation's schedule from Swin's UperNet
config instead: `poly_schedule`, mmcv's `PolyLrUpdaterHook` with linear warm-up, per iteration.
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


def poly_schedule(*, base_lr: float, total_steps: int, warmup_steps: int, warmup_ratio: float,
                  power: float = 1.0, min_lr: float = 0.0) -> optax.Schedule:
  """mmcv's `lr_config=dict(policy='poly', warmup='linear', warmup_iters, warmup_ratio, power,
  min_lr, by_epoch=False)` (Swin's mmseg UperNet config) as an optax schedule of the step t:

  poly(t) = (base_lr - min_lr) * (1 - t / total_steps) ** power + min_lr
  t < warmup_steps: poly(t) * (1 - (1 - t / warmup_steps) * (1 - warmup_ratio))
  so the warm-up starts at warmup_ratio * base_lr (1e-6 x 1e-4 = 1e-10 in the paper's setup; a
  RATIO, like mmseg 1.x's LinearLR(start_factor=1e-6)) and scales the poly curve, which is not
  shifted by the warm-up (mmcv computes the regular lr first and multiplies it during warm-up).
  """
  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    frac = jnp.clip((total_steps - t) / total_steps, 0.0, 1.0)  # exact steps left, then divide
    lr = (base_lr - min_lr) * frac ** power + min_lr
    if warmup_steps > 0:
      # = 1 - (1 - t / warmup_steps) * (1 - warmup_ratio), without float32 cancellation near t=0
      factor = warmup_ratio + (1.0 - warmup_ratio) * t / warmup_steps
      lr = jnp.where(t < warmup_steps, lr * factor, lr)
    return lr
  return schedule


def create_schedule(config, steps_per_epoch: float) -> optax.Schedule:
  """`config.schedule`: 'cosine' (timm, the classification recipes) or 'poly' (mmseg)."""
  kind = config.get('schedule', 'cosine')
  if kind == 'cosine':
    return cosine_schedule(
        base_lr=learning_rate(config), steps_per_epoch=steps_per_epoch, epochs=config.num_epochs,
        warmup_epochs=config.warmup_epochs, warmup_lr=config.warmup_lr, min_lr=config.min_lr,
        per_step=config.schedule_per_step)
  if kind == 'poly':
    total = config.total_steps or int(round(config.num_epochs * steps_per_epoch))
    return poly_schedule(base_lr=learning_rate(config), total_steps=total,
                         warmup_steps=config.warmup_steps, warmup_ratio=config.warmup_ratio,
                         power=config.poly_power, min_lr=config.min_lr)
  raise ValueError(f"unknown config.schedule {kind!r}; choose 'cosine' or 'poly'")


def decay_mask(params) -> dict:
  """True where weight decay applies: every array with ndim > 1 except NO_DECAY_NAMES (timm's
  `filter_bias_and_bn` plus `no_weight_decay()` names)."""
  def rule(path, x):
    name = str(getattr(path[-1], 'key', path[-1]))
    return x.ndim > 1 and name not in NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(rule, params)


def create_optimizer(config, steps_per_epoch: int) -> tuple[optax.GradientTransformation,
                                                            optax.Schedule]:
  schedule = create_schedule(config, steps_per_epoch)
  if config.optimizer != 'adamw':
    raise ValueError(f"unknown optimizer {config.optimizer!r}; the paper's 'adamw' is the only one")
  tx = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                   weight_decay=config.weight_decay, mask=decay_mask)
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx, schedule
