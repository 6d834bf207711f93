r"""AlexNet as the 2012 paper describes it, on ILSVRC-2012.

Reproduces: Krizhevsky, Sutskever & Hinton (NIPS 2012), one CNN, ILSVRC-2012
validation: 40.7% top-1 / 18.2% top-5 error (10 views). Paper-literal choices
everywhere the paper and the released 2012 code differ (LRN alpha not divided
by n, equal learning rate and decay for biases, PCA jitter scaled by the
eigenvalues); `experiments/alexnet_2012_code.py` is the other side of each
choice. Dropout is the paper's section 4.2 (drop at training time, multiply the
outputs by 0.5 at test time), which the 2012 code also ran; inverted dropout
(`--config.model.dropout_style=inverted`) is equal in expectation, not literal.

Run (two towers on two devices, data parallel over the rest):

  python main.py --workdir=runs/alexnet --config=experiments/alexnet.py \
      --config.dataset.manual_dir=/data/imagenet/manual

Expected: about 40-41% top-1 / 18-19% top-5 error after ~90 epochs (10 crops).
Time: 5-6 days on two GTX 580 in 2012. See BENCHMARKS.md for a projection
on current hardware.

Variants: `--config=experiments/alexnet.py:smoke` is the same network, tiny,
for checking a set-up in seconds (demo data, 2 steps).
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---------------------------------------------------------------- model
  c.model = m = ml_collections.ConfigDict()
  m.towers = 2  # 2 = the paper's two GPUs; 1 = its one-GPU ablation.
  m.num_classes = 1000
  m.input_size = 224  # crop side fed to the network
  # conv1 padding (before, after) on each spatial side. cuda-convnet treated
  # pixels past the bottom/right edge of a 224 crop as zeros (the "3-pixel
  # overhang"): 224 + 3 = 227 - 11 = 216 / 4 + 1 = 55. Use (0, 0) with 227.
  m.conv1_padding = (0, 3)
  # Widths summed over both towers (each tower owns half).
  m.conv_features = (96, 256, 384, 384, 256)
  m.conv_kernel_size = (11, 5, 3, 3, 3)
  m.conv_stride = (4, 1, 1, 1, 1)
  m.fc_features = (4096, 4096)  # fc6, fc7; fc8 has num_classes outputs.
  # Layers whose input is gathered from both towers: the paper's
  # cross-GPU connections. All others see their own tower only.
  m.cross_tower = ("conv3", "fc6", "fc7", "fc8")
  m.activation = "relu"  # "relu" or "tanh"
  m.pool_window = 3  # overlapping pooling; 2 with stride 2 = non-overlapping.
  m.pool_stride = 2
  m.lrn = ml_collections.ConfigDict(dict(
      enabled=True,
      layers=("conv1", "conv2"),
      k=2.0, n=5, alpha=1e-4, beta=0.75,
      alpha_over_n=False,  # paper: alpha as printed; 2012 code: alpha / n.
      per_tower=True,  # windows stop at the tower boundary (2012 code).
      before_relu_in_conv1=False,  # 2012 code: conv1 -> LRN -> pool -> ReLU.
  ))
  # The 2012 code's extra same-map 5x5 spatial normalisation after conv2's LRN.
  m.cnorm2 = ml_collections.ConfigDict(dict(
      enabled=False, size=5, k=1.0, alpha=0.001, beta=0.75, alpha_over_size=True))
  m.dropout_rate = 0.5  # on fc6 and fc7 outputs
  # "scale_at_test": drop at training time, multiply by (1 - rate) at test time (the
  # paper's section 4.2 and the 2012 code); "inverted": scale kept units by 1 / (1 - rate)
  # at training time instead (torchvision's; equal in expectation).
  m.dropout_style = "scale_at_test"
  # Per layer: conv1..conv5, fc6, fc7, fc8.
  m.init_weight_std = (0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01)
  m.init_bias = (0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0)
  m.compute_dtype = "float32"  # or "bfloat16"; parameters stay float32.
  # Convolutions: "xla" (XLA's own; on CPU with an im2col kernel gradient for conv1),
  # "onednn" (oneDNN's, PyTorch's CPU kernels, through XLA's FFI: alexnet_jax/kernels,
  # built by `pip install -e .` where a C++ compiler is), or "auto": oneDNN's on CPU
  # when that extension is built, XLA's otherwise (GPU; or no extension: one log line).
  m.conv_impl = "auto"

  # ---------------------------------------------------------------- mesh
  c.mesh = ml_collections.ConfigDict()
  # Devices per replica: 2 = one tower per device (the paper), 1 = both towers
  # on one device, -1 = 2 where the device count allows it, else 1.
  c.mesh.model = -1
  c.mesh.data = -1  # -1: all remaining devices

  # ---------------------------------------------------------------- data
  c.dataset = d = ml_collections.ConfigDict()
  d.name = "imagenet2012"  # TFDS name, "image_folder" or "demo"
  d.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir
  d.manual_dir = ml_collections.config_dict.placeholder(str)  # holds the ILSVRC tars
  d.image_folder = ml_collections.config_dict.placeholder(str)  # ROOT/{train,val}/<class>/*
  d.train_split = "train"
  d.eval_split = "validation"
  d.cache_dir = "~/.cache/alexnet_jax"  # demo data and dataset statistics
  d.demo_train_per_class = 300
  d.demo_val_per_class = 50
  d.demo_image_size = 128

  c.input = i = ml_collections.ConfigDict()
  i.resize_size = 256  # shorter side, then centre crop to resize_size^2
  i.mean = "per_pixel"  # "per_pixel", "per_channel", "published", "none"
  # Explicit per-channel means (0-255 RGB) for mean="per_channel", instead of
  # computing them; e.g. torchvision's (123.675, 116.28, 103.53) for imported weights.
  i.mean_rgb = ml_collections.config_dict.placeholder(tuple)
  i.resize_antialias = False  # PIL-style antialiased resize: smoother, ~2x slower decode
  # libjpeg's inverse DCT: "INTEGER_FAST" (TF's default) reads 0.7-0.8 levels darker on
  # average than the exact "INTEGER_ACCURATE", which equals PIL's decoder (the 2012 data
  # preparation's). Part of the statistics' and the square cache's keys.
  i.jpeg_dct_method = "INTEGER_FAST"
  # Training reads stored R x R uint8 squares (decoded once, as the paper pre-downsampled
  # to 256x256) instead of decoding JPEGs every epoch: same pixels, several times less CPU
  # per image; R*R*3 bytes per image on disk under dataset.cache_dir (~250 GB for
  # ILSVRC-2012 at 256). See alexnet_jax/data/square_cache.py.
  i.square_cache = False
  i.stats_max_images = 10_000  # training images sampled for mean/PCA stats
  i.random_crop = True
  i.flip = True
  i.pca_jitter = True
  i.pca_std = 0.1
  i.pca_scale = "eigenvalues"  # paper; "sqrt" = the 2012 code's std devs
  i.train_divisor = 1.0  # 2012 code divides training images by 1.1
  i.stats = "computed"  # "computed" (from the training set) or "published"
  i.on_bad_image = "skip"  # or "error"
  i.num_parallel_calls = -1  # -1: tf.data.AUTOTUNE
  i.prefetch = 2  # batches prefetched to the device
  # Batches tf.data reads ahead on the host: a fixed number, not AUTOTUNE, whose buffers
  # grew with the evaluation set (measured: 1.5 GB RSS on 100 images, 4.8 GB on 1,000).
  i.host_prefetch = 2
  # Largest image decoded, in pixels; a bigger one is skipped as bad. JPEGs are decoded at
  # up to 1/8 scale first (data/decode.py), so only PNGs over 4096^2 (48 MB) hit it.
  i.max_decode_pixels = 4096 * 4096

  # ---------------------------------------------------------------- optimiser
  c.batch_size = 128  # global
  # Examples per device per forward/backward pass; 0 = the whole local batch.
  # Smaller passes whose gradients are summed give the same gradient and, on
  # CPU, a faster step (the activations of 32 images stay in cache; see
  # BENCHMARKS.md). Must divide the per-device batch.
  c.microbatch_size = 0
  # Refuse, before compiling, a train step estimated not to fit in memory (the message
  # names the largest batch that fits; alexnet_jax/memory.py says how it is estimated).
  c.memory_check = True
  c.optim = o = ml_collections.ConfigDict()
  o.optimizer = "sgd"  # the paper's momentum SGD; "adam" only for small quick demos
  o.learning_rate = 0.01
  o.momentum = 0.9
  o.weight_decay = 0.0005
  o.bias_weight_decay = True  # 2012 code: False
  o.bias_lr_multiplier = 1.0  # 2012 code: 2.0
  # Per layer (conv1..conv5, fc6, fc7, fc8), like cuda-convnet's per-layer epsW.
  o.layer_lr_multipliers = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
  o.schedule = "plateau"  # "constant", "piecewise" or "plateau"
  o.boundaries_epochs = (25.0, 51.0)  # for "piecewise"
  o.decay_factor = 0.1
  o.plateau_patience = 2  # evaluations without improvement
  o.plateau_max_reductions = 3
  o.plateau_min_delta = 1e-3  # fraction of top-1 error
  o.warmup_epochs = 0.0

  # ---------------------------------------------------------------- loop
  c.num_epochs = 90.0
  c.num_train_steps = -1  # > 0 wins over num_epochs
  c.eval_every_steps = 10_000  # the paper's plateau schedule reads these evals
  c.eval_ten_crop = True
  c.eval_batch_size = 128  # also --mode=predict's files decoded and classified at a time
  # --mode=eval --follow: how often the evaluator beside a training run lists its
  # checkpoints for a new one (one directory listing: cheap locally and on GCS).
  c.eval_follow_poll_seconds = 30.0
  c.checkpoint_every_steps = 2_000
  c.keep_checkpoints = 3
  c.log_every_steps = 100
  c.profile_steps = ()  # (start, stop): trace these steps to DIR/profile
  # A NaN/Inf loss or state (never saved): "halt" stops with the last finite checkpoint
  # kept (the paper's recipe has no rule for it; a person decides, as in 2012);
  # "rollback" restores that checkpoint, skips the batches since, and goes on, at most
  # nonfinite_max_rollbacks times in one run.
  c.on_nonfinite = "halt"
  c.nonfinite_max_rollbacks = 3

  # ---------------------------------------------------------------- figures
  c.figures = ml_collections.ConfigDict()
  c.figures.enabled = True  # written into DIR/figures/ at the end of training
  c.figures.num_queries = 8  # Figure 4: query images from the eval split
  c.figures.max_train_images = 1000  # Figure 4: training images searched for neighbours
  c.figures.num_neighbours = 6

  if variant == "smoke":
    apply_smoke(c)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of experiments/alexnet.py; try 'smoke'")
  return c


def apply_smoke(c: ml_collections.ConfigDict) -> None:
  """Shrinks a config to seconds on a CPU: same topology, tiny widths."""
  c.dataset.name = "demo"
  c.dataset.demo_train_per_class = 8
  c.dataset.demo_val_per_class = 4
  c.model.num_classes = 10
  c.model.conv_features = (8, 16, 16, 16, 16)
  c.model.fc_features = (32, 32)
  c.input.stats_max_images = 64
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_train_steps = 2
  c.eval_every_steps = 2
  c.checkpoint_every_steps = 2
  c.log_every_steps = 1
  c.eval_follow_poll_seconds = 1.0
  c.figures.enabled = False
