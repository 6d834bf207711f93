r"""The paper's network and recipe on real photos (imagenette, 10 classes) on a 2-core CPU.

What it is: `experiments/alexnet.py` (the paper as written: two towers, paper LRN,
overlapping pooling, dropout 0.5, crops + flips + PCA jitter, ten-crop evaluation, SGD
with momentum 0.9, weight decay 0.0005, lr 0.01, batch 128), fitted to 10 classes and a
60-minute CPU budget. Deviations from the paper, each measured on this data
(experiments/results/fidelity/README.md has the numbers and commands):

- init: conv3-5 weight std 0.03 instead of 0.01 (the released 2012 code's value).
  With the paper's 0.01 and its unit biases the image is gone from the signal by fc6
  (input-dependent share of the pre-activations at init: conv4 1.1%, conv5 0.16%, fc6
  0.07%; with 0.03: 14%, 10%, 4.7%) and training starts slowly: at step 50 alexnet.py
  is at loss 2.25 and 83.6% held-out error, the 2012 code (0.03) at 2.09 and 78.6%, and
  the 2012 code with 0.01 back at 2.26 and 84.6% (the std alone decides; with inverted
  dropout alexnet.py sat at 2.303 for 170 steps).
- schedule: the paper's "divide by 10 on a validation plateau" cannot act in 7 epochs;
  lr 0.01 constant, divided by 10 for the last 1.5 epochs. 7 epochs (462 steps of 128)
  fit the 60-minute budget (47.7 minutes measured, below).
- data: the imagenette training folder with 10% of each class held out as validation
  (sorted names; made by alexnet_jax.data.holdout); dataset statistics (mean image,
  PCA) computed from its training part; the square cache (the paper's pre-downsampled
  256x256 images).

Run (make the split once, seconds):

  python -m alexnet_jax.data.holdout /work/shared/data/imagenette/train /tmp/imagenette_split
  python main.py --workdir=runs/imagenette --config=experiments/imagenette.py

Expected (measured, 2 idle cores, AMD EPYC Zen 4, experiments/results/fidelity/):
47.7 minutes in all (5.3-5.8 s a step, ~23 img/s; statistics, square cache, 4 centre-crop
evaluations, the ten-crop one and the figures included); the loss rises to ~3.4 in the
first 10 steps, falls below ln 10 by step ~30; held-out top-1 error (centre crop) 55.4% /
44.3% / 39.2% / 34.7% at epochs 2 / 4 / 6 / 7, and **33.7% top-1 / 5.5% top-5 with ten
crops** after 7 epochs (953 held-out images; chance 90% / 50%). The goal was <= 35%.

Dropout is the paper's "scale_at_test" form (as in alexnet.py). The inverted form,
equal in expectation, doubles fc7's and fc8's inputs during training; with std 0.03 it
made the first steps blow up at lr 0.01 (loss 4.1 -> 45 at step 4, then stuck at 2.303
from step ~12 to 75, measured).
"""

from experiments import alexnet


def get_config(variant: str = ""):
  c = alexnet.get_config()
  c.dataset.name = "image_folder"
  c.dataset.image_folder = "/tmp/imagenette_split"
  m = c.model
  m.num_classes = 10
  m.init_weight_std = (0.01, 0.01, 0.03, 0.03, 0.03, 0.01, 0.01, 0.01)
  c.input.square_cache = True
  c.microbatch_size = 32  # same gradient as one pass of 128; ~1.5x faster on CPU
  c.optim.schedule = "piecewise"
  c.optim.boundaries_epochs = (5.5,)
  c.num_epochs = 7.0  # 66 steps of 128 per epoch (8,516 training images)
  c.eval_every_steps = 132  # every 2 epochs, centre crop; ten crops at the end
  c.eval_batch_size = 128
  c.checkpoint_every_steps = 66  # once an epoch
  c.log_every_steps = 10
  c.figures.max_train_images = 500
  if variant == "smoke":
    alexnet.apply_smoke(c)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; try 'smoke'")
  return c
