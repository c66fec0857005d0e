"""DeiT-style Vision Transformer with fully-visible or causal attention (the paper's ViT ablation).

The paper's causal-attention experiment: making ViT's token mixer causal (each token attends only
to itself and earlier tokens, as an SSM's recurrence does) costs ImageNet accuracy. `attention_mode`
switches between the two; in causal mode the class token goes last by default, so the token the
classifier reads has seen every patch.

The module tree and names follow timm's `VisionTransformer` (`patch_embed.proj`, `cls_token`,
`pos_embed`, `blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, `head`), so a timm
state dict maps onto it mechanically (see tests/test_vit.py). NHWC images in, float32 logits out.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mambaout_jax.models.layers import gelu, layer_norm, linear, trunc_normal_init
from mambaout_jax.models.registry import register_model

ATTENTION_MODES = ('fully_visible', 'causal')


class PatchEmbed(nnx.Module):
  """Non-overlapping p x p patches -> D channels (a stride-p convolution), flattened row-major."""

  def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int, *, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if img_size % patch_size:
      raise ValueError(f'img_size {img_size} is not a multiple of patch_size {patch_size}')
    self.img_size, self.patch_size = img_size, patch_size
    self.num_patches = (img_size // patch_size) ** 2
    self.proj = nnx.Conv(in_chans, dim, kernel_size=(patch_size, patch_size),
                         strides=(patch_size, patch_size), padding='VALID',
                         kernel_init=trunc_normal_init, bias_init=nnx.initializers.zeros_init(),
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    if x.shape[1:3] != (self.img_size, self.img_size):
      raise ValueError(f'expected {self.img_size}x{self.img_size} images (the position embedding '
                       f'is sized for them), got {x.shape[1]}x{x.shape[2]}; build the model with '
                       f'img_size={x.shape[1]}')
    x = self.proj(x)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class Attention(nnx.Module):
  """Multi-head self-attention; `causal=True` masks each token to itself and earlier tokens."""

  def __init__(self, dim: int, num_heads: int, *, causal: bool = False, qkv_bias: bool = True,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads, self.causal = num_heads, causal
    self.qkv = linear(dim, 3 * dim, use_bias=qkv_bias, **kw)
    self.proj = linear(dim, dim, **kw)

  def __call__(self, x):
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    x = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
    return self.proj(x.reshape(b, n, d))


class Mlp(nnx.Module):

  def __init__(self, dim: int, hidden: int, *, dtype=None, param_dtype=jnp.float32, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = linear(dim, hidden, **kw)
    self.fc2 = linear(hidden, dim, **kw)

  def __call__(self, x):
    return self.fc2(gelu(self.fc1(x)))


class Block(nnx.Module):
  """Pre-norm transformer block: x + DropPath(attn(LN(x))), then x + DropPath(mlp(LN(x)))."""

  def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, causal: bool = False,
               drop_path_rate: float = 0.0, dtype=None, param_dtype=jnp.float32, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = layer_norm(dim, **kw)
    self.attn = Attention(dim, num_heads, causal=causal, **kw)
    self.norm2 = layer_norm(dim, **kw)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), **kw)
    # Per-sample stochastic depth: the dropout mask is broadcast over tokens and channels.
    self.drop_path = (nnx.Dropout(drop_path_rate, broadcast_dims=(1, 2), rngs=rngs)
                      if drop_path_rate > 0 else None)

  def _residual(self, x, branch):
    return x + (self.drop_path(branch) if self.drop_path is not None else branch)

  def __call__(self, x):
    x = self._residual(x, self.attn(self.norm1(x)))
    return self._residual(x, self.mlp(self.norm2(x)))


class VisionTransformer(nnx.Module):
  """ViT (DeiT recipe): class token, learned position embedding, pre-norm blocks, MLP ratio 4.

  attention_mode: 'fully_visible' (standard) or 'causal' (lower-triangular mask over the token
  order: patches row-major, then the class token when `class_token_last`). `class_token_last`
  defaults to True in causal mode (so the class token sees every patch) and False otherwise.
  The class token's position embedding is `pos_embed[:, 0]` wherever the token is placed.
  """

  def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
               num_classes: int = 1000, embed_dim: int = 384, depth: int = 12,
               num_heads: int = 6, mlp_ratio: float = 4.0, attention_mode: str = 'fully_visible',
               class_token_last: Optional[bool] = None, drop_path_rate: float = 0.0,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if attention_mode not in ATTENTION_MODES:
      raise ValueError(f'unknown attention_mode {attention_mode!r}; choose one of {ATTENTION_MODES}')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    causal = attention_mode == 'causal'
    self.attention_mode = attention_mode
    self.class_token_last = causal if class_token_last is None else class_token_last
    self.num_classes = num_classes
    self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, **kw)
    # timm's init: cls token N(0, 1e-6), position embedding trunc-normal(0.02).
    self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, embed_dim),
                                                        param_dtype))
    self.pos_embed = nnx.Param(trunc_normal_init(
        rngs.params(), (1, self.patch_embed.num_patches + 1, embed_dim), param_dtype))
    rates = np.linspace(0.0, drop_path_rate, depth).tolist()
    self.blocks = nnx.List([Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, causal=causal,
                                  drop_path_rate=rates[i], **kw) for i in range(depth)])
    self.norm = layer_norm(embed_dim, **kw)
    self.head = linear(embed_dim, num_classes, **kw) if num_classes > 0 else None
    self.dtype = dtype

  def forward_features(self, x):
    """Token features after the final norm, (B, 1 + num_patches, D), in the model's token order."""
    x = self.patch_embed(x)
    pos = self.pos_embed[...].astype(x.dtype)
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype) + pos[:, :1],
                           (x.shape[0], 1, x.shape[-1]))
    x = x + pos[:, 1:]
    x = jnp.concatenate([x, cls] if self.class_token_last else [cls, x], axis=1)
    for block in self.blocks:
      x = block(x)
    return self.norm(x)

  def __call__(self, x, pre_logits: bool = False):
    x = self.forward_features(x)
    x = x[:, -1] if self.class_token_last else x[:, 0]
    if not pre_logits and self.head is not None:
      x = self.head(x)
    return x.astype(jnp.float32)


VARIANTS: dict[str, dict[str, Any]] = {
    'vit_small_patch16': dict(embed_dim=384, depth=12, num_heads=6),
    'vit_base_patch16': dict(embed_dim=768, depth=12, num_heads=12),
    'vit_small_patch16_causal': dict(embed_dim=384, depth=12, num_heads=6,
                                     attention_mode='causal'),
    'vit_base_patch16_causal': dict(embed_dim=768, depth=12, num_heads=12,
                                    attention_mode='causal'),
    # A few thousand parameters' worth of every code path, for tests and CPU demos.
    'vit_test': dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
}

# DeiT's drop-path rates (DeiT-S 0.1, DeiT-B 0.1) for the configs.
TRAIN_DROP_PATH = {'vit_small_patch16': 0.1, 'vit_base_patch16': 0.1,
                   'vit_small_patch16_causal': 0.1, 'vit_base_patch16_causal': 0.1}


def _make_variant(name: str) -> Callable[..., VisionTransformer]:
  def build(*, rngs: nnx.Rngs, **overrides) -> VisionTransformer:
    return VisionTransformer(**{**VARIANTS[name], **overrides}, rngs=rngs)
  build.__name__ = name
  build.__doc__ = f'{name}: {VARIANTS[name]}'
  return build


for _name in VARIANTS:
  globals()[_name] = register_model(_make_variant(_name))
