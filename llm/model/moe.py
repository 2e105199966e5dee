"""Mixture of experts: a block's MLP replaced by E routed experts (Mixtral, Qwen-MoE,
DeepSeek-V3), with always-on shared experts beside them as an option.

A router scores each token against the experts; the token goes to its top k, and their outputs
are added, weighted by the router. Shapes in the names as in layers.py, plus T tokens (B x L),
E experts, K experts per token, R = T x K routed copies, F the experts' width.

Dropless by default: the copies are sorted by expert and the experts run as grouped matrix
products (`jax.lax.ragged_dot`: native on TPU; XLA pads it into a dense product over all experts
on GPU and CPU), so no copy is dropped and no one-hot dispatch tensor exists.
`capacity_factor` > 0 keeps at most ceil(factor x R / E) copies per expert instead (the first
ones in token order) and runs the experts as one batched einsum over [E, capacity, D] blocks,
dense on every backend; the other copies are dropped (they pass through the residual only) and
counted.

Expert parallelism: the `expert` logical axis (mesh.expert) splits the experts over devices.
Inside `shard_map` each device routes its own tokens, sends each copy to the device that holds
its expert (`all_to_all`), runs its experts on what it received, and sends the results back.
The exchange uses buffers of a fixed size per destination: dropless, R rows each (any device may
receive all of a peer's copies); with a capacity factor, exactly the capacity. With one expert
shard the same code runs with no exchange. The experts' width may be split over `tensor`.

Each MoE layer sows its router statistics into the `moe` collection (see `recorded` and
`collected`): the train step adds their losses to the objective, logs the experts' load and
moves the auxiliary-loss-free router bias (`update_router_bias`).
"""

import contextlib
import contextvars
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

COLLECTION = "moe"  # the variable collection the layers' router statistics are sown into

ROUTERS = {
    "softmax": "softmax over all experts' logits, then the top k (Mixtral, Qwen-MoE, OLMoE)",
    "sigmoid": "a sigmoid score per expert, the top k of score + router bias (DeepSeek-V3)",
}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """model.moe: which blocks route their MLP to experts, and how (config.py documents each)."""
  num_experts: int = 0  # 0: every block has a dense MLP
  experts_per_token: int = 2
  expert_d_ff: int = 0  # 0: model.d_ff
  num_shared_experts: int = 0
  every: int = 1  # block i is MoE when (i + 1) % every == 0 ...
  first_dense: int = 0  # ... and i >= first_dense
  router: str = "softmax"
  renormalize: bool = True  # the top k weights divided by their sum
  routed_scale: float = 1.0
  bias_update_rate: float = 0.0  # > 0: auxiliary-loss-free balancing (a router bias)
  balance_loss: float = 0.01
  z_loss: float = 0.001
  capacity_factor: float = 0.0  # 0: dropless

  def is_moe(self, layer: int) -> bool:
    return self.num_experts > 0 and layer >= self.first_dense and (layer + 1) % self.every == 0

  def num_moe_layers(self, num_layers: int) -> int:
    return sum(self.is_moe(i) for i in range(num_layers))


def inactive_params(cfg) -> int:
  """Parameters a token does not use: the experts it is not routed to, in every MoE block (for
  the active count that MFU is computed from)."""
  moe = cfg.moe
  if not moe.num_experts:
    return 0
  F = moe.expert_d_ff or cfg.d_ff
  per_expert = (3 if cfg.mlp == "gated" else 2) * cfg.d_model * F + (
      F + cfg.d_model if cfg.use_bias else 0)
  return (moe.num_experts - moe.experts_per_token) * per_expert * moe.num_moe_layers(
      cfg.num_layers)


class _Weights(nn.Module):
  """A kernel (and bias) that the MoE layer computes with outside of a Dense."""
  shape: tuple
  axes: tuple
  use_bias: bool = False
  bias_axes: tuple = ()
  std: float = 0.02

  @nn.compact
  def __call__(self):
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=self.std), self.axes), self.shape, jnp.float32)
    bias = None
    if self.use_bias:
      bias_shape = tuple(self.shape[self.axes.index(a)] for a in self.bias_axes)
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes),
                        bias_shape, jnp.float32)
    return kernel, bias


