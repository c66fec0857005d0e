"""Mixup / CutMix on device, timm's `Mixup` in batch mode as a pure, jittable jax function."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
  """One-hot targets with `label_smoothing` spread over all classes (timm's `one_hot`)."""
  off = label_smoothing / num_classes
  on = 1.0 - label_smoothing + off
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on - off) + off


def cutmix_box(rng: jax.Array, height: int, width: int, lam: jax.Array):
  """timm's `rand_bbox`: a box of area ~(1 - lam) centred uniformly, clipped to the image.

  Returns the (height, width) boolean mask of the box and the area-corrected lam.
  """
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = (height * ratio).astype(jnp.int32)
  cut_w = (width * ratio).astype(jnp.int32)
  rng_y, rng_x = jax.random.split(rng)
  cy = jax.random.randint(rng_y, (), 0, height)
  cx = jax.random.randint(rng_x, (), 0, width)
  y_lo, y_hi = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x_lo, x_hi = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  mask = (rows >= y_lo) & (rows < y_hi) & (cols >= x_lo) & (cols < x_hi)
  corrected_lam = 1.0 - (y_hi - y_lo) * (x_hi - x_lo) / (height * width)
  return mask, corrected_lam.astype(jnp.float32)


def mixup_cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                 prob: float = 1.0, label_smoothing: float = 0.1):
  """Mixes each image (NHWC) with the batch reversed, one lam per batch, as timm's Mixup.

  With probability `prob` the batch is mixed: CutMix with probability `switch_prob` (when both
  alphas are > 0), lam ~ Beta(alpha, alpha), the CutMix lam corrected to the clipped box area.
  Returns (images, soft targets float32 (B, num_classes)). With both alphas 0 it returns the
  images unchanged and label-smoothed one-hot targets.
  """
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if (mixup_alpha <= 0 and cutmix_alpha <= 0) or prob <= 0:
    return images, targets
  rng_apply, rng_switch, rng_mixup, rng_cutmix, rng_box = jax.random.split(rng, 5)
  apply = jax.random.uniform(rng_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(rng_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(rng_mixup, max(mixup_alpha, 1e-6), max(mixup_alpha, 1e-6))
  lam_cutmix = jax.random.beta(rng_cutmix, max(cutmix_alpha, 1e-6), max(cutmix_alpha, 1e-6))
  lam = jnp.where(use_cutmix, lam_cutmix, lam_mixup).astype(jnp.float32)

  _, height, width, _ = images.shape
  box, box_lam = cutmix_box(rng_box, height, width, lam)
  flipped = images[::-1]
  cutmixed = jnp.where(box[None, :, :, None], flipped, images)
  mixed = (images * lam + flipped * (1.0 - lam)).astype(images.dtype)
  lam = jnp.where(apply, jnp.where(use_cutmix, box_lam, lam), 1.0)
  images = jnp.where(apply, jnp.where(use_cutmix, cutmixed, mixed), images)
  targets = targets * lam + targets[::-1] * (1.0 - lam)
  return images, targets
