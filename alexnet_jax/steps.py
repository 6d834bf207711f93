"""The train state and the compiled, pure train and evaluation steps.

Both steps are one `jax.shard_map` over the (data, model) mesh with the
collectives written out where the paper had them: the model's tower
exchanges are all_gathers over `model` (inside `AlexNet.apply`), the gradient
mean is a pmean over `data`.

    train_step(state, batch, rng) -> (state, metrics)   # donates state
    eval_step(state, batch) -> metric sums

batch: {"image": float32 [B, S, S, 3] (eval: or [B, 10, S, S, 3] ten crops),
        "label": int32 [B], eval also "mask": bool [B]}, sharded over `data`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax import model as model_lib
from alexnet_jax import optim
from alexnet_jax.parallel import DATA, MODEL

TOWER_SPEC = P(MODEL)  # leading tower axis split over the model axis


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []: optimizer steps taken
  params: model_lib.Params  # every leaf [towers, ...]
  opt_state: optax.OptState
  plateau: Any  # optax reduce_on_plateau state; scalars
  rng: jax.Array  # uint32 [2]: key data of the run's base key (dropout)
  # int32 []: batches skipped by non-finite rollbacks (`on_nonfinite="rollback"`); the
  # data stream's position is step + data_skip (= step in a run without rollbacks).
  data_skip: jax.Array


def state_specs(state: TrainState, optimizer: optax.GradientTransformation) -> TrainState:
  """PartitionSpecs: tower parameters and their optimizer state on `model`."""
  return TrainState(
      step=P(),
      params=jax.tree.map(lambda _: TOWER_SPEC, state.params),
      opt_state=optax.tree_map_params(optimizer, lambda _: TOWER_SPEC, state.opt_state,
                                      transform_non_params=lambda _: P()),
      plateau=jax.tree.map(lambda _: P(), state.plateau),
      rng=P(), data_skip=P())


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """The train state of a run on a mesh, derived once: everything that builds, restores,
  shards or steps a state takes this instead of re-deriving it from the config.

  optimizer: the paper's SGD (`optim.make_optimizer`); specs: a TrainState of
  PartitionSpecs; abstract: a TrainState of ShapeDtypeStructs carrying their
  NamedShardings (a restore target and the jit shardings).
  """

  mesh: Mesh
  optimizer: optax.GradientTransformation
  specs: TrainState
  abstract: TrainState

  @property
  def shardings(self) -> TrainState:
    return jax.tree.map(lambda s: s.sharding, self.abstract)


def state_layout(config: ml_collections.ConfigDict, mesh: Mesh) -> StateLayout:
  """Builds the optimizer and traces the state's shapes once (nothing is allocated)."""
  optimizer = optim.make_optimizer(config)
  shapes = jax.eval_shape(lambda: init_state(config, optimizer))
  specs = state_specs(shapes, optimizer)
  abstract = jax.tree.map(
      lambda s, spec: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, spec)),
      shapes, specs, is_leaf=lambda x: isinstance(x, P))
  return StateLayout(mesh, optimizer, specs, abstract)


def init_state(config: ml_collections.ConfigDict,
               optimizer: optax.GradientTransformation) -> TrainState:
  """A fresh state (unsharded): the paper's init from `config.seed`."""
  model = model_lib.AlexNet(config.model)
  key = jax.random.key(config.seed)
  params = model.init(jax.random.fold_in(key, 0))
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
      plateau=optim.make_plateau(config).init(None),
      rng=jax.random.key_data(jax.random.fold_in(key, 1)), data_skip=jnp.zeros((), jnp.int32))


