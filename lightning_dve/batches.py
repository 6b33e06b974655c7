"""What a batch tells besides its gradients: sample ids, the loss reduction's per-sample weights, finiteness.

Also :func:`muted_logging`, for running ``training_step`` outside the training loop (queries, replay), and
:func:`on_module_device`, the test batch as the training loop would hand it to ``training_step``.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .batch_trees import as_started, count_samples, map_tensors, shallow_copy, to_device
from .checkpoints import DOUBLE_PRECISION
from .config import LossReduction
from .errors import ConfigError, DVEError, GradientError, SampleIdError, UnsupportedError

IdFn = Callable[[Any], Any]
WeightFn = Callable[[Any], Any]


def reduction_weights(
    reduction: LossReduction, batch: Any, batch_size: int, weight_fn: WeightFn | None
) -> torch.Tensor:
    """Per-sample loss weights ``w [B]`` inside the loss: ``1/B`` (mean), ``1`` (sum) or ``weight_fn(batch)``.

    Raises:
        ConfigError: if the reduction needs ``weight_fn`` and none is given, or it returns a wrong shape.
    """
    if reduction is LossReduction.MEAN:
        return torch.full((batch_size,), 1.0 / batch_size, dtype=torch.float64)
    if reduction is LossReduction.SUM:
        return torch.ones(batch_size, dtype=torch.float64)
    if weight_fn is None:
        raise ConfigError("this store was recorded with per-sample loss weights (a loss_reduction callable); pass "
                          "the same callable as `loss_weights=` to DataValueEmbeddings.load, or pass `loss_fn=`.")
    weights = torch.as_tensor(weight_fn(batch)).detach().to("cpu", torch.float64)
    if weights.shape != (batch_size,):
        raise ConfigError(f"loss_reduction callable returned shape {tuple(weights.shape)}; expected "
                          f"({batch_size},), one weight per sample of the batch.")
    return weights


def extract_sample_ids(batch: Any, sample_ids: str | IdFn, batch_size: int) -> torch.Tensor:
    """Read the dataset indices ``[B]`` of a batch (a mapping's key or a callable).

    Raises:
        SampleIdError: if the ids are missing, not integers, or not one per sample.
    """
    if callable(sample_ids):
        ids = sample_ids(batch)
    elif isinstance(batch, Mapping):
        if sample_ids not in batch:
            raise SampleIdError(f"batch has no key {sample_ids!r} (keys: {sorted(map(str, batch))}). "
                                f"{_id_key_hint(batch, batch_size)}Return the dataset index under {sample_ids!r} "
                                "from your Dataset, or pass `sample_ids=callable(batch) -> LongTensor[B]`.")
        ids = batch[sample_ids]
    else:
        raise SampleIdError(f"batch is a {type(batch).__name__}, not a mapping, so key {sample_ids!r} cannot be read. "
                            "Pass `sample_ids=callable(batch) -> LongTensor[B]` that returns the dataset indices.")
    ids = _as_id_tensor(ids)
    if ids.shape != (batch_size,):
        raise SampleIdError(f"sample ids have shape {tuple(ids.shape)} but the batch has {batch_size} samples (the "
                            f"first dimension of the tracked layers' inputs); {_count_hint(ids.numel(), batch_size)}")
    return ids.detach().to("cpu", torch.int64)


#: The range of ids the store keeps (int64).
_ID_RANGE = "-2**63 to 2**63 - 1"


def _as_id_tensor(ids: Any) -> torch.Tensor:
    """``ids`` as an integer tensor whose values fit the store's int64.

    Raises:
        SampleIdError: for non-integer ids, or integers outside int64 (64-bit hashes as uint64).
    """
    try:
        ids = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as err:  # strings (file names), None, ragged lists, big ints
        values = list(ids) if isinstance(ids, (list, tuple)) else [ids]
        odd = [v for v in values if not isinstance(v, numbers.Integral)]
        if not odd and values:  # integers only: one is outside int64
            big = next((v for v in values if not -2**63 <= int(v) < 2**63), values[0])
            raise SampleIdError(f"sample ids must fit in int64 ({_ID_RANGE}); got {big!r}. Map them to dataset "
                                "positions, or pass `sample_ids=callable(batch) -> LongTensor[B]` that does.") from err
        raise SampleIdError(f"sample ids must be integers (dataset indices); got a {type(ids).__name__} holding "
                            f"{type(odd[0]).__name__} values such as {odd[0]!r}. Return the sample's position in the "
                            "dataset as an int from your Dataset, or pass `sample_ids=callable(batch) -> "
                            "LongTensor[B]` that maps them to integers.") from err
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise SampleIdError(f"sample ids must be integers (dataset indices); got dtype {ids.dtype}. Return the "
                            "sample's position as an int from your Dataset, or pass `sample_ids=callable(batch) -> "
                            "LongTensor[B]` that converts them (e.g. batch['index'].long()).")
    if ids.dtype == torch.uint64 and bool((ids.cpu().view(torch.int64) < 0).any()):  # 2**63 and above
        raise SampleIdError(f"sample ids must fit in int64 ({_ID_RANGE}); got uint64 ids of 2**63 or more (64-bit "
                            "hashes?), which int64 would wrap to negative numbers. Map them to dataset positions, "
                            "or pass `sample_ids=callable(batch) -> LongTensor[B]` that does.")
    return ids


def align_test_rows(rows: dict[str, torch.Tensor], batch: Any, used: Any, sample_ids: str | IdFn | None
                    ) -> dict[str, torch.Tensor]:
    """A query's per-sample rows ``{layer: [m, k]}``, captured in the order of the batch ``training_step`` left
    (``used``), put back in the order of the test ``batch`` it was given, matched by their ids: a step that sorts
    or filters its batch in place (training reads the ids at the step's end, as the rows come). Test points the
    step dropped get rows of zeros, as they get a loss of 0 in :meth:`exact_influence`, with a warning.

    Raises:
        ConfigError: if the step kept another number of rows than ``batch`` has and no unique ids match them.
    """
    n, m = count_samples(batch), next(iter(rows.values())).shape[0]
    before, after = ids_or_none(batch, sample_ids, n), ids_or_none(used, sample_ids, m)
    if before is None and (joined := unique_ids(batch, sample_ids)) is not None and len(joined) != n:
        before, n = joined, len(joined)  # its ids count its samples: several loaders' batches, which count_samples
    if before is None or after is None or torch.equal(before, after):
        if m > n:
            raise ConfigError(f"training_step's tracked layers saw {m} rows for the test batch's {n} samples (views "
                              "of each sample concatenated, or several loaders' batches joined without ids that tell "
                              "their samples apart): a query needs one row per test point. Build the views in "
                              "training mode only (`if self.training:`; queries run in eval mode), or give each "
                              "loader's samples their own ids.")
        if m != n:
            fix = ("include the training batches' id key in the test batch" if sample_ids is not None else "give "
                   "DataValueEmbeddings.load(..., sample_ids=) the callback's sample_ids (a callable is not saved)")
            raise ConfigError(f"training_step kept {m} of the test batch's {n} samples (it filters its batch), and no "
                              f"ids in the test batch tell which rows are which test points: {fix}, or pass "
                              "loss_fn(module, batch) -> Tensor[n] of per-sample test losses.")
        return rows
    position = {int(i): p for p, i in enumerate(before.tolist())}
    if len(position) < n or any(int(i) not in position for i in after.tolist()) or len(set(after.tolist())) < m:
        raise ConfigError(f"training_step reordered or filtered the test batch, and its ids {sample_ids!r} do not "
                          "match the rows back to the test points (repeated, or new ids): give each test point a "
                          "unique id, or pass loss_fn(module, batch) -> Tensor[n] of per-sample test losses.")
    index = torch.tensor([position[int(i)] for i in after.tolist()], dtype=torch.long)
    if m < n:
        warnings.warn(f"training_step dropped {n - m} of the test batch's {n} samples: their scores are 0 (no loss; "
                      "exact_influence gives them 0 too).", UserWarning, stacklevel=4)
    return {name: r.new_zeros((n, *r.shape[1:])).index_copy_(0, index.to(r.device), r) for name, r in rows.items()}


def unique_ids(batch: Any, sample_ids: str | IdFn | None) -> torch.Tensor | None:
    """The batch's ids on the CPU, however many, where they are readable, integers and unique; else ``None``."""
    if sample_ids is None:
        return None
    try:
        ids = _as_id_tensor(sample_ids(batch) if callable(sample_ids) else batch[sample_ids]).reshape(-1).cpu()
    except (SampleIdError, ConfigError, LookupError, TypeError, AttributeError, RuntimeError, ValueError):
        return None
    return ids if len(set(ids.tolist())) == len(ids) else None


def ids_or_none(batch: Any, sample_ids: str | IdFn | None, batch_size: int) -> torch.Tensor | None:
    """The batch's ids on the CPU (:func:`extract_sample_ids`), or ``None`` where it has none readable."""
    if sample_ids is None:
        return None
    try:
        return extract_sample_ids(batch, sample_ids, batch_size).cpu()
    except (SampleIdError, ConfigError, LookupError, TypeError, AttributeError):
        return None


def _count_hint(n_ids: int, batch_size: int) -> str:
    """What a number of ids other than the batch's samples points at, and the fix."""
    if n_ids == batch_size:
        return "return one id per sample as a 1-D LongTensor (e.g. ids.reshape(-1))."
    sequence_first = ("If the ids are right, a tracked layer sees a sequence-first input ([T, B, ...], e.g. "
                      "nn.Transformer without batch_first=True): make it batch-first or exclude it.")
    if n_ids < batch_size:
        flattened = (" If they are a multiple, a tracked layer sees the samples' positions flattened into the batch "
                     "dimension ([B*T, d], e.g. x.view(-1, d) before a head): keep them apart ([B, T, d]; nn.Linear "
                     "takes any leading dims), or views of each sample concatenated into one forward "
                     "(torch.cat([view_a, view_b])): then give each view's ids, torch.cat([ids, ids]), with "
                     "allow_duplicate_ids=True." if n_ids and batch_size % n_ids == 0 else "")
        return f"return one id per sample as a 1-D LongTensor.{flattened} {sequence_first}"
    return ("more ids than samples reached the tracked layers: a training_step that drops samples before the model "
            "(filter the batch, ids included, in the Dataset or collate_fn instead), or one forward per part of the "
            "batch (one per loader of a CombinedLoader: a layer's calls in a step are summed sample by sample, so "
            "concatenate the parts and run one forward, as each call must take the whole batch). " + sequence_first)


#: Keys that usually hold dataset indices, suggested when the configured one is missing.
ID_KEYS = ("index", "idx", "indices", "id", "ids", "sample_id", "sample_ids", "sample_index", "dataset_index")


def _id_key_hint(batch: Mapping[Any, Any], batch_size: int) -> str:
    """``"If ... pass sample_ids='idx'. "`` for a key of :data:`ID_KEYS` holding one integer per sample, else ``""``."""
    for key in ID_KEYS:
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.shape == (batch_size,) and not value.is_floating_point():
            return f"If {key!r} holds the dataset indices, pass `sample_ids={key!r}`. "
    return ""


def check_finite(grads: dict[str, torch.Tensor], sample_ids: torch.Tensor, step: int, narrow: bool = False
                 ) -> None:
    """Refuse NaN or infinite per-sample gradients, naming the layer, step and samples; with ``narrow`` (a storage
    dtype narrower than float64) also float64 values beyond float32's range, which it would store as inf or NaN.

    Raises:
        GradientError: if any captured value is not finite (or not finite in the storage).
    """
    wide = narrow and any(block.dtype == torch.float64 for block in grads.values())
    peak = (lambda block: torch.linalg.vector_norm(block, float("inf"))) if wide else torch.sum
    if not grads or bool((torch.stack([peak(block) for block in grads.values()]).abs() <= FLOAT32_MAX).all()):
        return  # one reduction per layer (a sum; float64 rows into a narrower storage: their largest magnitude)
    for name, block in grads.items():  # (a large sum of finite values within the storage's range finds nothing)
        finite = torch.isfinite(block).all(dim=1)
        bad = ~finite | (block.abs() > FLOAT32_MAX).any(dim=1) if wide else ~finite
        if bad.any():
            ids = sample_ids[bad.cpu()].tolist()
            listed = f"{ids}" if len(ids) <= 10 else f"{ids[:10]} and {len(ids) - 10} more"
            what = "non-finite" if not bool(finite[bad].all()) else (
                "float32-overflowing (stored as inf or NaN in the narrower storage_dtype: storage_dtype='float64' "
                "keeps it)")
            raise GradientError(
                f"{what} per-sample gradient in layer {name!r} at step {step} for sample ids {listed}. Training "
                "diverged or a sample produced an invalid loss; lower the learning rate, enable gradient clipping, "
                "or remove those samples. Steps before this one are kept in the store: resume from a Lightning "
                "checkpoint saved before it (trainer.fit(..., ckpt_path=...)) to record on from there.")


#: The largest float32: float64 rows beyond it overflow in every narrower storage dtype (:func:`check_finite`).
FLOAT32_MAX = torch.finfo(torch.float32).max


def training_loss(module: nn.Module, batch: Any) -> tuple[torch.Tensor | None, Any]:
    """``training_step``'s loss (:func:`scalar_loss`) on a shallow copy of ``batch``, and that copy as the step
    left it with the keys it popped put back (``as_started``), for a ``loss_reduction`` callable, as training
    reads it: keys the step adds (per-sample loss weights written into the batch) or reassigns are there, and
    the caller's batch, and the next call's, stay as they were."""
    working = shallow_copy(batch)
    loss = scalar_loss(module.training_step(*step_arguments(module.training_step, working)))
    return loss, as_started(working, batch)


def training_loss_or_refuse(module: nn.Module, batch: Any, what: str, fix: str) -> tuple[torch.Tensor | None, Any]:
    """:func:`training_loss` of a batch the package built itself (``what``), its failure named as the package's.

    Raises:
        ConfigError: ``training_step failed on <what> (<error>). <fix>``, where ``training_step`` fails on it.
    """
    try:
        return training_loss(module, batch)
    except DVEError:
        raise
    except Exception as err:
        raise ConfigError(f"training_step failed on {what} ({type(err).__name__}: {err}). {fix}") from err


def step_arguments(step: Callable[..., Any], batch: Any) -> tuple[Any, ...]:
    """``(batch, 0)``, or ``(batch,)`` for a ``training_step(self, batch)`` without ``batch_idx``, which Lightning
    allows: it passes ``batch_idx`` positionally where the signature takes a second positional argument or
    ``*args`` (not a keyword-only ``batch_idx``)."""
    try:
        parameters = inspect.signature(step).parameters.values()
    except (TypeError, ValueError):  # a signature inspect cannot read: pass batch_idx, as Lightning would
        return batch, 0
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_index = len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)
    return (batch, 0) if takes_index else (batch,)


def scalar_loss(out: Any) -> torch.Tensor | None:
    """The loss ``training_step`` returned (a scalar tensor, or a dict's ``"loss"``); ``None`` otherwise."""
    loss = out["loss"] if isinstance(out, dict) else out
    return loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None


@contextlib.contextmanager
def muted_logging(module: nn.Module) -> Iterator[None]:
    """Make ``module.log`` and ``module.log_dict`` no-ops while running ``training_step`` outside a loop."""
    saved = {name: module.__dict__.get(name) for name in ("log", "log_dict")}
    for name in saved:
        if hasattr(module, name):
            setattr(module, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, value)


@contextlib.contextmanager
def modes(module: nn.Module, eval_modules: Sequence[str] | None) -> Iterator[None]:
    """Train mode except ``eval_modules`` (the modes training ran in); ``None`` means eval mode throughout.
    Every submodule's mode and every buffer is restored afterwards (a replay runs ``training_step`` in train mode,
    where a module may update a running statistic that only its eval mode uses)."""
    saved, buffers = {m: m.training for m in module.modules()}, saved_buffers(module)
    module.train(eval_modules is not None)
    for name in eval_modules or ():
        module.get_submodule(name).eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, training in saved.items():
            m.train(training)
        restore_buffers(buffers)


def saved_buffers(module: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]:
    """Each buffer as ``(owner, attribute, buffer, a copy of its value)``, for :func:`restore_buffers`."""
    return [(m, k, b, b.detach().clone()) for m in module.modules() for k, b in m._buffers.items() if b is not None]


def restore_buffers(buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]) -> None:
    """Put each ``(owner, attribute, buffer, saved value)`` back: the same tensor, written in place where it
    changed, or the saved copy where it cannot be written (an inference tensor, made under ``trainer.validate``;
    an expanded view), also where the attribute was assigned anew."""
    with torch.no_grad():
        for owner, attribute, buffer, value in buffers:
            if not torch.equal(buffer, value):
                try:
                    buffer.copy_(value)
                except RuntimeError:
                    buffer = value
            setattr(owner, attribute, buffer)


