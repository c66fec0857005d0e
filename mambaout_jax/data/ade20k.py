r"""`ade20k`: ADE20K SceneParsing (ADEChallengeData2016, 150 classes), TFDS builder fed by the zip.

  python -m mambaout_jax.data.prepare --dataset=ade20k \
      --manual_dir=DIR_WITH_ADEChallengeData2016.zip --data_dir=/data/tensorflow_datasets

The zip (http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip) holds
`ADEChallengeData2016/images/{training,validation}/*.jpg` and
`ADEChallengeData2016/annotations/{training,validation}/*.png` (single-channel class indices,
0 = other, 1..150). Its `training` folder becomes the `train` split (20210 pairs), `validation`
the `validation` split (2000). The JPEG and PNG bytes are stored unchanged; labels stay 0..150
(the pipeline applies reduce_zero_label). Not TFDS's `scene_parse150`, which downloads the 2017
instance-annotation masks instead of these semantic labels.

Every pair is decoded once while preparing: a corrupt file, a label that is not an 8-bit
single-channel PNG, a label whose size differs from its image, or an image without a label is
skipped with a warning naming the file (and counted in a summary line), so the prepared dataset
decodes cleanly.
"""
from __future__ import annotations

import posixpath
import re
import zipfile

from absl import logging
import tensorflow_datasets as tfds

from mambaout_jax.data import seg_sources
from mambaout_jax.data import seg_transforms

NAME = seg_sources.ADE20K
ZIP_NAME = seg_sources.ADE20K_ZIP
SPLITS = {'train': 'training', 'validation': 'validation'}
_MEMBER = re.compile(r'(?:^|/)(images|annotations)/(training|validation)/([^/]+)\.(jpg|png)$')


def find_pairs(names, folder: str) -> tuple[list[tuple[str, str, str]], list[str]]:
  """Zip member names -> ([(stem, image member, label member)] sorted, [unpaired images])."""
  images, labels = {}, {}
  for name in names:
    match = _MEMBER.search(name)
    if match and match.group(2) == folder:
      kind, stem, ext = match.group(1), match.group(3), match.group(4)
      if kind == 'images' and ext == 'jpg':
        images[stem] = name
      elif kind == 'annotations' and ext == 'png':
        labels[stem] = name
  pairs = [(stem, images[stem], labels[stem]) for stem in sorted(images) if stem in labels]
  return pairs, sorted(images[stem] for stem in images if stem not in labels)


class Ade20k(tfds.core.GeneratorBasedBuilder):
  """ADE20K SceneParsing: images and 150-class semantic label maps (0 = other)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'ADEChallengeData2016, bytes stored unchanged.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Download {ZIP_NAME} from http://sceneparsing.csail.mit.edu/ and pass the directory that '
      'holds it as --manual_dir.')

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'segmentation': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
            'file_name': tfds.features.Text(),
        }),
        homepage='http://sceneparsing.csail.mit.edu/',
        # 'sizes/<split>': [[h, w], ...] of the stored pairs, so eval canvases can be fitted.
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    zip_path = dl_manager.manual_dir / ZIP_NAME
    if not zip_path.exists():
      raise FileNotFoundError(
          f'{ZIP_NAME} not found in --manual_dir={dl_manager.manual_dir}; '
          f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    return {split: self._generate_examples(zip_path, split, folder)
            for split, folder in SPLITS.items()}

  def _generate_examples(self, zip_path, split: str, folder: str):
    with zip_path.open('rb') as f, zipfile.ZipFile(f) as archive:
      pairs, unpaired = find_pairs(archive.namelist(), folder)
      if not pairs:
        raise ValueError(f'{zip_path} has no images/{folder}/*.jpg with '
                         f'annotations/{folder}/*.png; is it {ZIP_NAME}?')
      skipped = [f'{name}: no label map' for name in unpaired]
      sizes = []
      for name in skipped:
        logging.warning('ade20k: skipping %s', name)
      for stem, image_name, label_name in pairs:
        image, label = archive.read(image_name), archive.read(label_name)
        try:
          _, label_map = seg_transforms.decode_pair(image, label, image_name)
        except seg_transforms.SegExampleError as e:
          skipped.append(str(e))
          logging.warning('ade20k: skipping %s', e)
          continue
        sizes.append(list(label_map.shape))
        yield stem, {'image': image, 'segmentation': label,
                     'file_name': posixpath.basename(image_name)}
      self.info.metadata[f'sizes/{split}'] = sizes
      if skipped:
        logging.warning('ade20k %s: skipped %d of %d images: %s%s', folder, len(skipped),
                        len(pairs) + len(unpaired), '; '.join(skipped[:10]),
                        ' ...' if len(skipped) > 10 else '')
