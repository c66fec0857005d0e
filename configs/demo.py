r"""Demo: a small MambaOut on the bundled handwritten digits, on CPU in a few minutes.

    python -m mambaout_jax.main --config=configs/demo.py --workdir=/tmp/mambaout_demo

Dataset `mambaout_digits` (scikit-learn's 1797 real 8x8 digit scans, 1437 train / 360 validation,
prepared automatically, no download), upsampled to 32 px; model `mambaout_test` (a 4-stage
MambaOut with every code path, 0.19M parameters); the paper's optimiser and schedule shape (AdamW,
weight-decay mask, warm-up + cosine) without the heavy ImageNet augmentation.
Sized for: 2 CPU cores. Expected: eval/top1 ~0.97 after 550 steps (25 epochs of 22 steps), in
about a minute including compilation (measured 52 s wall, 0.975 top-1, on a shared 2-core VM).
It evaluates and checkpoints every 200 steps, and resumes from the workdir if run again.
"""
from mambaout_jax import recipes


def get_config():
  c = recipes.base_config()
  c.model.name = 'mambaout_test'
  c.model.drop_path_rate = 0.0
  c.dataset.name = 'mambaout_digits'
  c.dataset.data_dir = ''
  c.image_size = 32
  c.batch_size = 64
  c.eval_batch_size = 120
  c.aug.scale = (0.5, 1.0)
  c.aug.hflip = 0.0                 # digits are not mirror-symmetric
  c.aug.interpolation = 'bicubic'
  c.num_epochs = 25
  c.total_steps = 0
  c.warmup_epochs = 2
  c.lr = 4e-3
  c.lr_base_batch = 0               # use lr as is
  c.min_lr = 1e-5
  c.weight_decay = 0.05
  c.log_every_steps = 20
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  return c
