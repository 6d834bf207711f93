r"""The demo: the real two-tower AlexNet learns the built-in shapes data on a CPU.

The data (ten classes of shapes and textures at random places, sizes and
colours, so only spatial features tell them apart) is generated once, in
seconds, as real JPEGs under ~/.cache/alexnet_jax, and goes through the same
decode / crop / flip / PCA-jitter pipeline as ImageNet. The network is the
paper's topology (two towers, LRN, overlapping pooling, dropout, exchanges at
conv3/fc6/fc7/fc8) at 1/3 of its conv widths and 1/16 of its fc widths.

Run (the README's first command):

  python main.py --workdir=runs/demo --config=experiments/demo.py

Expected on a 2-core CPU: about 5 minutes in all; validation top-1 error well
below the 90% of chance after 8 epochs (a run on a loaded machine reached
77% after 3 epochs and was still falling); results, TensorBoard events,
checkpoints and figures in runs/demo.

What differs from the paper here, and why (measured on this data, see the
closing note of the training-driver issue): at 1/3 of the conv widths and
200-300 steps, the paper's SGD (lr 0.01, momentum 0.9) with its N(0, 0.01)
init and unit biases stays at chance: on 0-255 inputs conv1's gradient is
~10x its weights while conv2-5 move ~0.06x, so the middle layers barely learn
in a few hundred steps (plain optax SGD does the same; so do lr 0.0005-0.05,
warm-up, Caffe's 0.1 biases and per-layer rates tried). Adam (lr 3e-4) with
zero biases and fan-in-scaled stds learns within minutes, so the demo uses it,
without dropout and PCA jitter (which the paper reports slow convergence ~2x).
Everything else (towers, exchanges, LRN, pooling, crops, flips, ten-crop
evaluation) is the paper's.
"""

from experiments import alexnet


def get_config(variant: str = ""):
  c = alexnet.get_config()
  c.dataset.name = "demo"
  c.dataset.demo_train_per_class = 200
  c.dataset.demo_val_per_class = 40
  c.dataset.demo_image_size = 128
  m = c.model
  m.num_classes = 10
  m.conv_features = (32, 64, 96, 96, 64)
  m.fc_features = (256, 256)
  # Paper biases 1 -> 0 and stds scaled up for the narrow layers (fan-in).
  m.init_weight_std = (0.01, 0.03, 0.03, 0.03, 0.03, 0.03, 0.05, 0.01)
  m.init_bias = (0.0,) * 8
  m.dropout_rate = 0.0
  c.input.pca_jitter = False
  c.input.stats_max_images = 500
  c.batch_size = 64
  c.eval_batch_size = 100
  c.optim.optimizer = "adam"
  c.optim.learning_rate = 3e-4
  c.optim.schedule = "piecewise"
  c.optim.boundaries_epochs = (7.0,)
  c.num_epochs = 8.0
  c.eval_every_steps = 31  # about once an epoch
  c.checkpoint_every_steps = 62
  c.log_every_steps = 10
  if variant == "smoke":
    alexnet.apply_smoke(c)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; try 'smoke'")
  return c
