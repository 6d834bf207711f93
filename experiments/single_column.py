r"""The single-column AlexNet of "One weird trick" (Krizhevsky 2014) = torchvision's alexnet.

One tower, widths 64-192-384-256-256, fc 4096-4096, conv1 padding 2 on a 224
input, no LRN: 61,100,840 parameters, 714,188,480 multiply-accumulates.
torchvision's pretrained weights score 43.48% top-1 / 20.93% top-5 error
(ILSVRC-2012 val, centre crop); `python -m alexnet_jax.tools.convert_torchvision`
imports them into this config.

Run:

  python main.py --workdir=runs/single_column --config=experiments/single_column.py \
      --config.dataset.manual_dir=/data/imagenet/manual

Expected: about 42-44% top-1 / 20-21% top-5 error (centre crop) after 90 epochs.
"""

from experiments import alexnet


def get_config(variant: str = ""):
  c = alexnet.get_config()
  m = c.model
  m.towers = 1
  m.conv_features = (64, 192, 384, 256, 256)
  m.conv1_padding = (2, 2)
  m.lrn.enabled = False
  m.dropout_style = "inverted"  # torchvision's (the paper preset scales at test time)
  c.mesh.model = 1
  c.optim.schedule = "piecewise"
  c.optim.boundaries_epochs = (30.0, 60.0)
  if variant == "smoke":
    alexnet.apply_smoke(c)
    c.model.conv_features = (8, 16, 16, 16, 16)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; try 'smoke'")
  return c