class MoE(nn.Module):
  """Routed experts in place of a block's MLP (the block adds the shared experts); returns
  x_BxLxD."""
  cfg: Any  # layers.TransformerConfig
  activation: Any  # the experts' activation function
  out_std: float = 0.02

  @nn.compact
  def __call__(self, x_BxLxD, deterministic: bool):
    cfg, moe = self.cfg, self.cfg.moe
    D, E, F = cfg.d_model, moe.num_experts, moe.expert_d_ff or cfg.d_ff
    gated = cfg.mlp == "gated"
    router_kernel, router_bias = _Weights(
        (D, E), ("embed", None), use_bias=moe.bias_update_rate > 0, bias_axes=(None,),
        name="router")()
    experts = {}
    for proj in (("wg", "wi") if gated else ("wi",)):
      experts[proj] = _Weights((E, D, F), ("expert", "embed", "mlp"), cfg.use_bias,
                               ("expert", "mlp"), name=f"experts_{proj}")()
    experts["wo"] = _Weights((E, F, D), ("expert", "mlp", "embed"), cfg.use_bias,
                             ("expert", "embed"), std=self.out_std, name="experts_wo")()

    forward = lambda x, w, ep, axes: experts_forward(x, w, cfg, self.activation, ep, axes)
    weights = {"router": router_kernel, "router_bias": router_bias, **experts}
    if self.is_initializing():  # parameters only: no mesh is needed for their shapes
      out_BxLxD, stats = forward(x_BxLxD, weights, 1, _Axes())
    else:
      out_BxLxD, stats = _on_mesh(forward, x_BxLxD, weights, E)
    self.sow(COLLECTION, "stats", stats, reduce_fn=lambda _, new: new)
    return nn.Dropout(cfg.dropout)(out_BxLxD, deterministic=deterministic)


@dataclasses.dataclass(frozen=True)
class _Axes:
  """The mesh axes one device's share is cut along inside shard_map (empty: not cut)."""
  tokens: tuple = ()
  expert: tuple = ()
  tensor: tuple = ()


