"""`mambaout_digits`: the demo dataset, a TFDS builder over scikit-learn's bundled digits.

1797 real 8x8 grey-level scans of handwritten digits (UCI "optdigits" test set, 10 classes) ship
inside scikit-learn, so preparing this dataset needs no download. It goes through exactly the same
path as ImageNet: a TFDS builder prepared in ArrayRecord format, PNG bytes decoded by us.
Every fifth example (in scikit-learn's order) is the `validation` split (360), the rest `train`
(1437).
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NAME = 'mambaout_digits'
VALIDATION_EVERY = 5


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
  """Returns scikit-learn's digits as uint8 images (1797, 8, 8) in [0, 255] and int64 labels."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return images, digits.target.astype(np.int64)


class MambaoutDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits (8x8 grey, 10 classes) as an image-classification dataset."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    return {'train': self._generate_examples(is_validation=False),
            'validation': self._generate_examples(is_validation=True)}

  def _generate_examples(self, is_validation: bool):
    images, labels = load_digits_uint8()
    for index, (image, label) in enumerate(zip(images, labels)):
      if (index % VALIDATION_EVERY == 0) == is_validation:
        yield index, {'image': image[:, :, None], 'label': int(label)}