@contextlib.contextmanager
def refusing_dropout(module: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Refuse the first call of a module in ``names`` (dropout in train mode during training) while replaying: its
    random masks are not recorded. A dropout module that the forward never calls is not refused.

    Raises:
        UnsupportedError: at the first such call, naming the module.
    """
    def refuse(name: str) -> Callable[..., None]:
        def hook(dropout: nn.Module, args: Any) -> None:
            if dropout.training and getattr(dropout, "p", 0) > 0:
                raise UnsupportedError(
                    f"module {name!r} ran dropout in train mode, and the random masks are not recorded, so the "
                    "training steps cannot be replayed exactly. Train with dropout off (p=0 or the module in eval "
                    "mode) to replay the run (exact_influence, embeddings='replay').")
        return hook

    named = dict(module.named_modules())
    handles = [named[name].register_forward_pre_hook(refuse(name)) for name in names if name in named]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def on_module_device(module: nn.Module, batch: Any, precision: str | None = None) -> Any:
    """``batch`` as the training loop hands a loader's batch to ``training_step``, on the device of ``module``'s
    parameters: after a ``"64-true"`` fit (``precision``) its floating tensors in float64 for a float64 module, as
    that Trainer converted the training batches; then a LightningModule's ``on_before_batch_transfer``,
    ``transfer_batch_to_device`` and ``on_after_batch_transfer`` (its DataModule's where a Trainer holds one), as
    Lightning treats example inputs (``to_onnx``), in eval mode, on a copy of the batch (tensors too: a hook's
    in-place ``batch["x"] /= 16`` would reach the caller's tensors, as the CPU transfer returns them); a plain
    module's tensors are moved to its device. Hooks that read ``self.trainer`` in a module without one are left
    out, with a warning (only the transfer runs).

    Raises:
        ConfigError: if a transfer hook fails on the batch otherwise, naming it and the batch it expects.
    """
    if batch is None:  # the report's exact replay: its loss_fn reads the reference batches itself
        return None
    parameter = next(module.parameters(), None)
    if parameter is not None and parameter.dtype == torch.float64 and precision in DOUBLE_PRECISION:
        batch = to_device(batch, None, torch.float64)
    device = torch.device("cpu") if parameter is None else parameter.device
    before, transfer = (getattr(module, name, None) for name in ("_on_before_batch_transfer",
                                                                  "_apply_batch_transfer_handler"))
    if not (callable(before) and callable(transfer)):
        return batch if device.type == "cpu" else to_device(batch, device)
    try:
        with modes(module, None):  # eval mode, as queries run: hooks that augment under self.training do not
            return transfer(before(map_tensors(batch, torch.Tensor.clone), 0), device, 0)  # the caller's batch stays
    except RuntimeError as err:
        if "not attached to a `Trainer`" not in str(err):  # Lightning's error for self.trainer without one
            raise _hook_error(err) from err
        warnings.warn(f"{type(module).__name__}'s batch transfer hooks read self.trainer, and the module is attached "
                      "to no Trainer: the query leaves on_before_batch_transfer and on_after_batch_transfer out. If "
                      "they change the inputs beyond training-time augmentation, pass the batch as they make it, or "
                      "query the module the fit trained (attached).", stacklevel=4)
        return module.transfer_batch_to_device(batch, device, 0) if device.type != "cpu" else batch
    except Exception as err:
        raise _hook_error(err) from err


def _hook_error(err: Exception) -> ConfigError:
    """The refusal of a transfer hook that failed on a test batch."""
    return ConfigError(
        f"the LightningModule's batch transfer hooks (on_before_batch_transfer, transfer_batch_to_device, "
        f"on_after_batch_transfer) failed on the test batch ({type(err).__name__}: {err}). Queries run them as the "
        "training loop does, on a batch as the DataLoader yields it: pass such a batch, not one the hooks already "
        "ran on.")
