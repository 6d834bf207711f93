"""The input pipeline's public API; the implementation lives in `alexnet_jax.data`.

  info = dataset_info(config)                  # sizes, class names; decodes nothing
  for batch in train_batches(config, start_step=k, process_index=p, process_count=P):
    batch['image']  # float32 [B/P, S, S, 3], batch['label'] int32 [B/P]
  for batch in eval_batches(config, ten_crop=True, ...):
    batch['image']  # float32 [b, 10, S, S, 3]; 'label' int32 [b]; 'mask' bool [b]
"""

from alexnet_jax.data import *  # noqa: F403
from alexnet_jax.data import __all__  # noqa: F401
