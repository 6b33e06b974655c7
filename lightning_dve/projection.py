"""Seeded Kronecker random projections (method.md §3), saved and restored by seed and shape.

A layer's per-sample gradient ``G = sum_p delta_p a_p^T`` (``[d_out, d_in]``) is projected to
``(P_out delta_p)(P_in a_p)^T`` summed over positions, which equals ``(P_out kron P_in) vec(G)``. Each side has
its own seed, derived with ``hashlib`` from the base seed, the layer name and the side, so that it is the same
in every process. The matrices are drawn on the CPU in float64 and checksummed, so a store can refuse to be
scored with another projection.

A side is an orthogonalised Gaussian: ``k`` orthonormal rows (the Q factor of a Gaussian draw, a uniformly random
``k``-dimensional subspace) scaled by ``sqrt(d / k)``. Like a Gaussian ``P`` with ``N(0, 1/k)`` entries it is
unbiased, ``E[P^T P] = I``, but the variance of a projected inner product ``<P x, P y>`` shrinks by ``1 - k / d``:
exact at ``k = d`` and a large gain on small layers (``k = 32`` of ``d = 65``: half the variance). Stores written
before it (no ``"orthogonal"`` in their manifest) keep their plain Gaussian sides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import torch

from .errors import StoreError


def derive_seed(base_seed: int, layer: str, side: str) -> int:
    """Return a 63-bit seed for one side of one layer, stable across processes (unlike ``hash()``)."""
    digest = hashlib.sha256(f"{base_seed}/{layer}/{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def split_dim(projection_dim: int, out_dim: int, in_dim: int) -> tuple[int, int]:
    """Split a per-layer budget ``k`` into ``(k_out, k_in)`` with ``k_out * k_in <= k``.

    The split is as square as the layer allows; a side never exceeds its true size (then it is unprojected)
    and the leftover budget goes to the other side.
    """
    k_out = min(out_dim, max(1, math.isqrt(projection_dim)))
    k_in = min(in_dim, max(1, projection_dim // k_out))
    k_out = min(out_dim, max(1, projection_dim // k_in))
    return k_out, k_in


@dataclasses.dataclass(frozen=True)
class SideProjection:
    """One side's projection ``P: [k, d]``; the identity (``seed is None``) when the side fits (``k == d``).

    Attributes:
        dim: true size ``d`` of that side (input side includes the bias column).
        projected_dim: projected size ``k``.
        seed: generator seed, or ``None`` for the identity.
        orthogonal: whether the rows are orthogonalised (module docstring); ``False`` for stores written before.
    """

    dim: int
    projected_dim: int
    seed: int | None
    orthogonal: bool = False
    _checksum: dict[str, str] = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def is_identity(self) -> bool:
        """Whether this side is left unprojected."""
        return self.seed is None

    def _draw(self) -> torch.Tensor:
        """The seeded Gaussian ``[k, d]`` (float64, CPU): the same bytes on every machine and thread count."""
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        return torch.randn(self.projected_dim, self.dim, generator=generator, dtype=torch.float64)

    def matrix(self) -> torch.Tensor:
        """Return ``P`` as a float64 CPU tensor ``[k, d]`` with ``E[P^T P] = I``.

        Orthogonal: ``sqrt(d / k) Q^T`` with ``Q R`` the QR factorisation of the Gaussian draw's transpose, the
        signs of ``R``'s diagonal moved into ``Q`` (so ``Q`` is Haar-distributed and fixed by the seed; its last
        bits depend on the LAPACK kernel and thread count, ~1e-16 relative); else the draw with entries
        ``N(0, 1/k)``.
        """
        if self.seed is None:
            return torch.eye(self.dim, dtype=torch.float64)
        draw = self._draw()
        if not self.orthogonal:
            return draw / math.sqrt(self.projected_dim)
        self._checksum.setdefault("value", _digest(b"orthogonal:" + draw.numpy().tobytes()))  # not drawn again
        q, r = torch.linalg.qr(draw.T)
        return (q * torch.sign(torch.diagonal(r))).T * math.sqrt(self.dim / self.projected_dim)

    def checksum(self) -> str:
        """Return a sha256 prefix that identifies the matrix (identity: a fixed tag).

        Gaussian sides hash the matrix bytes; orthogonal sides hash their draw with a tag, because the QR factor's
        last bits differ between thread counts and CPUs while the draw's do not. Computed once per side (also by
        :meth:`matrix`, from its own draw).
        """
        if self.seed is None:
            return "identity"
        if "value" not in self._checksum:
            data = b"orthogonal:" + self._draw().numpy().tobytes() if self.orthogonal else \
                self.matrix().numpy().tobytes()
            self._checksum["value"] = _digest(data)
        return self._checksum["value"]


def _digest(data: bytes) -> str:
    """A sha256 prefix of ``data``: the checksum of a projection side."""
    return hashlib.sha256(data).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class LayerProjection:
    """The pair of projections of one layer and its cached device copies."""

    output: SideProjection
    input: SideProjection
    _cache: dict[tuple[torch.dtype, torch.device, str], torch.Tensor | None] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def create(cls, name: str, out_dim: int, in_dim: int, projection_dim: int | None, seed: int) -> LayerProjection:
        """Build the projections of layer ``name`` for a budget ``projection_dim`` (``None``: exact)."""
        if projection_dim is None:
            return cls(SideProjection(out_dim, out_dim, None), SideProjection(in_dim, in_dim, None))
        k_out, k_in = split_dim(projection_dim, out_dim, in_dim)
        return cls(
            SideProjection(out_dim, k_out, None if k_out == out_dim else derive_seed(seed, name, "out"), True),
            SideProjection(in_dim, k_in, None if k_in == in_dim else derive_seed(seed, name, "in"), True),
        )

    @property
    def dim(self) -> int:
        """Projected size ``k_out * k_in`` of the layer's per-sample block."""
        return self.output.projected_dim * self.input.projected_dim

    def side_matrix(self, side: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """Return the side's matrix ``[k, d]`` in ``dtype`` on ``device``, or ``None`` for the identity."""
        key = (dtype, device, side)
        if key not in self._cache:
            proj = self.output if side == "out" else self.input
            self._cache[key] = None if proj.is_identity else proj.matrix().to(device=device, dtype=dtype)
        return self._cache[key]

    def to_dict(self) -> dict[str, Any]:
        """Return the manifest entry: seeds, shapes and checksums of both sides."""
        return {
            side: {"dim": p.dim, "projected_dim": p.projected_dim, "seed": p.seed, "orthogonal": p.orthogonal,
                   "checksum": p.checksum()}
            for side, p in (("out", self.output), ("in", self.input))
        }

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> LayerProjection:
        """Restore from a manifest entry and verify the regenerated matrices against their checksums.

        Raises:
            StoreError: if a regenerated matrix does not match its recorded checksum.
        """
        sides = {s: SideProjection(data[s]["dim"], data[s]["projected_dim"], data[s]["seed"],
                                   data[s].get("orthogonal", False)) for s in ("out", "in")}
        for side, proj in sides.items():
            if proj.checksum() != data[side]["checksum"]:
                raise StoreError(
                    f"projection of layer {name!r} ({side} side, seed {proj.seed}) regenerates with checksum "
                    f"{proj.checksum()}, but the store recorded {data[side]['checksum']}: this store was written "
                    "with another projection (or another torch random generator). Re-record the run with this "
                    "installation, or score it with the torch version that wrote it."
                )
        return cls(sides["out"], sides["in"])
