"""Random-access segmentation sources: the TFDS `ade20k` (ArrayRecord) and `segfolder:ROOT`.

Every source is a sequence of `{'image': encoded image bytes, 'label': encoded label PNG bytes,
'name': str}`; the pipelines decode and check the pair themselves (`seg_transforms.decode_pair`).

`config.dataset.name` selects the source:
  'ade20k'            the TFDS builder in `ade20k.py`, prepared from ADEChallengeData2016.zip
                      (`python -m mambaout_jax.data.prepare --dataset=ade20k --manual_dir=DIR`);
  'segfolder:ROOT'    the unzipped tree: ROOT/images/<split>/*.jpg and
                      ROOT/annotations/<split>/<same stem>.png (ADEChallengeData2016's layout;
                      split 'train' reads 'training' when there is no 'train' folder);
  'digit_scenes'      the embedded demo set (`digit_scenes.py`, generated on the fly);
  any other name      a TFDS dataset with an encoded 'image' and an encoded single-channel
                      'segmentation' feature; `dataset.num_classes` must be set.
"""
from __future__ import annotations

from typing import Any

from absl import logging

from mambaout_jax.data import sources
from mambaout_jax.data.sources import DatasetInfo, DatasetNotFoundError

SEGFOLDER_PREFIX = 'segfolder:'
DIGIT_SCENES = 'digit_scenes'
ADE20K = 'ade20k'
ADE20K_ZIP = 'ADEChallengeData2016.zip'
SPLIT_FOLDERS = {'train': 'training', 'validation': 'validation', 'val': 'validation'}

# ADE20K's 150 SceneParsing classes in label order (label k after reduce_zero_label), as
# mmsegmentation's ADE20KDataset lists them.
ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass',
    'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain',
    'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field',
    'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing',
    'cushion', 'base', 'box', 'column', 'signboard', 'chest of drawers', 'counter', 'sand', 'sink',
    'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs', 'runway', 'case',
    'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase', 'blind',
    'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm',
    'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth',
    'television receiver', 'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister',
    'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van', 'ship', 'fountain',
    'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool', 'barrel',
    'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step',
    'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen',
    'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan',
    'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass',
    'clock', 'flag')


def is_ade20k(name: str) -> bool:
  return name == ADE20K or name.startswith(SEGFOLDER_PREFIX)


def prepare_command(name: str, data_dir: str | None) -> str:
  command = sources.prepare_command(name, data_dir)
  if name == ADE20K:
    command = command.replace('--dataset=ade20k',
                              f'--dataset=ade20k --manual_dir=DIR_WITH_{ADE20K_ZIP}')
  return command


# ----------------------------------------------------------------------------------------------
# TFDS


class TfdsSegSource:
  """A TFDS segmentation split at random access (ArrayRecord), image and label left encoded."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds
    builder = prepared_builder(name, data_dir)
    features = builder.info.features
    if 'image' not in features or 'segmentation' not in features:
      raise ValueError(f'dataset {name!r} has features {", ".join(features)}; a segmentation '
                       "dataset needs encoded 'image' and 'segmentation' images")
    if split not in builder.info.splits:
      raise ValueError(f'dataset {name!r} has no split {split!r}; valid splits: '
                       f'{", ".join(sorted(builder.info.splits))}')
    self._has_names = 'file_name' in features
    self._split = split
    self._sizes = (builder.info.metadata or {}).get(f'sizes/{split}')
    self._source = builder.as_data_source(
        split, file_format='array_record',
        decoders={'image': tfds.decode.SkipDecoding(), 'segmentation': tfds.decode.SkipDecoding()})

  def __len__(self) -> int:
    return len(self._source)

  def sizes(self) -> list[tuple[int, int]] | None:
    """(h, w) of every pair, recorded while preparing (None when the builder has no record)."""
    return None if self._sizes is None else [tuple(s) for s in self._sizes]

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._source[index]
    name = record['file_name'] if self._has_names else f'{self._split}[{index}]'
    if isinstance(name, bytes):
      name = name.decode()
    return {'image': record['image'], 'label': record['segmentation'], 'name': str(name)}


def prepared_builder(name: str, data_dir: str | None):
  """The prepared TFDS builder, or `DatasetNotFoundError` with the one-line prepare command."""
  builder = sources.tfds_builder(name, data_dir)
  if not builder.is_prepared():
    raise DatasetNotFoundError(
        f'dataset {name!r} is not prepared in {builder.data_dir!r}; prepare it with: '
        f'{prepare_command(name, data_dir)}')
  return sources.ensure_prepared(name, data_dir)  # Also checks the ArrayRecord files.


# ----------------------------------------------------------------------------------------------
# Folder: ROOT/images/<split>/*.jpg + ROOT/annotations/<split>/*.png


class SegFolderSource:
  """ADEChallengeData2016's unzipped layout (local or gs://); images without a label are skipped."""

  def __init__(self, root: str, split: str):
    from etils import epath
    root_path = epath.Path(root)
    folder = split
    if not (root_path / 'images' / split).is_dir() and split in SPLIT_FOLDERS:
      folder = SPLIT_FOLDERS[split]
    image_dir, label_dir = root_path / 'images' / folder, root_path / 'annotations' / folder
    if not image_dir.is_dir() or not label_dir.is_dir():
      raise DatasetNotFoundError(
          f'segmentation folder split {split!r} not found: expected {root}/images/{folder}/*.jpg '
          f'and {root}/annotations/{folder}/*.png (unzip {ADE20K_ZIP} and point '
          'segfolder: at its ADEChallengeData2016 directory)')
    labels = {p.stem: p for p in label_dir.iterdir() if p.suffix.lower() == '.png'}
    self._pairs: list[tuple[str, str]] = []
    missing = []
    for path in sorted(image_dir.iterdir()):
      if path.suffix.lower() not in sources.IMAGE_EXTENSIONS:
        continue
      if path.stem in labels:
        self._pairs.append((str(path), str(labels[path.stem])))
      else:
        missing.append(path.name)
    if missing:
      logging.warning('skipped %d image(s) of %s without a label map in %s (e.g. %s)',
                      len(missing), image_dir, label_dir, ', '.join(missing[:3]))
    if not self._pairs:
      raise DatasetNotFoundError(f'no image/label pairs in {str(image_dir)!r} and '
                                 f'{str(label_dir)!r}')

  def __len__(self) -> int:
    return len(self._pairs)

  def sizes(self) -> list[tuple[int, int]]:
    """(h, w) of every readable label map, from the PNG headers (no decoding)."""
    from etils import epath
    sizes = []
    for _, label in self._pairs:
      with epath.Path(label).open('rb') as f:
        sizes.append(image_size(f))
    return [s for s in sizes if s is not None]

  def __getitem__(self, index: int) -> dict[str, Any]:
    from etils import epath
    image, label = self._pairs[index]
    return {'image': epath.Path(image).read_bytes(), 'label': epath.Path(label).read_bytes(),
            'name': image}