def _mesh_axes(logical: str, size: int, mesh) -> tuple:
  """The mesh axes the rules map a logical axis of this size to; () when they do not divide it."""
  spec = nn.logical_to_mesh_axes((logical,))[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  axes = tuple(a for a in axes if a in mesh.shape)
  return axes if size % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def _on_mesh(forward, x_BxLxD, weights, num_experts: int):
  """`forward` per device under shard_map when a mesh of several devices is active; else as
  it is. Tokens stay split as the batch is; experts over `expert`, their width over `tensor`
  (mesh.rules)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return forward(x_BxLxD, weights, 1, _Axes())
  F = weights["wo"][0].shape[1]
  tokens = _mesh_axes("batch", x_BxLxD.shape[0], mesh)
  expert = _mesh_axes("expert", num_experts, mesh)
  if not set(expert) <= set(tokens):
    # The tokens are not split over the expert axis (a batch too small to split, when
    # decoding): every device runs them all through all the experts, gathered.
    expert = ()
  axes = _Axes(tokens=tokens, expert=expert, tensor=_mesh_axes("mlp", F, mesh))
  ep = math.prod(mesh.shape[a] for a in axes.expert)
  e, t = axes.expert or None, axes.tensor or None
  specs = {"router": P(), "router_bias": P(), "wg": (P(e, None, t), P(e, t)),
           "wi": (P(e, None, t), P(e, t)), "wo": (P(e, t, None), P(e, None))}
  # The same tree as the weights' (no spec where a bias is None).
  spec = lambda w, s: None if w is None else s
  weight_specs = {k: tuple(map(spec, w, specs[k])) if isinstance(w, tuple) else spec(w, specs[k])
                  for k, w in weights.items()}
  x_spec = P(axes.tokens or None, None, None)
  run = jax.shard_map(lambda x, w: forward(x, w, ep, axes), mesh=mesh,
                      in_specs=(x_spec, weight_specs), out_specs=(x_spec, P()))
  return run(x_BxLxD, weights)


def route(logits_TxE, bias_E, moe: MoEConfig):
  """(weights_TxK, experts_TxK, probs_TxE): each token's K experts (ties: the lower index) and
  their weights; `probs_TxE`, each token's scores as a distribution, is what the balance loss
  reads. softmax: weights are the chosen experts' probabilities (renormalised: Mixtral's softmax
  over the top-k logits). sigmoid: experts are chosen by score + bias, weighted by score (the
  bias balances load and has no gradient)."""
  if moe.router == "softmax":
    scores_TxE = jax.nn.softmax(logits_TxE, axis=-1)
    probs_TxE = scores_TxE
  else:
    scores_TxE = jax.nn.sigmoid(logits_TxE)
    probs_TxE = scores_TxE / jnp.sum(scores_TxE, -1, keepdims=True)
  choice_TxE = scores_TxE if bias_E is None else scores_TxE + jax.lax.stop_gradient(bias_E)
  _, experts_TxK = jax.lax.top_k(choice_TxE, moe.experts_per_token)
  weights_TxK = jnp.take_along_axis(scores_TxE, experts_TxK, axis=-1)
  if moe.renormalize:
    weights_TxK = weights_TxK / jnp.sum(weights_TxK, -1, keepdims=True)
  return weights_TxK * moe.routed_scale, experts_TxK, probs_TxE


def experts_forward(x_BxLxD, weights: dict, cfg, activation, ep: int = 1, axes: _Axes = _Axes()):
  """One device's MoE layer: route its tokens, run their experts (on this device, or on the
  `ep` devices of `axes.expert` that hold them), combine. Returns (out_BxLxD, statistics of
  all devices' tokens: see `_statistics`)."""
  moe = cfg.moe
  B, L, D = x_BxLxD.shape
  E, K = moe.num_experts, moe.experts_per_token
  E_local, T = E // ep, B * L
  R = T * K
  x_TxD = x_BxLxD.reshape(T, D)
  logits_TxE = jnp.dot(x_TxD.astype(jnp.float32), weights["router"])
  weights_TxK, experts_TxK, probs_TxE = route(logits_TxE, weights["router_bias"], moe)

  # The routed copies sorted by expert; each one's rank among its expert's copies.
  expert_R = experts_TxK.reshape(R)
  order_R = jnp.argsort(expert_R, stable=True)
  expert_sorted_R = expert_R[order_R]
  count_E = jnp.bincount(expert_R, length=E)
  rank_R = jnp.arange(R) - (jnp.cumsum(count_E) - count_E)[expert_sorted_R]
  # Each copy's row in the send buffer: one chunk per destination device.
  if moe.capacity_factor:
    capacity = math.ceil(moe.capacity_factor * R / E)
    kept_R = rank_R < capacity
    chunk = E_local * capacity
    slot_R = (expert_sorted_R % E_local) * capacity + rank_R
  else:
    kept_R = jnp.ones((R,), bool)
    chunk = R  # a destination may get every copy
    dest_count = jnp.sum(count_E.reshape(ep, E_local), axis=1)
    slot_R = jnp.arange(R) - (jnp.cumsum(dest_count) - dest_count)[expert_sorted_R // E_local]
  rows = ep * chunk  # of the send buffer; index `rows` marks a dropped copy
  row_R = jnp.where(kept_R, expert_sorted_R // E_local * chunk + slot_R, rows)
  # The moves of D-wide rows are each one gather, their indices composed on integers first:
  # which token fills each buffer row (T: none), and which buffer row each copy's result is in.
  token_of_row = jnp.full((rows,), T, jnp.int32).at[row_R].set(order_R // K, mode="drop")
  row_of_copy_R = jnp.zeros((R,), jnp.int32).at[order_R].set(row_R)
  x_pad_TxD = jnp.concatenate([x_TxD, jnp.zeros((1, D), x_TxD.dtype)])  # row T: zeros
  exchange = lambda a: jax.lax.all_to_all(a, axes.expert, 0, 0, tiled=True) if ep > 1 else a
  if moe.capacity_factor:
    # Each expert's rows fill a block of `capacity`: the experts run as one batched product.
    x_rows = exchange(jnp.take(x_pad_TxD, token_of_row, axis=0))
    y_rows = _batched_experts(x_rows, weights, ep, E_local, capacity, cfg.dtype, activation,
                              axes.tensor)
    y_RxD = jnp.take(exchange(y_rows), row_of_copy_R, axis=0, mode="fill", fill_value=0)
  else:
    expert_of_row = jnp.full((rows,), E_local, jnp.int32).at[row_R].set(
        expert_sorted_R % E_local, mode="drop")  # the local expert; E_local marks an empty row
    x_rows = exchange(jnp.take(x_pad_TxD, token_of_row, axis=0)) if ep > 1 else None
    expert_of_row = exchange(expert_of_row)
    # This device's experts over the rows it holds, grouped by expert (empty rows last).
    by_expert = jnp.argsort(expert_of_row, stable=True)
    grouped_x = (jnp.take(x_rows, by_expert, axis=0) if ep > 1  # one gather when ep == 1
                 else jnp.take(x_pad_TxD, token_of_row[by_expert], axis=0))
    y_grouped = _grouped_experts(grouped_x, expert_of_row[by_expert], weights, E_local,
                                 cfg.dtype, activation, axes.tensor)
    ungroup = jnp.argsort(by_expert)  # buffer row -> its place in y_grouped
    if ep > 1:
      back = exchange(jnp.take(y_grouped, ungroup, axis=0))
      y_RxD = jnp.take(back, row_of_copy_R, axis=0, mode="fill", fill_value=0)
    else:
      place_R = jnp.where(row_of_copy_R < rows,
                          ungroup[jnp.minimum(row_of_copy_R, rows - 1)], rows)
      y_RxD = jnp.take(y_grouped, place_R, axis=0, mode="fill", fill_value=0)

  # Each token's copies (dropped ones: zero), weighted and added.
  out_TxD = jnp.sum(y_RxD.reshape(T, K, D) * weights_TxK[..., None].astype(y_RxD.dtype), axis=1)
  stats = _statistics(logits_TxE, probs_TxE, count_E, R - jnp.sum(kept_R), moe, axes.tokens)
  return out_TxD.reshape(B, L, D).astype(cfg.dtype), stats


def _grouped_experts(x_rows, expert_of_rows, weights, E_local: int, dtype, activation,
                     tensor_axes):
  """Dropless: rows sorted by expert (empty rows, marked E_local, last) through their experts
  as grouped products, `jax.lax.ragged_dot` (native on TPU; XLA on GPU and CPU pads it to a
  dense product over all experts, see docs/models.md)."""
  group_sizes = jnp.bincount(expert_of_rows, length=E_local)
  expert = jnp.minimum(expert_of_rows, E_local - 1)

  def grouped(rows, name, bias=True):
    kernel, b = weights[name]
    out = jax.lax.ragged_dot(rows.astype(dtype), kernel.astype(dtype), group_sizes)
    return out if b is None or not bias else out + b[expert].astype(dtype)

  h = activation(grouped(x_rows, "wg" if "wg" in weights else "wi"))
  if "wg" in weights:
    h = h * grouped(x_rows, "wi")
  y = grouped(h, "wo", bias=False)  # rows past the groups come out zero
  if tensor_axes:  # each device computed its share of the width: add the shares
    y = jax.lax.psum(y, tensor_axes)
  if weights["wo"][1] is not None:
    filled = (expert_of_rows < E_local)[:, None]
    y = y + jnp.where(filled, weights["wo"][1][expert].astype(dtype), 0)
  return y


def _batched_experts(x_rows, weights, ep: int, E_local: int, capacity: int, dtype, activation,
                     tensor_axes):
  """With a capacity: rows [ep sources x E_local experts x capacity, D], each expert's block
  through it as one batched product (a dense einsum on every backend); same layout out."""
  D = x_rows.shape[-1]
  x_ExCxD = x_rows.reshape(ep, E_local, capacity, D).swapaxes(0, 1).reshape(
      E_local, ep * capacity, D).astype(dtype)

  def batched(x, name, bias=True):
    kernel, b = weights[name]
    out = jnp.einsum("ecd,edf->ecf", x, kernel.astype(dtype))
    return out if b is None or not bias else out + b[:, None, :].astype(dtype)

  h = activation(batched(x_ExCxD, "wg" if "wg" in weights else "wi"))
  if "wg" in weights:
    h = h * batched(x_ExCxD, "wi")
  y = batched(h, "wo", bias=False)
  if tensor_axes:
    y = jax.lax.psum(y, tensor_axes)
  if weights["wo"][1] is not None:
    y = y + weights["wo"][1][:, None, :].astype(dtype)
  return y.reshape(E_local, ep, capacity, D).swapaxes(0, 1).reshape(-1, D)


def _statistics(logits_TxE, probs_TxE, count_E, dropped, moe: MoEConfig, token_axes) -> dict:
  """The router's statistics over every device's tokens (summed over `token_axes`):

  - count: copies routed to each expert [E]; dropped: copies over capacity; tokens: T.
  - balance_loss: E x sum_e f_e P_e, f_e the share of copies routed to e and P_e the mean
    router probability of e (Switch Transformer; transformers' Mixtral loss is K times it);
    1 when balanced. Its gradient flows through P.
  - z_loss: the mean of logsumexp(logits)^2 (ST-MoE), which keeps the router's logits small.
  - aux_loss: what is added to the objective, balance_loss x moe.balance_loss + z_loss x
    moe.z_loss.
  """
  total = lambda a: jax.lax.psum(a, token_axes) if token_axes else a
  T = total(jnp.float32(logits_TxE.shape[0]))
  count_E = total(count_E.astype(jnp.float32))
  prob_E = total(jnp.sum(probs_TxE, axis=0)) / T
  z_loss = total(jnp.sum(jnp.square(jax.nn.logsumexp(logits_TxE, axis=-1)))) / T
  balance = moe.num_experts * jnp.sum(count_E / jnp.sum(count_E) * prob_E)
  return {"count": count_E, "dropped": total(dropped.astype(jnp.float32)), "tokens": T,
          "balance_loss": balance, "z_loss": z_loss,
          "aux_loss": moe.balance_loss * balance + moe.z_loss * z_loss}


# ---------------------------------------------------------------------------------------------
# The statistics, for the train step


_RECORDS = contextvars.ContextVar("moe_records", default=None)


@contextlib.contextmanager
def recorded():
  """Inside it, each `apply` of a model that records (see `records`) also returns its MoE
  layers' statistics into the yielded list (one `moe` collection per apply)."""
  records = []
  token = _RECORDS.set(records)
  try:
    yield records
  finally:
    _RECORDS.reset(token)


def records(cls):
  """Class decorator for a model: its `apply`, inside `recorded()` and not asked for mutable
  collections of its own, makes the `moe` collection mutable and records it, so that any
  objective's loss yields the router statistics of the applies it made, unchanged."""
  plain = cls.apply

  def apply(self, variables, *args, **kwargs):
    records = _RECORDS.get()
    if records is None or "mutable" in kwargs:
      return plain(self, variables, *args, **kwargs)
    out, state = plain(self, variables, *args, mutable=[COLLECTION], **kwargs)
    records.append(state.get(COLLECTION, {}))
    return out

  apply.__doc__ = plain.__doc__
  cls.apply = apply  # set after the class is made, so linen does not wrap it as a module method
  return cls


def collected(records: list):
  """The statistics of several applies (one tree each, the same model), added together: one
  tree whose leaves are `_statistics`' dicts, at the MoE modules' paths; None without MoE."""
  trees = [r for r in records if jax.tree.leaves(r)]
  if not trees:
    return None
  return jax.tree.map(lambda *xs: sum(xs), *trees)


def _layers(stats) -> list[tuple[tuple, dict]]:
  """(module path, statistics) of each MoE module in a `collected` tree, in layer order (a
  scanned stack's statistics have a leading layers axis)."""
  found = []

  def walk(node, path):
    if "stats" in node and isinstance(node["stats"], dict) and "count" in node["stats"]:
      found.append((path, node["stats"]))
      return
    for key in sorted(node, key=lambda k: (len(k), k)):  # block_2 before block_10
      walk(node[key], path + (key,))

  walk(stats, ())
  return found


def aux_loss(stats):
  """The MoE layers' losses added to the objective (summed over layers)."""
  return sum(jnp.sum(s["aux_loss"]) for _, s in _layers(stats))


def metrics(stats, num_applies: int = 1) -> dict:
  """What metrics.jsonl logs: the balance and z losses (mean over layers), the share of copies
  dropped, and `expert_load`, per MoE layer the share of copies each expert got (1/E each when
  balanced), with `load_max` its largest share times E averaged over layers (1: balanced)."""
  layers = _layers(jax.device_get(stats))
  per_layer = lambda key: [v for _, s in layers for v in np.atleast_1d(s[key]).tolist()]
  counts = [row for _, s in layers for row in np.atleast_2d(s["count"]).tolist()]
  load = [[c / max(sum(row), 1.0) for c in row] for row in counts]
  mean = lambda xs: sum(xs) / max(len(xs), 1)
  copies = sum(sum(row) for row in counts)
  return {"balance_loss": mean(per_layer("balance_loss")) / num_applies,
          "router_z_loss": mean(per_layer("z_loss")) / num_applies,
          "dropped_fraction": sum(per_layer("dropped")) / max(copies, 1.0),
          "load_max": mean([max(row) * len(row) for row in load]),
          "expert_load": [[round(x, 4) for x in row] for row in load]}


def update_router_bias(params, stats, rate: float):
  """Auxiliary-loss-free balancing (DeepSeek-V3): each router bias moves by `rate` towards
  balance, up for an expert that got fewer copies than the mean, down for one that got more.
  `params` hold the biases at the MoE modules' paths of `stats`; other leaves are unchanged."""
  updates = {path: s["count"] for path, s in _layers(stats)}

  def walk(node, path):
    if not isinstance(node, dict):
      return node
    if path in updates and "router" in node and "bias" in node["router"]:
      count = updates[path]
      step = rate * jnp.sign(jnp.mean(count, axis=-1, keepdims=True) - count)
      bias = node["router"]["bias"]
      return {**node, "router": {**node["router"], "bias": (bias + step).astype(bias.dtype)}}
    return {key: walk(value, path + (key,)) for key, value in node.items()}

  return walk(params, ())
