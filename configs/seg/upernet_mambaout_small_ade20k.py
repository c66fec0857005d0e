r"""UperNet + mambaout_small on ADE20K: the paper's Table 3 setup (expected mIoU 49.5 single-scale).

    python -m mambaout_jax.main --config=configs/seg/upernet_mambaout_small_ade20k.py \
        --workdir=gs://BUCKET/upernet_mambaout_small \
        --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets \
        --config.init_from=hf-hub:timm/mambaout_small.in1k

Recipe (the author's: Swin's mmsegmentation UperNet config, lr 1e-4, drop path 0.3, no layer-wise
lr decay): 160k iterations at batch 16 (512x512 crops), AdamW (0.9, 0.999) lr 1e-4, weight decay
0.01 (not on norms / biases), 1500 linear warm-up iterations from 1e-6 x lr, poly (power 1) to 0,
auxiliary FCN loss 0.4, bf16 compute; eval every 16k iterations, whole image at (2048, 512)
keep-ratio (mIoU 49.5 single-scale in the paper; --config.seg.eval_scales and seg.eval_flip give
the multi-scale + flip number). The backbone starts from ImageNet weights (config.init_from: a
`convert` output, an official .pth, or hf-hub:timm/<tag>); the head starts from scratch.
Sized for: 16 images per step on a 4-chip slice (v5e:2x2) or larger; per-chip memory from
`python -m mambaout_jax.aot --config=configs/seg/upernet_mambaout_small_ade20k.py --topology=v5e:2x2`:
5.91 GiB per chip of 16 (arguments 0.87, temporaries 4.66), fits; 1.68 TFLOP per image per train
step; memory-bound, roofline >= 114 ms per step, <= 35.2 images/s per chip, MFU <= 30%
(libtpu 0.0.42.1; about 15 min wall, 2 cores, to compile).
Dataset: ADEChallengeData2016.zip prepared with `python -m mambaout_jax.data.prepare
--dataset=ade20k --manual_dir=DIR_WITH_THE_ZIP --data_dir=...` (or segfolder:ROOT on the unzipped
tree).
"""
from mambaout_jax import recipes


def get_config():
  return recipes.segmentation_recipe('upernet_mambaout_small', drop_path_rate=0.3)
