"""Random-access sources: TFDS datasets prepared as ArrayRecord, and ImageFolder-style directories.

Every source is a sequence of `{'image': encoded image bytes, 'label': int}`; the pipelines decode
the bytes themselves (PIL), so JPEG decoding can be sized to the crop.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol, Sequence

from absl import logging

FOLDER_PREFIX = 'folder:'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')


class DatasetNotFoundError(FileNotFoundError):
  """The dataset is not prepared where the config says; the message shows how to prepare it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_train_examples: int
  num_eval_examples: int


class Source(Protocol):

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, Any]:
    ...


def prepare_command(name: str, data_dir: str | None) -> str:
  data_dir_flag = f' --data_dir={data_dir}' if data_dir else ''
  manual = ' --manual_dir=DIR_WITH_ILSVRC2012_TARS' if name == 'imagenet2012' else ''
  return f'python -m mambaout_jax.data.prepare --dataset={name}{manual}{data_dir_flag}'


# ----------------------------------------------------------------------------------------------
# TFDS


def _import_project_builders():
  from mambaout_jax.data import digits  # noqa: F401  (registers `mambaout_digits` with TFDS)
  from mambaout_jax.data import ade20k  # noqa: F401  (registers `ade20k`)


def tfds_builder(name: str, data_dir: str | None):
  """The TFDS builder of `name`: as prepared on disk, or set to prepare ArrayRecord files."""
  import tensorflow_datasets as tfds
  _import_project_builders()
  builder = tfds.builder(name, data_dir=data_dir or None)
  if builder.is_prepared():
    _restore_alternative_formats(builder.info)
    return builder
  return tfds.builder(name, data_dir=data_dir or None, file_format='array_record')


def _restore_alternative_formats(info) -> None:
  # tfds 4.9.10 reads `alternative_file_formats` from dataset_info.json into the proto only, so a
  # TFRecord preparation later converted to ArrayRecord would not be readable at random access.
  from tensorflow_datasets.core import file_adapters
  for value in info.as_proto.alternative_file_formats:
    file_format = file_adapters.FileFormat.from_value(value)
    if file_format not in info.alternative_file_formats:
      info._alternative_file_formats.append(file_format)  # pylint: disable=protected-access


def _has_array_record(builder) -> bool:
  from tensorflow_datasets.core import file_adapters
  info = builder.info
  formats = {info.file_format} | set(getattr(info, 'alternative_file_formats', ()) or ())
  return file_adapters.FileFormat.ARRAY_RECORD in formats


def ensure_prepared(name: str, data_dir: str | None):
  """Returns the TFDS builder of `name`, preparing it when that needs no download (the demo)."""
  from mambaout_jax.data import digits
  builder = tfds_builder(name, data_dir)
  if not builder.is_prepared():
    if name == digits.NAME:  # Ships inside scikit-learn: prepare on first use.
      return _prepare_once(name, data_dir)
    raise DatasetNotFoundError(
        f'dataset {name!r} is not prepared in {builder.data_dir!r}; prepare it with: '
        f'{prepare_command(name, data_dir)}')
  if not _has_array_record(builder):
    raise DatasetNotFoundError(
        f'dataset {name!r} in {builder.data_dir!r} is prepared as '
        f'{builder.info.file_format.value}, not ArrayRecord (needed for random access); '
        'convert it with: '
        f'{prepare_command(name, data_dir).replace(" --manual_dir=DIR_WITH_ILSVRC2012_TARS", "")}'
        ' --convert_existing')
  return builder


