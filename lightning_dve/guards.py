"""Checks that the update the optimizer applies is the one the hooks recorded (method.md §2: ``theta_{t+1} =
theta_t - lr_t sum_z w_z g_z``, with the step's terms read in ``on_before_optimizer_step``).

Ways a run would break silently, each refused with what to change:

- a weight that also gets gradient outside its module's own calls (tied or functionally used, or a penalty
  on it in the loss): the sum of the captured per-sample blocks is not its ``.grad`` (on the first backward
  that reaches it of a step that is applied, and again after 1, 2, 4, 8, ... applied steps, as a penalty's
  gradient grows with the weights' distance from where it is zero; under DDP against the ranks' mean);
- gradients changed after the backward by something the callback does not model (clipping in
  ``configure_gradient_clipping``, the LightningModule's ``on_after_backward`` / ``on_before_optimizer_step``,
  a callback after this one): the gradients the optimizer applied are compared with those of the backward on a
  fixed sample of coordinates per tracked weight and trained bias, and must be the same up to the modelled
  factor ``clip / loss scale`` (not checked for optimizers that are the plain-SGD proxy, value clipping, or
  Nesterov SGD, whose foreach step adds the momentum into ``.grad``);
- weights changed outside the optimizer between its steps (a constraint such as ``clamp_`` or a max-norm
  renormalisation in a hook): the same coordinates of the weights and biases right before each update (after
  every hook of the step) must be those the last ``optimizer.step()`` left (an edit of coordinates not sampled is
  not seen);
- parameters frozen or unfrozen during ``fit``: the tracked layers and their bias columns are fixed when it
  starts, so a change would drop updates or leave a layer untracked;
- param-group hyperparameters (the learning rate, momentum, ...) changed after the callback read them in
  ``on_before_optimizer_step``: :class:`lightning_dve.hyperparameters.HyperparameterWatch` (:attr:`StepGuard.settings`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .capture import GradientCapture, TrackedLayer
from .errors import UnsupportedError
from .hyperparameters import HyperparameterWatch
from .layers import gradient_block, has_trainable_bias

#: Coordinates sampled per tracked weight (and trained bias) to compare the applied gradient with the backward's.
SAMPLED = 64
#: Relative tolerance of the applied gradient against ``factor * backward gradient`` (float32 rounding: ~1e-7).
TOLERANCE = 1e-4


def sampled_coordinates(numel: int, device: torch.device | None = None) -> torch.Tensor:
    """``SAMPLED`` evenly spaced flat coordinates of a weight with ``numel`` entries (repeated below ``SAMPLED``),
    computed in integers: a float grid rounds past the end of a weight above 2**24 entries."""
    return torch.arange(SAMPLED, device=device) * (numel - 1) // (SAMPLED - 1)


def sampled_entries(tensor: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """``tensor``'s entries at its :func:`sampled_coordinates` (``index``: those, precomputed on the step's path)."""
    return torch.take(tensor.detach(), sampled_coordinates(tensor.numel(), tensor.device) if index is None else index)


def stacked_float64(rows: list[torch.Tensor]) -> torch.Tensor:
    """Sampled rows stacked as ``[len(rows), SAMPLED]`` float64 (one conversion when they share a dtype)."""
    if len({row.dtype for row in rows}) > 1:  # layers in other dtypes
        rows = [row.double() for row in rows]
    return torch.stack(rows).double() if rows else torch.empty(0, SAMPLED, dtype=torch.float64)


def stepped_tensors(capture: GradientCapture) -> dict[str, nn.Parameter]:
    """What a step updates in the tracked layers: each one's weight (under the layer's name) and its trained bias
    (``{layer}.bias``), in layer order."""
    out = {}
    for name, layer in capture.layers.items():
        out[name] = layer.module.weight
        if has_trainable_bias(layer.module):
            out[f"{name}.bias"] = layer.module.bias
    return out


def check_blocks_sum_to_grad(capture: GradientCapture, tolerance: float = 1e-2, only: set[str] | None = None,
                             mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
                             again: frozenset[str] = frozenset()) -> set[str]:
    """Refuse a tracked layer whose ``.grad`` is not the sum of its captured blocks (projected alike).

    The hooks see only what flows through the module's own calls; a weight that is tied to another module's or
    also used functionally (``F.linear(x, emb.weight)``, GPT-style tied heads) gets gradient the hooks cannot
    attribute to samples. Valid right after the first backward of a step, before clipping and before a grad
    scaler's unscaling (the hooks saw the same scaled loss). Under DDP (``mean_over_ranks``, a collective every
    rank calls alike, with the same ``only``) ``.grad`` is the ranks' mean after a synchronised backward and this
    rank's own on a micro-batch of gradient accumulation: either passes. A layer in ``again`` (checked on an
    earlier step: the check now looks for a penalty whose gradient has grown) is refused only where the mismatch
    also exceeds ``tolerance`` of the blocks' mass ``sum_z |block_z|``: near convergence the batch's gradient is
    far smaller than its samples', and their rounding alone would exceed ``tolerance`` of it.

    Returns:
        The layers checked (of ``only``, default all): those the backward reached (DDP: on some rank, the same
        layers on every rank).

    Raises:
        UnsupportedError: naming the layer, with the relative mismatch.
    """
    names = [name for name in capture.layers if only is None or name in only]
    sums = capture.block_sums(names)
    means = {} if mean_over_ranks is None else _ranks_means(capture, names, sums, mean_over_ranks)
    checked = {name for name in names if sums[name] is not None} if mean_over_ranks is None else set(means)
    for name in (name for name in names if name in checked):
        layer = capture.layers[name]
        full = gradient_block(layer.module)
        if full is None:  # DDP, accumulating: another rank's backward reached it, not this one's
            continue
        error, scale = min(_mismatch(layer, full, s) for s in (sums[name], means.get(name)) if s is not None)
        slack = tolerance * capture.block_mass(name) if name in again and name in capture.reached() else 0.0
        if error > tolerance * scale + slack:
            error /= max(scale, 1e-30)
            shared = tuple(other for other, tied in capture.layers.items() if tied.module.weight is layer.module.weight)
            raise UnsupportedError(
                f"layer {name!r}: its weight's gradient differs from the sum of the captured per-sample "
                f"gradients by {error:.0%}: the weight also receives gradient outside the module's own calls "
                "(tied or shared with another module, or used functionally, e.g. a language-model head "
                "tied to the embedding), or the module's forward uses a function of it (a subclass overriding "
                "forward, e.g. a masked or weight-standardised convolution), or the loss adds a penalty on it "
                "(L2, or L2-SP's distance to the starting weights), or a hook on the weight's gradient "
                "(weight.register_hook, e.g. a mask that trains some rows only: mask the layer's output instead), "
                "or a callback listed before DataValueEmbedding changed .grad in its on_after_backward (a "
                "zero_grad: list DataValueEmbedding first)"
                f"{_shared_by(shared)}. Untie it, or pass exclude={shared!r}; an L2 penalty belongs in the optimizer's "
                "weight_decay, which the callback models."
            )
    return checked


def _mismatch(layer: TrackedLayer, grad: torch.Tensor, block_sum: torch.Tensor) -> tuple[float, float]:
    """``(|summed blocks - gradient|, |gradient|)`` of a layer, its gradient ``[d_out, d_in]`` projected alike."""
    p_out = layer.projection.side_matrix("out", block_sum.dtype, block_sum.device)
    p_in = layer.projection.side_matrix("in", block_sum.dtype, block_sum.device)
    expected = grad.to(block_sum.device, block_sum.dtype)
    expected = expected if p_out is None else p_out @ expected
    expected = (expected if p_in is None else expected @ p_in.T).flatten()
    return float((block_sum - expected).norm()), float(expected.norm())


def _ranks_means(capture: GradientCapture, names: list[str], sums: dict[str, torch.Tensor | None],
                 mean_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ranks' mean of the block sums of ``names`` that some rank reached (zeros from the others), in one
    collective with a reached flag per layer."""
    widths = [capture.layers[name].projection.dim for name in names]
    flat = [torch.zeros(w, dtype=torch.float64) if sums[n] is None else sums[n].detach().double().cpu()
            for n, w in zip(names, widths)]
    flags = torch.tensor([float(sums[name] is not None) for name in names], dtype=torch.float64)
    means, reached = mean_over_ranks(torch.cat([*flat, flags])).split([sum(widths), len(names)])
    return {n: m for n, m, r in zip(names, means.split(widths), reached.tolist()) if r > 0}


