r"""UperNet + mamba_tiny on ADE20K: the SSM put back into the dense task (the paper's Hypothesis 2).

    python -m mambaout_jax.main --config=configs/seg/upernet_mamba_tiny_ade20k.py \
        --workdir=gs://BUCKET/upernet_mamba_tiny \
        --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets \
        --config.init_from=gs://BUCKET/mamba_tiny/export

mamba_tiny is the mambaout_tiny skeleton with Mamba blocks (Gated CNN + selective SSM); no
official ImageNet weights exist, so init_from is the export of `configs/mamba_tiny.py`. Everything
else is configs/seg/upernet_mambaout_tiny_ade20k.py (same head, recipe and drop path 0.3), so the
pair isolates the SSM on a long-sequence task (512x512 crops: 16384 tokens at stride 4). The paper
has no such run; its visual-Mamba baselines (VMamba-T 47.3, LocalVMamba-T 47.9 mIoU) and
MambaOut-T's 47.4 bracket what to expect. No run of this config has been made here.
Sized for: 16 images per step on a 4-chip slice (v5e:2x2) or larger; per-chip memory from
`python -m mambaout_jax.aot --config=configs/seg/upernet_mamba_tiny_ade20k.py --topology=v5e:2x2`:
5.54 GiB per chip of 16 (arguments 0.70, temporaries 4.64), fits; 1.61 TFLOP per image per train
step; memory-bound, roofline >= 255 ms per step, <= 15.7 images/s per chip, MFU <= 13% (2.4x the
upernet_mambaout_tiny step's HBM bytes for 5% more FLOPs)
(libtpu 0.0.42.1; about 32 CPU-minutes to compile on a 2-core host).
Dataset: as configs/seg/upernet_mambaout_tiny_ade20k.py.
"""
from mambaout_jax import recipes


def get_config():
  return recipes.segmentation_recipe('upernet_mamba_tiny', drop_path_rate=0.3)