def create_train_state(config: ml_collections.ConfigDict, layout: StateLayout) -> TrainState:
  """A fresh state initialised directly into its shardings (towers never replicated)."""
  return jax.jit(lambda: init_state(config, layout.optimizer),
                 out_shardings=layout.shardings)()


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _errors(scores: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example top-1 and top-5 errors (1.0 = wrong) from logits or probabilities."""
  k = min(5, scores.shape[-1])
  top = jax.lax.top_k(scores, k)[1]
  hit = top == labels[:, None]
  return 1.0 - hit[:, 0].astype(jnp.float32), 1.0 - hit.any(axis=-1).astype(jnp.float32)


def _global_norm(tree) -> jax.Array:
  """Norm over every tower: squares summed locally, then over `model`."""
  sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))
  return jnp.sqrt(jax.lax.psum(sq, MODEL))


def _vary(tree, axis: str):
  """Marks a replicated value as varying over `axis` (shard_map's vma typing)."""
  return jax.tree.map(lambda x: jax.lax.pcast(x, axis, to="varying"), tree)


def make_train_step(config: ml_collections.ConfigDict, layout: StateLayout,
                    schedule: optim.Schedule):
  """The jitted `train_step(state, batch, rng) -> (state, metrics)`; donates `state`.

  schedule: `optim.make_schedule(config, steps_per_epoch)`, the learning rate of a
  step given the plateau state. metrics["finite"] is 1.0 when the loss, the new
  parameters and the update are all finite (so a state can be checked before saving
  without another pass over it).
  """
  model = model_lib.AlexNet(config.model)
  optimizer, mesh = layout.optimizer, layout.mesh

  def local_step(state: TrainState, batch, rng):
    model_devices = jax.lax.axis_size(MODEL)
    local_batch = batch["label"].shape[0]
    # One dropout key per example, from its index in the global batch: the
    # masks do not depend on how the batch is split over devices.
    first = jax.lax.axis_index(DATA) * local_batch
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, first + jnp.arange(local_batch))

    images, labels = batch["image"], batch["label"]
    micro = config.microbatch_size or local_batch
    chunks = local_batch // micro

    def loss_fn(params, images, labels, keys):
      logits = model.apply(params, images, train=True, rng=keys, tower_axis=MODEL)
      loss = _cross_entropy(logits, labels).sum() / local_batch
      # Each model-axis device holds the same (gathered) logits; the all_gather
      # transposes to a reduce-scatter that sums their cotangents, so each
      # device differentiates its 1/model_devices share of the loss.
      return loss / model_devices, (loss, logits)

    # Differentiate this shard's loss w.r.t. a `data`-varying view of the
    # (replicated) parameters, so the gradient is local; then average it
    # explicitly. (Through the replicated params, autodiff would psum it.)
    local_params = _vary(state.params, DATA)
    grad_fn = jax.grad(loss_fn, has_aux=True)
    # The local batch in `chunks` sequential micro-batches (usually one), gradients
    # summed: the same gradient (each example's loss is still / local_batch), with one
    # micro-batch's activations live at a time, which keeps them in cache.
    grads, losses, logits = None, [], []
    for i in range(chunks):
      part = slice(i * micro, (i + 1) * micro)
      g, (part_loss, part_logits) = grad_fn(local_params, images[part], labels[part],
                                            keys[part])
      grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
      losses.append(part_loss)
      logits.append(part_logits)
    loss, logits = sum(losses), jnp.concatenate(logits)
    grads = jax.lax.pmean(grads, DATA)
    lr = schedule(state.step, state.plateau)
    opt_state = optim.set_learning_rate(state.opt_state, lr)
    updates, opt_state = optimizer.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    top1, top5 = _errors(logits, labels)
    metrics = {
        "loss": loss, "top1_error": top1.mean(), "top5_error": top5.mean(),
    }
    # Identical over `model` (gathered logits); mean over `data` shards.
    metrics = jax.lax.pmean(metrics, (DATA, MODEL))
    metrics.update(learning_rate=lr, grad_norm=_global_norm(grads),
                   param_norm=_global_norm(params), update_norm=_global_norm(updates))
    # With the paper's rule the update is the momentum buffer: finite norms of the
    # parameters and of the update mean a finite state to save.
    metrics["finite"] = jnp.isfinite(
        metrics["loss"] + metrics["param_norm"] + metrics["update_norm"]).astype(jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  specs = layout.specs
  sharded = jax.shard_map(local_step, mesh=mesh, in_specs=(specs, P(DATA), P()),
                          out_specs=(specs, P()))

  def train_step(state: TrainState, batch, rng: jax.Array):
    """rng: the typed key for this step (e.g. fold_in(base key, step))."""
    return sharded(state, batch, rng)

  shardings = layout.shardings
  return jax.jit(train_step, donate_argnums=0,
                 in_shardings=(shardings, NamedSharding(mesh, P(DATA)), None),
                 out_shardings=(shardings, NamedSharding(mesh, P())))


def data_position(state: TrainState) -> int:
  """Where the state's data stream continues: global batches consumed, skipped included."""
  return int(jax.device_get(state.step)) + int(jax.device_get(state.data_skip))


def step_rng(state: TrainState) -> jax.Array:
  """The dropout key of the state's next step: a function of (seed, step) only."""
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def make_eval_step(config: ml_collections.ConfigDict, layout: StateLayout):
  """The jitted `eval_step(state, batch) -> sums` over the real (unmasked) examples.

  Ten-crop batches ([B, 10, S, S, 3]) are scored by the mean of the crops'
  softmaxes, as in the paper. Sums: loss, top1_errors, top5_errors, count.
  """
  model = model_lib.AlexNet(config.model)

  def local_eval(params, batch):
    images, labels = batch["image"], batch["label"]
    mask = batch["mask"].astype(jnp.float32)
    if images.ndim == 5:
      b, crops = images.shape[:2]
      logits = model.apply(params, images.reshape(b * crops, *images.shape[2:]),
                           train=False, tower_axis=MODEL)
      probs = jax.nn.softmax(logits).reshape(b, crops, -1).mean(axis=1)
    else:
      probs = jax.nn.softmax(model.apply(params, images, train=False, tower_axis=MODEL))
    label_prob = jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
    loss = -jnp.log(jnp.maximum(label_prob, jnp.finfo(jnp.float32).tiny))
    top1, top5 = _errors(probs, labels)
    sums = {"loss": loss * mask, "top1_errors": top1 * mask, "top5_errors": top5 * mask,
            "count": mask}
    sums = jax.tree.map(jnp.sum, sums)
    return jax.tree.map(lambda x: jax.lax.pmean(jax.lax.psum(x, DATA), MODEL), sums)

  sharded = jax.shard_map(local_eval, mesh=layout.mesh, in_specs=(layout.specs.params, P(DATA)),
                          out_specs=P())

  @jax.jit
  def eval_step(state: TrainState, batch):
    return sharded(state.params, batch)

  return eval_step


def make_predict_step(config: ml_collections.ConfigDict, layout: StateLayout):
  """The jitted `predict_step(params, images) -> (probabilities, fc7 features)`.

  images [B, S, S, 3] sharded over `data`; probabilities [B, classes]; features
  [B, fc7 width]: the last hidden layer after its activation (no dropout),
  gathered from every tower (the paper's Figure 4 feature space).
  """
  model = model_lib.AlexNet(config.model)
  act = model_lib.ACTIVATIONS[config.model.activation]

  def local_predict(params, images):
    logits, captured = model.apply(params, images, train=False, tower_axis=MODEL, capture=True)
    fc7 = jnp.concatenate(list(captured["fc7"]), axis=-1)  # this device's towers
    fc7 = jax.lax.all_gather(fc7, MODEL, axis=1, tiled=True)
    return jax.nn.softmax(logits), act(fc7)

  return jax.jit(jax.shard_map(local_predict, mesh=layout.mesh,
                               in_specs=(layout.specs.params, P(DATA)),
                               out_specs=(P(DATA), P(DATA)), check_vma=False))
