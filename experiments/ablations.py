r"""The paper's ablations as a sweep: each of its design choices switched off in turn.

Points (each a set of --config.* overrides of the base config):

  baseline              the base config as it is
  no_lrn                local response normalisation off                (paper: LRN helps)
  non_overlapping_pool  max-pooling window 2, stride 2 instead of 3/2   (paper: overlap helps)
  one_tower             one tower on one device, with the paper's one-GPU widths (below)
  no_dropout            dropout off                                     (paper: overfits)
                        (with_dropout, dropout 0.5 on, where the base has none: the demo)
  tanh                  tanh instead of ReLU everywhere                 (paper: Figure 1)

The one-GPU net of the paper (section 3.2 and its footnote) is "a net with half as many
kernels in each convolutional layer trained on one GPU", except that it keeps the
two-GPU net's number of kernels in the last convolutional layer and the full
fully-connected layers, so that the two nets have about the same number of parameters
(most of them are in fc6, which reads conv5). So `one_tower` halves conv1-conv4 and keeps
conv5 and fc6-fc8: 48-128-192-192-256, 4096-4096 on ImageNet. With one tower every layer
sees all channels of the previous one (there is no tower boundary), as on one GPU. The
widths are computed from the base config, so the rule holds for the demo's widths too.

Run on ImageNet (one point after another; or `--print_only` for the six commands, to run
them side by side on a cluster):

  python -m alexnet_jax.tools.sweep --sweep=experiments/ablations.py --workdir=runs/ablations \
      --config.dataset.manual_dir=/data/imagenet/manual

Expected (ILSVRC-2012 val, 10 crops; the paper's changes): baseline about 40.7% top-1 /
18.2% top-5; no_lrn +1.4 / +1.2 (the 2012 code logged 42.03 / 19.36); non_overlapping_pool
+0.4 / +0.3 (41.06 / 18.51); one_tower +1.7 / +1.2 (measured on ILSVRC-2010 test: 39.17 /
18.23 against 37.47 / 17.00); no_dropout: worse through overfitting, and about half the
epochs to converge; tanh: no number in the paper (on CIFAR-10 it is six times slower to
reach 25% training error, Figure 1). Six times 5-6 days on two GTX 580 in 2012.

Variants:
  `:demo`   the same points over experiments/demo.py (the built-in shapes data on a CPU):
            python -m alexnet_jax.tools.sweep --sweep=experiments/ablations.py:demo \
                --workdir=experiments/results/ablations_demo
            3-6 minutes a point on a shared 2-core CPU, about 25 minutes in all;
            results in experiments/results/ablations_demo/results.md.
  `:smoke`  over experiments/alexnet.py:smoke: 2 steps a point, to check a set-up.
"""

from __future__ import annotations

from typing import Any

from experiments import alexnet, demo

# Base config file (relative to the repo root) and its variant, by sweep variant.
BASES = {
    "": ("experiments/alexnet.py", "", alexnet.get_config),
    "demo": ("experiments/demo.py", "", demo.get_config),
    "smoke": ("experiments/alexnet.py", "smoke", lambda: alexnet.get_config("smoke")),
}

# The paper's one-GPU net: half the kernels in conv1-conv4, all of them in conv5.
ONE_TOWER_HALVED_CONV_LAYERS = 4

# The paper's dropout, for a base config without it (the demo trains without).
PAPER_DROPOUT_RATE = 0.5

REFERENCE_SOURCES = {
    "paper": "Krizhevsky et al. 2012 as printed: ILSVRC-2012 val, 10 crops; Δ = the error "
             "the paper says the choice saves (one_tower: on ILSVRC-2010 test)",
    "code_2012": "the ablations logged in the released 2012 code's layer files (ILSVRC-2012 "
                 "val, 10 crops; one_tower: ILSVRC-2010 test, whose two-tower run logged "
                 "37.47 / 17.00)",
}


def dropout_point(base_rate: float) -> dict[str, Any]:
  """Dropout off; or, where the base has none (the demo's), the paper's dropout on."""
  note = ("the paper gives no number: without dropout the net overfits substantially; "
          "dropout roughly doubles the iterations needed to converge.")
  if base_rate > 0:
    return dict(name="no_dropout", description="no dropout on fc6, fc7",
                overrides={"model.dropout_rate": 0.0}, note=note)
  return dict(name="with_dropout",
              description=f"dropout {PAPER_DROPOUT_RATE} on fc6, fc7 (the base has none)",
              overrides={"model.dropout_rate": PAPER_DROPOUT_RATE},
              note=note + " The base config has no dropout, so this point adds the paper's.")


def get_sweep(variant: str = "") -> dict[str, Any]:
  if variant not in BASES:
    raise ValueError(f"unknown variant {variant!r} of experiments/ablations.py; "
                     f"try one of {sorted(v for v in BASES if v)}")
  config_path, config_variant, get_base = BASES[variant]
  base = get_base().model
  widths = tuple(base.conv_features)
  one_tower_widths = (tuple(w // 2 for w in widths[:ONE_TOWER_HALVED_CONV_LAYERS])
                      + widths[ONE_TOWER_HALVED_CONV_LAYERS:])
  points = [
      dict(name="baseline", description="the base config",
           overrides={},
           reference={"paper": {"top1": 40.7, "top5": 18.2}}),
      dict(name="no_lrn", description="no local response normalisation",
           overrides={"model.lrn.enabled": False},
           reference={"paper": {"delta_top1": 1.4, "delta_top5": 1.2},
                      "code_2012": {"top1": 42.03, "top5": 19.36}}),
      dict(name="non_overlapping_pool", description="max-pool 2x2 stride 2 (not 3x3 stride 2)",
           overrides={"model.pool_window": 2, "model.pool_stride": 2},
           reference={"paper": {"delta_top1": 0.4, "delta_top5": 0.3},
                      "code_2012": {"top1": 41.06, "top5": 18.51}}),
      dict(name="one_tower",
           description=f"one tower, conv widths {'-'.join(map(str, one_tower_widths))}",
           overrides={"model.towers": 1, "mesh.model": 1,
                      "model.conv_features": one_tower_widths},
           reference={"paper": {"delta_top1": 1.7, "delta_top5": 1.2},
                      "code_2012": {"top1": 39.17, "top5": 18.23, "delta_top1": 1.70,
                                    "delta_top5": 1.23}},
           note="the paper's one-GPU net: half the kernels of conv1-conv4, all of conv5 and "
                "the full fc layers (its footnote); references measured on ILSVRC-2010 test, "
                "against a two-tower 37.5 / 17.0."),
      dropout_point(base.dropout_rate),
      dict(name="tanh", description="tanh instead of ReLU",
           overrides={"model.activation": "tanh"},
           note="the paper gives no ImageNet number; on CIFAR-10 a four-layer tanh net takes "
                "six times as long as with ReLUs to reach 25% training error (Figure 1; "
                "python -m alexnet_jax.tools.figure1)."),
  ]
  return {
      "title": f"AlexNet ablations over {config_path}{':' + config_variant if config_variant else ''}",
      "config": config_path,
      "config_variant": config_variant,
      "reference_sources": REFERENCE_SOURCES,
      "points": points,
  }