def _prepare_once(name: str, data_dir: str | None):
  """Prepares a no-download dataset; a file lock lets concurrent processes share the work."""
  import fcntl
  builder = tfds_builder(name, data_dir)
  dataset_dir = os.path.dirname(str(builder.data_dir))
  if '://' in dataset_dir:  # No locking on remote file systems.
    builder.download_and_prepare()
    return builder
  os.makedirs(dataset_dir, exist_ok=True)
  with open(os.path.join(dataset_dir, '.prepare.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    builder = tfds_builder(name, data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare()
      builder = tfds_builder(name, data_dir)
  return builder


def _check_features(name: str, builder) -> None:
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise ValueError(f'dataset {name!r} has features {", ".join(features)}; an '
                     "image-classification dataset needs 'image' and 'label'")


class TfdsSource:
  """A TFDS split read at random access (ArrayRecord) with the image left encoded."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds
    builder = ensure_prepared(name, data_dir)
    _check_features(name, builder)
    if split not in builder.info.splits:
      raise ValueError(f'dataset {name!r} has no split {split!r}; valid splits: '
                       f'{", ".join(sorted(builder.info.splits))}')
    self._source = builder.as_data_source(
        split, decoders={'image': tfds.decode.SkipDecoding()}, file_format='array_record')
    self.num_classes = builder.info.features['label'].num_classes
    self._name = f'{name} {split}[%d]'

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._source[index]
    return {'image': record['image'], 'label': int(record['label'])}

  def describe(self, index: int) -> str:
    return self._name % index


# ----------------------------------------------------------------------------------------------
# ImageFolder: ROOT/<split>/<class name>/<image file> (a local path or a gs:// bucket)


def _list_classes(split_dir) -> list[str]:
  """Sub-directories, sorted; hidden ones (.ipynb_checkpoints, .cache) are not classes."""
  return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith('.'))


def _image_files(directory):
  """Image files under `directory` (recursively, sorted); other and hidden files (.DS_Store,
  macOS '._x.jpg' resource forks) are ignored."""
  for path in sorted(directory.iterdir()):
    if path.name.startswith('.'):
      continue
    if path.is_dir():
      yield from _image_files(path)
    elif path.suffix.lower() in IMAGE_EXTENSIONS:
      yield path


class FolderSource:
  """Images in `root/split/<class>/...`; classes are the sorted sub-directories of `class_split`."""

  def __init__(self, root: str, split: str, class_split: str = 'train'):
    from etils import epath
    split_dir = epath.Path(root) / split
    if not split_dir.is_dir():
      raise DatasetNotFoundError(
          f'image folder split {str(split_dir)!r} does not exist; expected '
          f'{root}/{split}/<class>/<image>')
    class_dir = epath.Path(root) / class_split
    self.class_names = _list_classes(class_dir if class_dir.is_dir() else split_dir)
    if not self.class_names:
      raise DatasetNotFoundError(f'no class sub-directories in {str(split_dir)!r}')
    self.num_classes = len(self.class_names)
    unknown = sorted(set(_list_classes(split_dir)) - set(self.class_names))
    if unknown:
      raise ValueError(
          f'image folder split {str(split_dir)!r} has class directories that {class_split!r} lacks '
          f'({", ".join(unknown[:5])}); labels come from {str(class_dir)!r}: add them there or '
          'remove them')
    self._files: list[tuple[str, int]] = []
    empty = []
    for label, class_name in enumerate(self.class_names):
      files = list(_image_files(split_dir / class_name)) if (split_dir / class_name).is_dir() else []
      empty += [] if files else [class_name]
      self._files.extend((str(path), label) for path in files)
    if empty and self._files and split == class_split:
      logging.warning('%d class directories of %r hold no images (%s); their labels are kept, so '
                      'the model has outputs that never train', len(empty), str(split_dir),
                      ', '.join(empty[:5]))
    if not self._files:
      raise DatasetNotFoundError(
          f'no images ({", ".join(IMAGE_EXTENSIONS)}) under {str(split_dir)!r}')

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    from etils import epath
    path, label = self._files[index]
    return {'image': epath.Path(path).read_bytes(), 'label': label}

  def describe(self, index: int) -> str:
    return self._files[index][0]


# ----------------------------------------------------------------------------------------------


def open_source(name: str, split: str, data_dir: str | None = None, *,
                class_split: str = 'train') -> Source:
  """Split `split` of dataset `name` ('folder:/path' or a TFDS name) as a random-access source.

  For an image folder, the class names (and so the labels) come from the sub-directories of
  `class_split` (the training split), so every split uses the same label numbering.
  """
  if name.startswith(FOLDER_PREFIX):
    return FolderSource(name[len(FOLDER_PREFIX):], split, class_split)
  return TfdsSource(name, split, data_dir)


def get_dataset_info(config) -> DatasetInfo:
  """Number of classes and the sizes of the train and eval splits named by `config.dataset`."""
  ds = config.dataset
  data_dir = ds.get('data_dir', '') or None
  train_split, eval_split = ds.get('train_split', 'train'), ds.get('eval_split', 'validation')
  if ds.name.startswith(FOLDER_PREFIX):
    train = open_source(ds.name, train_split, class_split=train_split)
    evaluation = open_source(ds.name, eval_split, class_split=train_split)
    num_classes, num_train, num_eval = train.num_classes, len(train), len(evaluation)
  else:
    builder = ensure_prepared(ds.name, data_dir)
    for split in (train_split, eval_split):
      if split not in builder.info.splits:
        raise ValueError(f'dataset {ds.name!r} has no split {split!r}; valid splits: '
                         f'{", ".join(sorted(builder.info.splits))}')
    num_classes = builder.info.features['label'].num_classes
    num_train = builder.info.splits[train_split].num_examples
    num_eval = builder.info.splits[eval_split].num_examples
  if ds.get('num_classes', 0):
    num_classes = ds.num_classes
  return DatasetInfo(num_classes=num_classes, num_train_examples=num_train,
                     num_eval_examples=num_eval)
