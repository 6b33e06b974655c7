"""The exact replay's checks of where it lands: on each checkpoint after a segment, and on the module's weights.

Parameters are compared by their relative deviation ``||theta_a - theta_b|| / ||theta_b||`` over all of them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ConfigError, UnsupportedError

Params = dict[str, torch.Tensor]

#: Relative deviation ``||theta_replayed - theta_checkpoint|| / ||theta_checkpoint||`` above which replay is refused.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4}
#: The same under bf16 autocast (8-bit mantissa): the replay's batches round otherwise than training's micro-batches.
AUTOCAST_TOLERANCE = 1e-2


def deviation_of(replayed: Params, expected: Params) -> float:
    """``||replayed - expected|| / ||expected||`` over all parameters."""
    diff = sum(float((replayed[n].double() - e.double()).square().sum()) for n, e in expected.items())
    norm = sum(float(e.double().square().sum()) for e in expected.values())
    return (diff / max(norm, 1e-300)) ** 0.5


def verify_landing(replayed: Params, expected: Params, step: int, autocast: bool) -> None:
    """Refuse a replay that does not land on the checkpoint of ``step``.

    Raises:
        UnsupportedError: with the measured deviation and the likely causes."""
    tolerance = AUTOCAST_TOLERANCE if autocast else TOLERANCE.get(next(iter(expected.values())).dtype, 1e-4)
    deviation = deviation_of(replayed, expected)
    if math.isnan(deviation):
        raise UnsupportedError(
            f"replaying the recorded steps gives NaN parameters before step {step}: a replayed loss or gradient is "
            "not finite (a train_loss_fn or training_step that returns NaN or inf on a one-sample batch). Pass a "
            "train_loss_fn(module, batch) -> Tensor[B] of finite per-sample training losses; influence() still works.")
    if not deviation <= tolerance:
        raise UnsupportedError(
            f"replaying the recorded steps does not reproduce the parameters checkpointed before step {step} "
            f"(relative deviation {deviation:.1e} > {tolerance:.0e}): training was not a deterministic function of "
            "the recorded batches and optimizer (randomness in training_step such as functional dropout, or in "
            "items or a collate_fn that the check of a few items missed, a loss whose value or gradient depends on "
            "batch_idx, which the replay passes as 0, or on current_epoch or global_step, which it leaves at their "
            "final values, the optimizer's state cleared or its momentum switched off and on during fit, which "
            "influence() models, a dataset or collate_fn other than training's (after load, batches rebuilt without "
            "the on_*_batch_transfer hooks: pass a collate_fn= that applies them), sample ids that are not dataset "
            "positions without sample_ids= to map them, or that two items of the dataset share (a ConcatDataset of "
            "parts numbered from 0 each), or a train_loss_fn that is not training's loss, a loss_reduction other "
            "than the loss's own (a cross_entropy with ignore_index or class weights left at 'mean': declare "
            "loss_reduction=callable; influence() refuses it only where its check sees it), weights averaged in at "
            "train end by a callback listed before DataValueEmbedding, activation checkpointing with "
            "use_reentrant=True (use use_reentrant=False), a resume that warned of other weights, float32 tensor "
            "hyperparameters on float64 weights (pass floats), or a sample's loss that depends on the other samples "
            "of its batch, which the replay forms one sample at a time (padding to the batch's longest sequence "
            "that the model pools over: pass train_loss_fn(module, batch) -> Tensor[B] of the per-sample losses "
            "of the whole batch)). Exact replay is refused.")


def check_final(module: nn.Module, final: Params) -> None:
    """Refuse a module whose parameters are not the recorded final ones (the target is ``L(theta_T)``)."""
    own = dict(module.named_parameters())
    missing = [n for n in final if n not in own]
    if missing:
        raise ConfigError(f"{type(module).__name__} has no parameters {missing[:5]}: pass the module that was trained.")
    deviation = deviation_of({n: own[n].detach() for n in final}, final)
    if deviation > TOLERANCE.get(next(iter(final.values())).dtype, 1e-4):
        raise ConfigError(f"the module's parameters differ from those recorded at the end of training (relative "
                          f"deviation {deviation:.1e}): exact replay scores the final model of the recorded run. Pass "
                          "the trained module as it was after its last optimizer step, in its training dtype (weight "
                          "averaging such as StochasticWeightAveraging or EMA replaces the weights after it).")
