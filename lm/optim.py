"""Optimizers and learning-rate schedules from `cfg.optim` (optax)."""

from __future__ import annotations

import jax
import ml_collections
import optax

from lm.trees import decay_mask


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """constant; rsqrt (Transformer: linear warmup, then peak * sqrt(warmup / step));
  cosine and linear (warmup, then decay to end_fraction * peak at total_steps)."""
  peak, warmup = cfg.learning_rate, cfg.warmup_steps
  if cfg.schedule == "constant":
    return optax.constant_schedule(peak)
  if cfg.schedule == "rsqrt":
    warm = max(warmup, 1)
    return lambda step: (
      peak
      * jax.numpy.minimum(
        (step + 1) / warm, jax.numpy.sqrt(warm / jax.numpy.maximum(step + 1, warm))
      )
    )
  end = peak * cfg.end_fraction
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_fraction)
  else:
    decay = optax.linear_schedule(peak, end, decay_steps)
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  lr = schedule(cfg, total_steps)
  if cfg.name == "adamw":
    opt = optax.adamw(lr, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
  elif cfg.name == "adam":
    opt = optax.adam(lr, cfg.b1, cfg.b2, cfg.eps)
  elif cfg.name == "sgd":
    opt = optax.sgd(lr)
  elif cfg.name == "momentum":
    opt = optax.sgd(lr, momentum=cfg.momentum)
  else:
    opt = optax.adafactor(
      lr, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=decay_mask
    )
  if cfg.clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
  return opt


def outer_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Local SGD's outer step on the replicas' mean parameter delta (anchor - mean): "average"
  is SGD with lr 1 (the new anchor is the mean), "nesterov" is DiLoCo's outer optimizer."""
  if train_cfg.outer_optimizer == "average":
    return optax.sgd(1.0)
  return optax.sgd(train_cfg.outer_lr, momentum=train_cfg.outer_momentum, nesterov=True)
