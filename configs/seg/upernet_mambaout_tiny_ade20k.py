r"""UperNet + mambaout_tiny on ADE20K: the paper's Table 3 setup (expected mIoU 47.4 single-scale).

    python -m mambaout_jax.main --config=configs/seg/upernet_mambaout_tiny_ade20k.py \
        --workdir=gs://BUCKET/upernet_mambaout_tiny \
        --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets \
        --config.init_from=hf-hub:timm/mambaout_tiny.in1k

Recipe (the author's: Swin's mmsegmentation UperNet config, lr 1e-4, drop path 0.3, no layer-wise
lr decay): 160k iterations at batch 16 (512x512 crops), AdamW (0.9, 0.999) lr 1e-4, weight decay
0.01 (not on norms / biases), 1500 linear warm-up iterations from 1e-6 x lr, poly (power 1) to 0,
auxiliary FCN loss 0.4, bf16 compute; eval every 16k iterations, whole image at (2048, 512)
keep-ratio (mIoU 47.4 single-scale in the paper; --config.seg.eval_scales and seg.eval_flip give
the multi-scale + flip number). The backbone starts from ImageNet weights (config.init_from: a
`convert` output, an official .pth, or hf-hub:timm/<tag>); the head starts from scratch.
Sized for: 16 images per step on a 4-chip slice (v5e:2x2) or larger; per-chip memory from
`python -m mambaout_jax.aot --config=configs/seg/upernet_mambaout_tiny_ade20k.py --topology=v5e:2x2`:
5.86 GiB per chip of 16 (arguments 0.62, temporaries 5.01), fits; 1.54 TFLOP per image per train
step; memory-bound, roofline >= 106 ms per step, <= 37.8 images/s per chip, MFU <= 29%
(libtpu 0.0.42.1; about 19 CPU-minutes to compile on a 2-core host).
Dataset: ADEChallengeData2016.zip prepared with `python -m mambaout_jax.data.prepare
--dataset=ade20k --manual_dir=DIR_WITH_THE_ZIP --data_dir=...` (or segfolder:ROOT on the unzipped
tree).
"""
from mambaout_jax import recipes


def get_config():
  return recipes.segmentation_recipe('upernet_mambaout_tiny', drop_path_rate=0.3)
