"""Config building blocks shared by `configs/*.py`: every key the trainer and the data pipeline read.

`base_config()` holds every key with a neutral default (so `--config.KEY=VALUE` can override any of
them and an unknown key is refused); `imagenet_recipe(model)` is the paper's ImageNet-1k recipe
(the official training scripts, on timm 0.6.11).
"""
from __future__ import annotations

import ml_collections

from mambaout_jax.models.mambaout import TRAIN_DROP_PATH


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = 'classification'         # mambaout_jax.tasks: 'classification' | 'segmentation'
  c.init_from = ''                  # fresh workdir: start from these params (params checkpoint
                                    # dir, official .pth / timm file, 'hf-hub:timm/<tag>')
  c.init_head = ''                  # 'reset': re-initialise a classifier of another class count

  c.model = ml_collections.ConfigDict()
  c.model.name = 'mambaout_test'
  c.model.drop_path_rate = 0.0
  c.model.dtype = 'float32'        # compute dtype ('bfloat16' on TPU); parameters stay float32
  c.model.dwconv_impl = 'auto'     # MambaOut/Mamba depthwise conv: 'auto', 'conv' or 'shift'
  c.model.scan_order = ''          # Mamba blocks: 'raster', 'bidirectional', 'cross' ('' = variant's)

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'mambaout_digits'
  c.dataset.data_dir = ''
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'validation'
  c.dataset.num_classes = 0        # 0: take it from the dataset info

  c.image_size = 224
  c.batch_size = 1024               # global, over all hosts
  c.eval_batch_size = 1024
  c.grad_accum_steps = 1            # micro-batches per optimizer step (batch_size must divide)

  # Length and schedule (timm 0.6.11 CosineLRScheduler semantics, see mambaout_jax/optim.py).
  c.num_epochs = 300                # cosine length; training runs num_epochs + cooldown_epochs
  c.cooldown_epochs = 0
  c.total_steps = 0                 # > 0: train this many steps, the schedule compressed to fit
  c.warmup_epochs = 0.0
  c.schedule_per_step = True        # False: lr changes once per epoch, like timm's default

  c.optimizer = 'adamw'
  c.lr = 1e-3                       # per lr_base_batch images
  c.lr_base_batch = 1024            # peak lr = lr * batch_size / lr_base_batch (0: no scaling)
  c.warmup_lr = 1e-6
  c.min_lr = 1e-5
  c.weight_decay = 0.05
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.grad_clip_norm = 0.0            # 0: no clipping (the paper)
  c.ema_decay = 0.0                 # > 0: keep an EMA of the parameters, evaluated as eval_ema/*

  c.aug = ml_collections.ConfigDict()
  c.aug.scale = (0.08, 1.0)
  c.aug.ratio = (3 / 4, 4 / 3)
  c.aug.interpolation = 'random'
  c.aug.hflip = 0.5
  c.aug.randaugment = ''
  c.aug.reprob = 0.0
  c.aug.remode = 'pixel'
  c.aug.mixup = 0.0
  c.aug.cutmix = 0.0
  c.aug.mixup_prob = 1.0
  c.aug.mixup_switch_prob = 0.5
  c.aug.label_smoothing = 0.0
  c.aug.crop_pct = 1.0
  c.aug.eval_interpolation = 'bicubic'

  c.input = ml_collections.ConfigDict()
  c.input.num_workers = 0
  c.input.num_threads = 4           # Grain read threads per process
  c.input.prefetch = 2
  c.input.jpeg_draft = True         # decode large JPEGs at reduced size when the crop allows

  c.mesh = (('data', -1), ('fsdp', 1))

  c.log_every_steps = 100
  c.eval_every_steps = 0            # 0: once per epoch
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3            # the latest K ...
  c.keep_best_checkpoints = 1       # ... plus the best K by eval/top1
  c.async_checkpointing = True
  return c


def imagenet_recipe(model_name: str) -> ml_collections.ConfigDict:
  """The paper's ImageNet-1k recipe for `model_name` at 224 px, global batch 4096."""
  c = base_config()
  c.model.name = model_name
  c.model.drop_path_rate = TRAIN_DROP_PATH.get(model_name, 0.0)
  c.model.dtype = 'bfloat16'
  c.dataset.name = 'imagenet2012'
  c.dataset.num_classes = 1000
  c.image_size = 224
  c.batch_size = 4096
  c.eval_batch_size = 1024
  c.num_epochs = 300
  c.cooldown_epochs = 10
  c.warmup_epochs = 20
  c.lr = 1e-3                       # x 4096 / 1024 = 4e-3
  c.warmup_lr = 1e-6
  c.min_lr = 1e-5
  c.weight_decay = 0.05
  c.aug.randaugment = 'rand-m9-mstd0.5-inc1'
  c.aug.reprob = 0.25
  c.aug.mixup = 0.8
  c.aug.cutmix = 1.0
  c.aug.label_smoothing = 0.1
  c.input.num_workers = 16
  c.log_every_steps = 100
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 1000
  return c