def _shared_by(names: tuple[str, ...]) -> str:
    """A note naming the tracked layers that hold one weight, when there are several (else nothing)."""
    return f"; tracked layers {', '.join(map(repr, names))} hold this one weight" if len(names) > 1 else ""


class StepGuard:
    """The checks of the module docstring, for one ``fit``.

    Args:
        capture: the hooks (tracked layers and their captured blocks).
        watched: :func:`watched_parameters`.
    """

    def __init__(self, capture: GradientCapture, watched: dict[str, nn.Parameter]) -> None:
        self.capture = capture
        self.watched = watched
        self._trainable = {name: p.requires_grad for name, p in watched.items()}
        self._tensors = stepped_tensors(capture)
        self._index = {name: sampled_coordinates(w.numel(), w.device) for name, w in self._tensors.items()}
        self._backward: tuple[list[str], torch.Tensor] = ([], torch.empty(0, SAMPLED))  # sampled in this step
        self._stepped = self._backward  # what the step being applied sampled (:meth:`before_step`)
        self._applied: tuple[list[str], torch.Tensor] | None = None  # what ``optimizer.step()`` consumed (its run)
        self._stepped_weights: torch.Tensor | None = None  # sampled weights after the last ``optimizer.step()``
        self._steps = 0  # applied steps (the tied-weight check runs again after 1, 2, 4, 8, ... of them)
        self._started = False  # whether a micro-batch of this fit passed :meth:`check_trainable`
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self.settings = HyperparameterWatch(self._before_update)  # the hyperparameters a step read and used
        self._edited: UnsupportedError | None = None  # weights changed outside the optimizer before this update
        self.unchecked = set(capture.layers)  # layers the tied-weight check has not passed on an applied step
        self._passed: set[str] = set()  # layers it passed once (checked again for a growing penalty)
        self._first_backward = True  # the next backward is its step's first
        self._tied_seen: set[str] = set()  # layers the check looked at in this step
        self._tied: UnsupportedError | None = None  # and its refusal

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Sample the weights right after each ``optimizer.step()`` (a step post-hook) and the gradients right
        before its update (:meth:`_before_update`): what the step consumed, whatever the step does with ``.grad``
        (torch's foreach Nesterov SGD adds the momentum into it) or the user afterwards (``zero_grad`` in an
        ``optimizer_step`` override)."""
        self.detach()
        self._hook = optimizer.register_step_post_hook(lambda *_: self._after_step())
        self.settings.attach(optimizer)

    def _after_step(self) -> None:
        self._stepped_weights = self._sample_weights()

    def _sample_weights(self) -> torch.Tensor:
        """The tracked weights' and trained biases' sampled coordinates, ``[tensors, SAMPLED]``."""
        return stacked_float64([sampled_entries(w, self._index[name]) for name, w in self._tensors.items()])

    def final_weights(self) -> dict[str, list[float]] | None:
        """The tracked weights' and trained biases' sampled coordinates (:func:`sampled_coordinates`) after the last
        ``optimizer.step()``, ``{layer: [SAMPLED], layer.bias: [SAMPLED]}`` (:func:`stepped_tensors`); ``None``
        before any step."""
        if self._stepped_weights is None:
            return None
        return {name: row.tolist() for name, row in zip(self._tensors, self._stepped_weights)}

    def weights_replaced(self) -> bool:
        """Whether the tracked weights changed since the last ``optimizer.step()`` (e.g. weight averaging put its
        average in at train end); ``False`` before any step."""
        return self._stepped_weights is not None and not torch.equal(self._sample_weights(), self._stepped_weights)

    def detach(self) -> None:
        """Remove the step hooks."""
        self.settings.detach()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _sample(self) -> tuple[list[str], torch.Tensor]:
        """The tracked weights and trained biases that have a ``.grad``, and its sampled coordinates, ``[tensors,
        SAMPLED]``."""
        grads = {name: w.grad for name, w in self._tensors.items() if w.grad is not None}
        return list(grads), stacked_float64([sampled_entries(g, self._index[name]) for name, g in grads.items()])

    def after_backward(self, mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Sample the gradients as the backward left them (before any later change to them). On a step's first
        backward, compare the ``.grad`` of the layers not yet checked on an applied step with their captured
        blocks (a layer is checked on the first applied step whose first backward reaches it, under DDP,
        ``mean_over_ranks`` given, on any rank: a collective on every rank alike); :meth:`before_step` raises."""
        self._backward = self._sample()
        if self._first_backward and self.unchecked:  # DDP: the same layers on every rank
            try:  # ``.grad`` is as scaled as the blocks here
                self._tied_seen = check_blocks_sum_to_grad(self.capture, only=self.unchecked,
                                                           mean_over_ranks=mean_over_ranks,
                                                           again=frozenset(self._passed))
            except UnsupportedError as err:
                self._tied = err
        self._first_backward = False

    def _before_update(self) -> None:
        """Right before ``optimizer.step()`` updates (after every hook of the step, the LightningModule's
        ``on_before_optimizer_step`` included): compare the weights with those the last step left, and sample the
        gradients the update consumes."""
        self._edited, self._applied = self._check_unedited(), self._sample()

    def check_update(self, step: int) -> None:
        """Refuse a step whose update started from weights changed outside the optimizer, or used other
        hyperparameters than the recorded step read (:class:`HyperparameterWatch`).

        Raises:
            UnsupportedError: naming the parameters or the hyperparameter, and the fix.
        """
        edited, self._edited = self._edited, None
        if edited is not None:
            raise edited
        self.settings.check(step)

    def _check_unedited(self) -> UnsupportedError | None:
        """The refusal of weights changed outside the optimizer since its last step (a constraint applied in a hook:
        ``clamp_``, a max-norm renormalisation), else ``None``."""
        if self._stepped_weights is None:
            return None
        now = self._sample_weights()
        changed = [name for name, a, b in zip(self._tensors, now, self._stepped_weights) if not torch.equal(a, b)]
        if not changed:
            return None
        layers = tuple(name for name in self.capture.layers  # (a layer may itself be named '...bias')
                       if name in changed or f"{name}.bias" in changed)
        return UnsupportedError(
            f"tracked parameters {changed[:4]}{' ...' if len(changed) > 4 else ''} changed between optimizer steps "
            "outside the optimizer (a constraint such as clamp_ or a max-norm renormalisation in on_train_batch_start, "
            "on_train_batch_end, on_before_zero_grad, on_after_backward, on_before_optimizer_step or an optimizer_step "
            "override after optimizer.step(), a callback that writes weights, or weights loaded during fit): the "
            "callback records the optimizer's updates only, so its trajectory would not be the trained one. Train "
            f"with such constraints without this callback, or exclude those layers: exclude={layers!r}.")

    def before_step(self, skipped: bool, calls_refused: bool = False) -> None:
        """Close the step's backward (``on_before_optimizer_step``): its sampled gradients go to
        :meth:`check_applied` (the weights are compared with those the last step left right before the update,
        :meth:`check_update`), and its tied-weight check counts only for a step that is applied (an fp16 step the
        grad scaler skips has overflowed gradients: a later step is checked instead) and whose calls were all
        captured (``calls_refused``: a call refused on some rank, raised there, leaves its layer's blocks short).

        Raises:
            UnsupportedError: a tracked weight that is tied or used functionally.
        """
        seen, refused = self._tied_seen, self._tied
        self._tied_seen, self._tied, self._first_backward = set(), None, True
        self._stepped, self._backward = self._backward, ([], torch.empty(0, SAMPLED))  # a step without backward: none
        self._applied, self._edited = None, None
        if not skipped and not calls_refused:
            if refused is not None:
                raise refused
            self.unchecked -= seen
            self._passed |= seen
            self._steps += 1
            if self._steps & (self._steps - 1) == 0:  # a penalty on the weights (L2-SP) grows as they move
                self.unchecked = set(self.capture.layers)

    def check_trainable(self, step: int) -> None:
        """Refuse a parameter frozen or unfrozen since ``fit`` started.

        Raises:
            UnsupportedError: naming the parameters and the fix.
        """
        changed = [name for name, p in self.watched.items() if p.requires_grad != self._trainable[name]]
        if changed:
            now = "frozen" if not self.watched[changed[0]].requires_grad else "unfrozen"
            when = ("before this fit's first step, after the callback took them at fit start (a LightningModule's "
                    "on_fit_start and on_train_start run after the callbacks'): do it in __init__ or setup() "
                    "instead, or" if not self._started else
                    "during fit. Freeze or unfreeze between fits (one fit per stage instead of, e.g., "
                    "BackboneFinetuning), or")
            raise UnsupportedError(
                f"step {step}: parameters {changed[:4]}{' ...' if len(changed) > 4 else ''} were {now} {when} "
                "exclude those modules. The tracked layers and their bias columns are fixed when fit starts, so "
                "their updates would be dropped or trained untracked.")
        self._started = True

    def check_applied(self, step: int, factor: float, backwards: int = 1) -> None:
        """Refuse a step whose applied gradients (sampled right before its update, :meth:`attach`) are not ``factor``
        times the backward's (``factor = clip / loss scale``) on the sampled coordinates. The caller leaves out
        the steps the grad scaler or Lightning skip; nothing to compare for a step without a backward.
        ``backwards``: the micro-batch's backward passes; the first is the recorded one (more: the closure was
        evaluated again, and the message says so).

        Raises:
            UnsupportedError: naming the layer, the measured and the modelled factor, and the fix; or if the
                attached optimizer's ``step()`` did not run.
        """
        names, before = self._stepped
        if not names:
            return
        if self._applied is None:  # sampled inside the attached optimizer's step() only
            raise UnsupportedError(
                f"step {step}: the optimizer's step() did not run, or ran on another optimizer than the one fit "
                "started with: the recorded update would not be the applied one. Keep the optimizer "
                "configure_optimizers returned, and call optimizer.step(closure=optimizer_closure) in an "
                "optimizer_step override.")
        now, after = self._applied
        if now != names:  # a gradient set to None before the step counts as zeroed
            rows = dict(zip(now, after))
            after = torch.stack([rows.get(name, torch.zeros_like(row)) for name, row in zip(names, before)])
        measured = (after * before).sum(1) / before.square().sum(1)
        spread = (after - measured[:, None] * before).norm(dim=1) / after.norm(dim=1).clamp_min(1e-300)
        compared = before.ne(0).any(1)  # rows with a sampled gradient
        wrong = compared & ((spread > TOLERANCE) | ((measured - factor).abs() > TOLERANCE * abs(factor)))
        if bool(wrong.any()):
            i = int(wrong.nonzero()[0, 0])
            self._refuse(step, names[i], float(measured[i]), factor, float(spread[i]), backwards)

    @staticmethod
    def _refuse(step: int, name: str, measured: float, factor: float, spread: float, backwards: int) -> None:
        if backwards > 1:
            raise UnsupportedError(
                f"step {step}: the training closure ran {backwards} times in this step (an optimizer_step override "
                "that calls optimizer_closure again, as sharpness-aware minimization does), and the gradient the "
                f"optimizer applied to {name!r} is not the first evaluation's, which is the one the callback records. "
                "Evaluate the closure again inside a torch.optim.Optimizer's step(closure) instead (the callback then "
                "treats that optimizer as plain SGD at the first evaluation, with a warning), or train without it.")
        how = (f"times {measured:.6g} where the Trainer's settings give {factor:.6g}" if spread <= TOLERANCE
               else "changed coordinate by coordinate (not by one factor)")
        skip = (" To skip a step, return None from training_step (nothing is recorded for it)." if measured == 0
                else "")
        raise UnsupportedError(
            f"step {step}: the gradient the optimizer applied to {name!r} is the backward's {how}: something "
            "changed the gradients after the backward that the callback does not model (clipping in "
            "configure_gradient_clipping, in the LightningModule's on_after_backward or on_before_optimizer_step, "
            "zeroing them, or another callback), so the recorded update would not be the applied one. Clip with "
            f"Trainer(gradient_clip_val=..., gradient_clip_algorithm='norm'), which the callback models.{skip}")
