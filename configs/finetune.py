r"""Fine-tune pretrained MambaOut weights on your own images (or any TFDS classification dataset).

    python -m mambaout_jax.main --config=configs/finetune.py --workdir=/tmp/ft_flowers \
        --config.dataset.name=folder:/data/flowers \
        --config.init_from=hf-hub:timm/mambaout_tiny.in1k

`folder:ROOT` reads ROOT/train/<class>/*.jpg and ROOT/validation/<class>/*.jpg (local or gs://);
a TFDS name (e.g. `oxford_flowers102`, with `--config.dataset.eval_split=test`) works the same.
`init_from` is a timm Hub name (`python -m mambaout_jax.pretrained` lists them), an official or
timm `.pth` / `.safetensors` file, or a params checkpoint (a `convert` output, or another run's
`WORKDIR/export`); another variant needs `--config.model.name` to match it. The classifier is
re-initialised for the dataset's classes (`init_head='reset'`; with as many classes as the
checkpoint, the trained one is kept). The workdir's own checkpoint wins over `init_from`, so an
interrupted fine-tune resumes exactly.

Recipe: 10 epochs (1 warm-up) at lr 1e-4 for batch 64 (scaled linearly with batch_size),
cosine to 1e-6, AdamW weight decay 0.05, drop path 0.1; light augmentation (RandomResizedCrop
scale (0.35, 1), horizontal flip, label smoothing 0.1, no RandAugment / Mixup / CutMix / erasing),
eval at 224 with crop_pct 1.0 (the MambaOut weights' pretrained config). Afterwards
`WORKDIR/export` is loaded by `mo.load_pretrained(variant, WORKDIR/export)`, `predict` and the web
demo (`python -m mambaout_jax.app`).
Sized for: one accelerator host (float32; set `--config.model.dtype=bfloat16` on TPU). On a CPU,
try `--config.model.name=mambaout_femto --config.init_from=hf-hub:timm/mambaout_femto.in1k
--config.image_size=160`. Expected: not measured here (it depends on your dataset); the test
tests/test_finetune.py checks that the first step starts from the pretrained model's loss.
"""
from mambaout_jax import recipes


def get_config():
  c = recipes.base_config()
  c.model.name = 'mambaout_tiny'
  c.model.drop_path_rate = 0.1
  c.model.dtype = 'float32'
  c.init_from = 'hf-hub:timm/mambaout_tiny.in1k'
  c.init_head = 'reset'             # a new classifier when the dataset's classes differ
  c.dataset.name = 'folder:/path/to/images'  # ROOT/{train,validation}/<class>/<image>
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'validation'
  c.dataset.num_classes = 0         # from the dataset

  c.image_size = 224
  c.batch_size = 64
  c.eval_batch_size = 64

  c.num_epochs = 10
  c.cooldown_epochs = 0
  c.warmup_epochs = 1
  c.lr = 1e-4                       # per lr_base_batch images
  c.lr_base_batch = 64
  c.warmup_lr = 1e-6
  c.min_lr = 1e-6
  c.weight_decay = 0.05

  c.aug.scale = (0.35, 1.0)
  c.aug.interpolation = 'bicubic'
  c.aug.hflip = 0.5
  c.aug.randaugment = ''
  c.aug.reprob = 0.0
  c.aug.mixup = 0.0
  c.aug.cutmix = 0.0
  c.aug.label_smoothing = 0.1
  c.aug.crop_pct = 1.0
  c.aug.eval_interpolation = 'bicubic'

  c.input.num_workers = 4
  c.log_every_steps = 20
  c.eval_every_steps = 0            # once per epoch
  c.checkpoint_every_steps = 200
  c.keep_best_checkpoints = 1
  return c