def mamba_ablation(model_name: str, mambaout_name: str) -> ml_collections.ConfigDict:
  """The paper's recipe for a Mamba-block model (MambaOut skeleton + SSM token mixer), with the
  drop path of the MambaOut model of the same size, so the two differ only in the SSM."""
  c = imagenet_recipe(mambaout_name)
  c.model.name = model_name
  return c


def deit_recipe(model_name: str, drop_path_rate: float = 0.1) -> ml_collections.ConfigDict:
  """DeiT's ImageNet recipe (the paper's causal-vs-fully-visible ViT experiment): batch 1024,
  lr 5e-4 per 512 images, 5 warm-up epochs, 300 epochs + 10 cool-down, weight decay 0.05, the same
  RandAugment / erasing / Mixup / CutMix / label smoothing as MambaOut."""
  c = imagenet_recipe(model_name)
  c.model.drop_path_rate = drop_path_rate
  c.batch_size = 1024
  c.lr = 5e-4
  c.lr_base_batch = 512
  c.warmup_epochs = 5
  return c


def segmentation_recipe(model_name: str, drop_path_rate: float) -> ml_collections.ConfigDict:
  """The paper's ADE20K UperNet recipe (Table 3; the author's note: Swin's mmsegmentation UperNet
  config with lr 1e-4, no layer-wise lr decay): 160k iterations at batch 16 of 512x512 crops, AdamW
  (0.9, 0.999) lr 1e-4 weight decay 0.01 (not on norms / biases), mmcv's poly schedule (power 1 to
  0) with 1500 linear warm-up iterations from 1e-6 x lr, bf16, eval every 16k iterations at
  (2048, 512) keep-ratio, whole image, single scale. The backbone starts from ImageNet weights
  (`init_from`, e.g. `hf-hub:timm/mambaout_tiny.in1k` or a `convert` output)."""
  c = base_config()
  c.task = 'segmentation'
  c.model.name = model_name
  c.model.drop_path_rate = drop_path_rate
  c.model.dtype = 'bfloat16'
  c.dataset.name = 'ade20k'
  c.dataset.num_classes = 150
  c.image_size = 512                # the training crop (square)
  c.batch_size = 16
  c.eval_batch_size = 8
  c.total_steps = 160_000
  c.schedule = 'poly'               # mmcv PolyLrUpdaterHook, see optim.poly_schedule
  c.warmup_steps = 1500
  c.warmup_ratio = 1e-6
  c.poly_power = 1.0
  c.lr = 1e-4
  c.lr_base_batch = 0               # lr as is (no batch scaling)
  c.min_lr = 0.0
  c.weight_decay = 0.01
  # mmseg's ADE20K pipeline (read by data/seg_transforms.py): image_size is the square crop.
  c.dataset.reduce_zero_label = True   # ADE20K: 0 ('other') -> 255 (ignored), k -> k - 1
  c.aug.scale = (2048, 512)         # train rescale target (long, short), keep ratio
  c.aug.ratio_range = (0.5, 2.0)    # random rescale of `scale`
  c.aug.cat_max_ratio = 0.75        # crop retried (10x) until no class covers more than this
  c.aug.photometric = True          # mmseg PhotoMetricDistortion
  c.aug.hflip = 0.5
  c.aug.eval_scale = (2048, 512)    # eval resize, keep ratio
  c.input.eval_canvas = ()          # eval image canvas (h, w); () = square of max(eval_scale)
  c.input.eval_label_canvas = ()    # eval label canvas (original label sizes); () = eval_canvas

  c.seg = ml_collections.ConfigDict()
  c.seg.aux_loss_weight = 0.4       # FCN auxiliary head on stage 3
  c.seg.inference = 'whole'         # 'whole' | 'slide'
  c.seg.slide_crop = 512
  c.seg.slide_stride = 341
  c.seg.eval_scales = (1.0,)        # multi-scale: (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  c.seg.eval_flip = False

  c.log_every_steps = 50
  c.eval_every_steps = 16_000
  c.checkpoint_every_steps = 4000
  c.keep_best_checkpoints = 1       # by eval/mIoU
  return c
