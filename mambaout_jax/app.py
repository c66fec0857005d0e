"""Web demo: upload an image, see the top-5 classes and the feature maps of the four stages.

    pip install "mambaout_jax[demo]"      # gradio
    python -m mambaout_jax.app --variant=mambaout_tiny --checkpoint=hf-hub:timm/mambaout_tiny.in1k
    python -m mambaout_jax.app --variant=mambaout_test --checkpoint=/tmp/ft/export --port=7861

`--checkpoint` is any pretrained source (`mambaout_jax.pretrained`): a params checkpoint directory
(`convert` output or a run's `WORKDIR/export`), an official / timm `.pth` or `.safetensors` (read
without unpickling arbitrary objects) or `hf-hub:timm/<tag>`. Preprocessing is the official eval
transform (a Hub tag's own size and crop_pct unless --image_size / --crop_pct are given).

Safe by default: the server listens on 127.0.0.1 only (`--host=0.0.0.0` to serve the network),
creates no public gradio.live link unless `--share`, and refuses uploads above `--max_file_size`.
A file that is not an image gets a message on the page, not a stack trace.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import numpy as np

# Stops of matplotlib's 'inferno' colour map, for the feature-map heatmaps (no matplotlib needed).
_INFERNO = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                     [245, 125, 21], [250, 193, 39], [252, 255, 164]], np.float64)


def heatmap(values: np.ndarray, size: int = 224) -> np.ndarray:
  """(H, W) -> (size, size, 3) uint8: min-max scaled, coloured, enlarged with nearest neighbours."""
  v = values.astype(np.float64)
  v = (v - v.min()) / max(v.max() - v.min(), 1e-12)
  pos = v * (len(_INFERNO) - 1)
  lo = np.floor(pos).astype(int).clip(0, len(_INFERNO) - 2)
  rgb = _INFERNO[lo] + (pos - lo)[..., None] * (_INFERNO[lo + 1] - _INFERNO[lo])
  rows = np.arange(size) * v.shape[0] // size
  cols = np.arange(size) * v.shape[1] // size
  return rgb[rows][:, cols].round().astype(np.uint8)


@dataclasses.dataclass
class Classifier:
  """A loaded model with its eval transform: image -> top-k (name, prob) and stage feature maps."""
  model: Any
  image_size: int = 224
  crop_pct: float = 1.0

  def __post_init__(self):
    import jax
    from flax import nnx
    graphdef, state = nnx.split(self.model)

    @jax.jit
    def forward(state, x):
      model = nnx.merge(graphdef, state)
      feats = model.forward_features(x)
      return model.head(feats[-1]).astype(np.float32), feats
    self._forward = lambda x: forward(state, x)

  def __call__(self, image, k: int = 5):
    from mambaout_jax import predict
    x = predict.preprocess(image, self.image_size, self.crop_pct)[None]
    logits, feats = self._forward(x)
    top = predict.topk(np.asarray(logits), k)[0]
    labels = [(predict.class_name(i, self.model.num_classes), p) for i, p in top]
    maps = [np.asarray(f[0], np.float32) for f in feats]
    return labels, maps


def load_classifier(variant: str, checkpoint: str, *, image_size: int | None = None,
                    crop_pct: float | None = None) -> Classifier:
  from mambaout_jax import pretrained
  model = pretrained.load(variant, checkpoint)
  eval_cfg = pretrained.eval_overrides(checkpoint)
  return Classifier(model, image_size=image_size or eval_cfg.get('image_size', 224),
                    crop_pct=crop_pct or eval_cfg.get('aug.crop_pct', 1.0))


def create_demo(classifier: Classifier, *, title: str):
  """The Gradio page: an image file in; the top-5, the model's input crop and 4 heatmaps out."""
  import gradio as gr
  from mambaout_jax import predict

  def classify(path):
    if not path:
      raise gr.Error('upload an image first', print_exception=False)
    try:
      image = predict.load_image(path)
    except (ValueError, FileNotFoundError):
      raise gr.Error(f'{os.path.basename(path)} is not an image that can be read (JPEG, PNG, '
                     'WebP, ...); upload an image file', print_exception=False) from None
    labels, maps = classifier(image)
    crop = predict.resize_and_center_crop(image, classifier.image_size, classifier.crop_pct)
    gallery = [(heatmap(np.abs(f).mean(-1)), f'stage {i}: {f.shape[0]}x{f.shape[1]}x{f.shape[2]}'
                f' (mean |activation| over channels)') for i, f in enumerate(maps)]
    return dict(labels), np.asarray(crop), gallery

  with gr.Blocks(title=title, analytics_enabled=False) as demo:
    gr.Markdown(f'# {title}\nUpload an image: the top-5 classes, the crop the model sees, and the '
                'mean absolute activation of each of the four stages.')
    with gr.Row():
      with gr.Column():
        upload = gr.File(label='image', file_types=['image'], type='filepath')
        button = gr.Button('Classify', variant='primary')
      with gr.Column():
        top5 = gr.Label(num_top_classes=5, label='top-5')
        crop = gr.Image(label=f'model input ({classifier.image_size} px)', type='numpy')
    stages = gr.Gallery(label='stage feature maps', columns=4, height='auto')
    button.click(classify, inputs=upload, outputs=[top5, crop, stages], api_name='classify')
    upload.upload(classify, inputs=upload, outputs=[top5, crop, stages], api_name=False)
  return demo


def main(argv=None) -> int:
  import argparse
  p = argparse.ArgumentParser(prog='python -m mambaout_jax.app', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--variant', required=True, help='model name, see mambaout_jax.list_models()')
  p.add_argument('--checkpoint', required=True,
                 help='params checkpoint dir, .pth / .safetensors file, or hf-hub:timm/<tag>')
  p.add_argument('--port', type=int, default=7860)
  p.add_argument('--host', default='127.0.0.1',
                 help='address to listen on (default: this machine only; 0.0.0.0: the network)')
  p.add_argument('--share', action='store_true', help='also create a public gradio.live link')
  p.add_argument('--max_file_size', default='10mb', help='largest upload accepted')
  p.add_argument('--image_size', type=int, default=None, help='default: the checkpoint\'s, or 224')
  p.add_argument('--crop_pct', type=float, default=None, help='default: the checkpoint\'s, or 1.0')
  args = p.parse_args(argv)

  os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
  try:
    import gradio  # noqa: F401
  except ImportError:
    print('error: the web demo needs gradio: pip install "mambaout_jax[demo]" (or pip install '
          'gradio)', file=sys.stderr)
    return 1
  try:
    classifier = load_classifier(args.variant, args.checkpoint, image_size=args.image_size,
                                 crop_pct=args.crop_pct)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  demo = create_demo(classifier, title=f'MambaOut: {args.variant}')
  print(f'serving {args.variant} from {args.checkpoint} on http://{args.host}:{args.port}',
        flush=True)
  demo.queue(max_size=16).launch(server_name=args.host, server_port=args.port, share=args.share,
                                 max_file_size=args.max_file_size, show_error=False,
                                 inbrowser=False, quiet=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