# ----------------------------------------------------------------------------------------------


def image_size(file) -> tuple[int, int] | None:
  """(h, w) from an image file's header (bytes or a file object); None when unreadable."""
  import io
  from PIL import Image
  try:
    width, height = Image.open(io.BytesIO(file) if isinstance(file, bytes) else file).size
  except (OSError, ValueError, SyntaxError):
    return None  # The pipeline reports the pair when it reaches it.
  return height, width


def split_sizes(source) -> list[tuple[int, int]]:
  """(h, w) of the split's label maps: recorded by the source, else read from every header."""
  sizes = source.sizes() if hasattr(source, 'sizes') else None
  if sizes is None:
    logging.info('reading the sizes of %d label maps to fit the eval canvases (set '
                 'input.eval_canvas and input.eval_label_canvas to skip this)', len(source))
    sizes = [image_size(source[i]['label']) for i in range(len(source))]
  return [s for s in sizes if s is not None]


def _generated_source(name: str, split: str):
  """Sources generated on the fly (no preparation), or None."""
  if name == DIGIT_SCENES:
    from mambaout_jax.data import digit_scenes  # pylint: disable=import-outside-toplevel
    return digit_scenes.DigitScenes(split)
  if name.startswith(SEGFOLDER_PREFIX):
    return SegFolderSource(name[len(SEGFOLDER_PREFIX):], split)
  return None


def open_seg_source(name: str, split: str, data_dir: str | None = None):
  """Split `split` of segmentation dataset `name` ('segfolder:/path', 'digit_scenes' or TFDS)."""
  source = _generated_source(name, split)
  return source if source is not None else TfdsSegSource(name, split, data_dir)


def num_classes(config) -> int:
  """`dataset.num_classes` if set, else 150 for ADE20K (after reduce_zero_label)."""
  ds = config.dataset
  if ds.get('num_classes', 0):
    return int(ds.num_classes)
  if is_ade20k(ds.name):
    return len(ADE20K_CLASSES)
  raise ValueError(f'dataset {ds.name!r}: set --config.dataset.num_classes (the number of '
                   'segmentation classes)')


def class_names(config) -> tuple[str, ...]:
  """Names for the per-class IoU table: ADE20K's 150 names, else '0', '1', ..."""
  n = num_classes(config)
  if is_ade20k(config.dataset.name) and n == len(ADE20K_CLASSES):
    return ADE20K_CLASSES
  return tuple(str(i) for i in range(n))


def get_seg_dataset_info(config) -> DatasetInfo:
  """Number of classes and the sizes of the train and eval splits named by `config.dataset`."""
  ds = config.dataset
  data_dir = ds.get('data_dir', '') or None
  train_split, eval_split = ds.get('train_split', 'train'), ds.get('eval_split', 'validation')
  if ds.name.startswith(SEGFOLDER_PREFIX) or ds.name == DIGIT_SCENES:
    num_train = len(open_seg_source(ds.name, train_split))
    num_eval = len(open_seg_source(ds.name, eval_split))
  else:
    splits = prepared_builder(ds.name, data_dir).info.splits
    for split in (train_split, eval_split):
      if split not in splits:
        raise ValueError(f'dataset {ds.name!r} has no split {split!r}; valid splits: '
                         f'{", ".join(sorted(splits))}')
    num_train, num_eval = splits[train_split].num_examples, splits[eval_split].num_examples
  return DatasetInfo(num_classes=num_classes(config), num_train_examples=num_train,
                     num_eval_examples=num_eval)
