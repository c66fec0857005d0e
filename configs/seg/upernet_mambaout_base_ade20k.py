r"""UperNet + mambaout_base on ADE20K: the paper's Table 3 setup (expected mIoU 49.6 single-scale).

    python -m mambaout_jax.main --config=configs/seg/upernet_mambaout_base_ade20k.py \
        --workdir=gs://BUCKET/upernet_mambaout_base \
        --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets \
        --config.init_from=hf-hub:timm/mambaout_base.in1k

Recipe (the author's: Swin's mmsegmentation UperNet config, lr 1e-4, drop path 0.6, no layer-wise
lr decay): 160k iterations at batch 16 (512x512 crops), AdamW (0.9, 0.999) lr 1e-4, weight decay
0.01 (not on norms / biases), 1500 linear warm-up iterations from 1e-6 x lr, poly (power 1) to 0,
auxiliary FCN loss 0.4, bf16 compute; eval every 16k iterations, whole image at (2048, 512)
keep-ratio (mIoU 49.6 single-scale in the paper; --config.seg.eval_scales and seg.eval_flip give
the multi-scale + flip number). The backbone starts from ImageNet weights (config.init_from: a
`convert` output, an official .pth, or hf-hub:timm/<tag>); the head starts from scratch.
Sized for: 16 images per step on a 4-chip slice (v5e:2x2) or larger; per-chip memory from
`python -m mambaout_jax.aot --config=configs/seg/upernet_mambaout_base_ade20k.py --topology=v5e:2x2`:
7.80 GiB per chip of 16 (arguments 1.27, temporaries 6.05), fits; 1.92 TFLOP per image per train
step; memory-bound, roofline >= 128 ms per step, <= 31.4 images/s per chip, MFU <= 30%
(libtpu 0.0.42.1; 36 min wall to compile on 2 cores, beside a test run).
Dataset: ADEChallengeData2016.zip prepared with `python -m mambaout_jax.data.prepare
--dataset=ade20k --manual_dir=DIR_WITH_THE_ZIP --data_dir=...` (or segfolder:ROOT on the unzipped
tree).
"""
from mambaout_jax import recipes


def get_config():
  return recipes.segmentation_recipe('upernet_mambaout_base', drop_path_rate=0.6)
