r"""Segmentation demo: UperNet + a tiny MambaOut on the bundled digit scenes, on CPU in minutes.

    python -m mambaout_jax.main --config=configs/seg/demo.py --workdir=/tmp/mambaout_seg_demo

Dataset `digit_scenes` (mambaout_jax/data/digit_scenes.py: scikit-learn's real 8x8 digit scans,
scaled to 20..32 px and pasted in bright colours on dark textured 64x64 canvases, 1..3 digits that
do not overlap; 11 classes = 10 digits + background, each digit's label is its stroke grown by
size // 8 px; 4096 train / 256 validation scenes of 48..80 px from disjoint scans; generated on the
fly, no download, no preparation). Model `upernet_mambaout_test` (the mambaout_test backbone with a
narrow UperNet head), trained from scratch with the segmentation recipe's optimiser and schedule
(AdamW, poly with linear warm-up) and mmseg's augmentation scaled to the canvas.
Measured (the command above, 1 CPU device of this 2-core machine, nothing else running; jax
0.10.2): 3000 steps in 6 min 58 s wall, 2.2 GB peak RSS; eval at step 3000: mIoU 83.3, mAcc 91.5,
aAcc 95.7 (per class IoU: background 95.2, digits 70.3 (0) .. 86.6 (6)); on the way: mIoU 63.6 at
step 500, 72.2 at 1000, 79.6 at 1500. Predicting background everywhere scores mIoU 7.1 (IoU 77.7
on 1 of 11 classes). tests/test_seg_demo.py runs the same command for 500 steps (the schedule
squeezed into them: mIoU 58.6 here) and asks for mIoU > 35 with most digits found.
It evaluates (whole image, the per-class table in the log and WORKDIR/eval_per_class_STEP.json) and
checkpoints every 500 steps, and resumes from the workdir if run again.
"""
from mambaout_jax import recipes


def get_config():
  c = recipes.segmentation_recipe('upernet_mambaout_test', drop_path_rate=0.0)
  c.model.dtype = 'float32'
  c.dataset.name = 'digit_scenes'
  c.dataset.num_classes = 11
  c.image_size = 64                 # training crop
  c.batch_size = 16
  c.eval_batch_size = 32
  c.total_steps = 3000
  c.warmup_steps = 50
  c.lr = 4e-3
  c.weight_decay = 0.01
  c.aug.hflip = 0.0                 # digits are not mirror-symmetric
  c.aug.photometric = False         # the scenes' colours are already random
  c.dataset.reduce_zero_label = False  # labels are 0..10 already; 255 = ignored rim
  c.aug.scale = (64, 64)
  c.aug.ratio_range = (0.75, 1.5)
  c.aug.eval_scale = (64, 64)
  c.input.eval_canvas = (64, 64)        # rescaled to eval_scale, a scene fits in 64 x 64
  c.input.eval_label_canvas = (80, 80)  # validation scenes are up to 80 px a side
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  return c
