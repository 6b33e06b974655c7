"""One recorded optimizer step, as the recursion reads it and as it is flattened into its step file."""

from __future__ import annotations

import dataclasses
import functools

import torch

#: File prefix of the gradient rows (other row kinds: :data:`ROW_FILE_KINDS`).
GRADIENT = "grad"


def _scale_key(name: str, kind: str) -> str:
    return f"scale/{name}" if kind == GRADIENT else f"{kind}_scale/{name}"


def encode(rows: dict[str, torch.Tensor], storage: str, kind: str = GRADIENT) -> dict[str, torch.Tensor]:
    """Rows ``{layer: [B, k_l]}`` in the storage dtype; ``float16`` rows are divided by their layer's largest
    magnitude in the row.

    The per-row scale (float32) keeps the small gradients of late training out of float16's subnormal range. Each
    layer's block is scaled on its own, not through a concatenation of every layer's and an ``amax`` scatter (the
    same bits; on the LM's 19 rows of ``[16, 1024]`` 0.6 ms instead of 2.3 ms on 2 threads, 0.1 instead of 0.24 ms
    on the digits MLP, session 41; its end-to-end A/B could not resolve a few ms per step in that day's noise).
    """
    if storage != "float16":
        return {f"{kind}/{name}": grad.to(getattr(torch, storage)) for name, grad in rows.items()}
    if not rows:
        return {}
    # what a concat would be, float32 at least: float16's 0 for the scale of a zero row gave NaN
    dtype = functools.reduce(torch.promote_types, (grad.dtype for grad in rows.values()), torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    out = {}
    for name, grad in rows.items():
        grad = grad.to(dtype)
        # the largest magnitude of each row (NaN if it holds one, as an "amax" scatter gives; 0 for no columns)
        magnitude = grad.abs().amax(dim=1) if grad.shape[1] else grad.new_zeros(grad.shape[0])
        scale = magnitude.to(torch.float32).clamp_min(tiny)
        out[f"{kind}/{name}"] = (grad / scale.to(dtype).unsqueeze(1)).to(torch.float16)
        out[_scale_key(name, kind)] = scale
    return out


def accumulation_dtype(storage: str) -> torch.dtype:
    """The dtype stored rows decode to (:func:`decode`), and so of the recursion's accumulators and embeddings."""
    return torch.float64 if storage == "float64" else torch.float32


def decode(name: str, tensors: dict[str, torch.Tensor], kind: str = GRADIENT) -> torch.Tensor:
    """Inverse of :func:`encode`, in float32 (float64 stays float64)."""
    grad = tensors[f"{kind}/{name}"]
    scale = tensors.get(_scale_key(name, kind))
    if scale is not None:  # one pass: float16 times the float32 scale promotes to float32
        return grad * scale.to(torch.float32).unsqueeze(1)
    return grad if grad.dtype == torch.float64 else grad.to(torch.float32)


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """Everything the recursion needs from one optimizer step.

    Attributes:
        step: optimizer step index, counted from 0.
        sample_ids: dataset indices ``[B]`` (int64).
        weights: loss weight ``w`` of each sample ``[B]`` as the optimizer applied it (method.md §2).
        lrs: learning rate applied to each tracked layer ``[L]``, in manifest layer order.
        grads: per-sample gradients of the per-sample loss, ``{layer: [B, k_l]}``.
        epoch: training epoch of the step.
        optim: optimizer terms per layer ``[L]`` beyond plain SGD (``momentum``, ``gain``, ``weight_decay``;
            Nesterov's ``lead`` and ``direct``; AdamW's ``shrink``; the second moment's ``v_decay`` and ``v_gain``:
            ``recursion.BackwardRecursion``), empty for plain SGD.
        curvature: one curvature row per sample ``{layer: [B, k_l]}`` (the Gauss-Newton pseudo-gradients of
            ``Curvature.GGN``), empty when the curvature comes from ``grads`` or is off.
        preconditioned: the gradients through the optimizer's rank-1 preconditioner (Adam), or empty.
        curvature_preconditioned: the curvature rows through the same preconditioner, or empty.
        vectors: per-coordinate step terms ``{kind: {layer: [k_l]}}``: Adam's second-moment sensitivity
            ``kappa`` and the step's gradient ``batch_grad`` (``adam_second_moment``), else empty.
        applied_lrs: each tracked layer's param-group learning rate ``[L]`` (the schedule's; 0 where the step did
            not reach the layer), for reports: ``lrs`` is the recursion's rate, with clipping and Adam's bias
            correction folded in. ``None``: not given (read as ``lrs``).
        batches: each row's micro-batch ``[B]`` (int32, 0, 1, ... in row order over the ranks), so that the exact
            replay reruns the forwards training ran; ``None``: not recorded (stores of earlier versions).
        clip_norm: the gradients' norm over every parameter where norm clipping bound the step, else 0.
        clip_dots: where it bound, ``g^ . r_z`` per sample over every tracked layer for the gradients (``"grads"``)
            and curvature rows (``"curvature"``), ``{kind: [B]}`` float64 (:mod:`lightning_dve.clipping`).
    """

    step: int
    sample_ids: torch.Tensor
    weights: torch.Tensor
    lrs: torch.Tensor
    grads: dict[str, torch.Tensor]
    epoch: int = 0
    optim: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    curvature: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    preconditioned: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    curvature_preconditioned: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    vectors: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)
    applied_lrs: torch.Tensor | None = None
    batches: torch.Tensor | None = None
    clip_norm: float = 0.0
    clip_dots: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def to(self, device: torch.device) -> StepRecord:
        """The record with the tensors the recursion computes with on ``device``: weights, rows and vectors (the
        ids, rates and optimizer terms stay on the CPU, where they index and fill the columns)."""
        def move(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {name: value.to(device) for name, value in rows.items()}

        return dataclasses.replace(
            self, weights=self.weights.to(device), grads=move(self.grads), curvature=move(self.curvature),
            preconditioned=move(self.preconditioned), curvature_preconditioned=move(self.curvature_preconditioned),
            vectors={kind: move(values) for kind, values in self.vectors.items()}, clip_dots=move(self.clip_dots))

    def to_tensors(self, storage: str = "float32") -> dict[str, torch.Tensor]:
        """Flatten to the safetensors dict written on disk, gradients encoded in ``storage`` dtype."""
        out = {"sample_ids": self.sample_ids, "weights": self.weights, "lrs": self.lrs}
        out.update({key: value for key, value in (("applied_lrs", self.applied_lrs), ("batches", self.batches))
                    if value is not None})
        out.update({f"optim/{name}": value for name, value in self.optim.items()})
        for field, kind in ROW_FILE_KINDS.items():
            out.update(encode(getattr(self, field), storage, kind))
        out.update({f"vec/{kind}/{name}": value for kind, values in self.vectors.items()
                    for name, value in values.items()})
        if self.clip_norm:
            out["clip_norm"] = torch.tensor(self.clip_norm, dtype=torch.float64)
            out.update({f"clip/{kind}": dots for kind, dots in self.clip_dots.items()})
        return out  # made contiguous CPU tensors as they are written (files.write_safetensors)

    @classmethod
    def from_tensors(cls, step: int, epoch: int, tensors: dict[str, torch.Tensor]) -> StepRecord:
        """Rebuild from what :meth:`to_tensors` wrote (gradients decoded to float32, or float64 if stored so)."""
        rows = {kind: {k.split("/", 1)[1]: decode(k.split("/", 1)[1], tensors, kind) for k in tensors
                       if k.startswith(f"{kind}/")} for kind in ROW_FILE_KINDS.values()}
        optim = {k[len("optim/"):]: v for k, v in tensors.items() if k.startswith("optim/")}
        vectors: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("vec/"):
                _, kind, name = key.split("/", 2)
                vectors.setdefault(kind, {})[name] = value
        clip_dots = {k[len("clip/"):]: v for k, v in tensors.items() if k.startswith("clip/")}
        return cls(step, tensors["sample_ids"], tensors["weights"], tensors["lrs"], rows[GRADIENT], epoch, optim,
                   vectors=vectors, applied_lrs=tensors.get("applied_lrs"), batches=tensors.get("batches"),
                   clip_norm=float(tensors.get("clip_norm", 0.0)), clip_dots=clip_dots,
                   **{field: rows[kind] for field, kind in ROW_FILE_KINDS.items() if field != "grads"})


#: File prefix of each kind of stored rows, by ``StepRecord`` field.
ROW_FILE_KINDS = {"grads": GRADIENT, "curvature": "curv", "preconditioned": "pgrad",
                  "curvature_preconditioned": "pcurv"}
