r"""AlexNet as the released 2012 training code ran it (layers-145.cfg).

Reproduces: the ILSVRC-2012 run logged by the 2012 code (released in 2023 as
computerhistory/AlexNet-Source-Code): 40.7% top-1 / 18.2% top-5 error on
ILSVRC-2012 validation with 10 views. Differences from `alexnet.py` (the paper
as written), each a config field:

- LRN alpha divided by n (b = a / (2 + 2e-5 * sum a^2)^0.75), applied to the
  pre-ReLU output in layer 1 (conv -> LRN -> pool -> ReLU), per tower;
- the extra "cnorm2" 5x5 same-map normalisation after conv2's LRN;
- weight std 0.03 in conv3-5;
- no weight decay on biases and a 2x bias learning rate;
- the logged schedule: /10 at epochs 25 and 51, stop at 91;
- PCA jitter scaled by the eigenvalues' square roots, training images / 1.1
  (after the jitter). Evaluation and prediction inputs are not divided: the
  2012 code divides by 1 + its colour-noise scale only when
  `color_noise > 0 and not self.test` (convdata_jpeg.py lines 155-179), so
  its test and multiview crops keep the undivided scale.

Dropout is the same in both (drop at training time, halve the outputs at test
time: the paper's section 4.2, and what this code ran).

Run:

  python main.py --workdir=runs/alexnet_2012_code \
      --config=experiments/alexnet_2012_code.py \
      --config.dataset.manual_dir=/data/imagenet/manual

Expected: about 40.7% / 18.2% (10 crops) after 91 epochs.
"""

from experiments import alexnet


def get_config(variant: str = ""):
  c = alexnet.get_config()
  m = c.model
  m.lrn.alpha_over_n = True
  m.lrn.before_relu_in_conv1 = True
  m.lrn.per_tower = True
  m.cnorm2.enabled = True
  m.init_weight_std = (0.01, 0.01, 0.03, 0.03, 0.03, 0.01, 0.01, 0.01)
  m.dropout_style = "scale_at_test"  # as alexnet.py: the 2012 code halved outputs at test time
  c.optim.bias_weight_decay = False
  c.optim.bias_lr_multiplier = 2.0
  c.optim.schedule = "piecewise"
  c.optim.boundaries_epochs = (25.0, 51.0)
  c.num_epochs = 91.0
  c.input.pca_scale = "sqrt"
  # Training inputs only (1 + the 0.1 colour noise; convdata_jpeg.py:155-179).
  c.input.train_divisor = 1.1
  if variant == "smoke":
    alexnet.apply_smoke(c)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; try 'smoke'")
  return c
