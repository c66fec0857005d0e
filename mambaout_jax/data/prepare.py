r"""Prepares a TFDS dataset in ArrayRecord format (random access, what the Grain pipelines read).

ImageNet from the two ILSVRC2012 tars (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar) in a
manual dir:

  python -m mambaout_jax.data.prepare --dataset=imagenet2012 \
      --manual_dir=/data/imagenet_tars --data_dir=/data/tensorflow_datasets

An existing TFRecord preparation (e.g. a TFDS copy in a bucket) converted in place, shards
written next to the TFRecord ones:

  python -m mambaout_jax.data.prepare --dataset=imagenet2012 \
      --data_dir=gs://my-bucket/tensorflow_datasets --convert_existing

Any other TFDS image-classification dataset by name (downloaded by TFDS where it can), and the
demo dataset `mambaout_digits` (no download; also prepared automatically on first use).
"""
from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags
from absl import logging

_DATASET = flags.DEFINE_string('dataset', 'imagenet2012', 'TFDS dataset name.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'TFDS data dir to prepare into; "" = TFDS default.')
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', '',
    'Directory with manually downloaded files (imagenet2012: the ILSVRC2012 tars).')
_CONVERT_EXISTING = flags.DEFINE_bool(
    'convert_existing', False,
    'Convert an existing TFRecord preparation of --dataset in --data_dir to ArrayRecord.')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', 8, 'Parallel shard conversions.')


def prepare(dataset: str, data_dir: str | None = None, manual_dir: str | None = None):
  """Builds `dataset` with its TFDS builder in ArrayRecord format; returns the builder."""
  import tensorflow_datasets as tfds
  from mambaout_jax.data import sources
  builder = sources.tfds_builder(dataset, data_dir)
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
  builder.download_and_prepare(download_config=download_config)
  logging.info('prepared %s in %s', dataset, builder.data_dir)
  return builder


def _convert_shard(in_path, out_path, in_adapter, out_adapter) -> None:
  def records():
    for i, record in enumerate(in_adapter.make_tf_data(filename=in_path)):
      yield i, record.numpy()
  tmp_path = out_path.parent / (out_path.name + '.incomplete')
  out_adapter.write_examples(path=tmp_path, iterator=records())
  tmp_path.rename(out_path)


def convert_existing(dataset: str, data_dir: str | None = None, num_workers: int = 8) -> str:
  """Writes ArrayRecord shards beside an existing (TFRecord) preparation of `dataset`.

  The same serialized examples are copied shard by shard, then ArrayRecord is recorded as an
  alternative file format in dataset_info.json, so TFDS readers of either format keep working.
  (TFDS's own `convert_format` does the same but needs apache_beam installed.) Returns the dir.
  """
  import concurrent.futures
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import dataset_info as dataset_info_lib
  from tensorflow_datasets.core import file_adapters
  from mambaout_jax.data import sources
  sources._import_project_builders()  # pylint: disable=protected-access
  builder = tfds.builder(dataset, data_dir=data_dir or None)
  if not builder.is_prepared():
    raise sources.DatasetNotFoundError(
        f'no prepared {dataset!r} in {builder.data_dir!r} to convert; prepare it with: '
        f'{sources.prepare_command(dataset, data_dir)}')
  dataset_dir = builder.data_path
  info = dataset_info_lib.read_proto_from_builder_dir(dataset_dir)
  in_format = file_adapters.FileFormat(info.file_format or 'tfrecord')
  out_format = file_adapters.FileFormat.ARRAY_RECORD
  if in_format == out_format or out_format.value in info.alternative_file_formats:
    logging.info('%s in %s already has ArrayRecord files', dataset, dataset_dir)
    return str(dataset_dir)
  split_paths = []
  for fmt in (in_format, out_format):
    splits = dataset_info_lib.get_split_dict_from_proto(
        dataset_info_proto=info, data_dir=dataset_dir, file_format=fmt)
    split_paths.append([p for name in sorted(splits) for p in splits[name].filepaths])
  in_adapter = file_adapters.ADAPTER_FOR_FORMAT[in_format]
  out_adapter = file_adapters.ADAPTER_FOR_FORMAT[out_format]
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    jobs = [pool.submit(_convert_shard, i, o, in_adapter, out_adapter)
            for i, o in zip(*split_paths) if not o.exists()]
    for job in jobs:
      job.result()
  info.alternative_file_formats.append(out_format.value)
  dataset_info_lib.write_dataset_info_proto(info, dataset_info_dir=dataset_dir)
  logging.info('converted %s in %s to ArrayRecord (%d shards)', dataset, dataset_dir, len(jobs))
  return str(dataset_dir)


def main(argv: Sequence[str]):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONVERT_EXISTING.value:
    convert_existing(_DATASET.value, _DATA_DIR.value, _NUM_WORKERS.value)
  else:
    prepare(_DATASET.value, _DATA_DIR.value, _MANUAL_DIR.value)


if __name__ == '__main__':
  app.run(main)
