"""Normalisation layers with an elementwise affine (``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``), tracked
with the block ``[weight | bias]`` of ``sum_p delta_p * x_hat_p`` and ``sum_p delta_p`` (layers_norm.py).

Oracles: per-example autograd for the captured rows (plain, projected and through Adam's rank-1 preconditioner);
an explicit float64 product of step factors over every parameter for the exact-mode recursion; the exact replay
for the replayed embeddings, which must equal it once every trainable parameter is tracked; torch's own AdamW
state for the recorded preconditioner's layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_dve import DataValueEmbedding
from lightning_dve.capture import GradientCapture, resolve_layers
from lightning_dve.config import DVEConfig
from lightning_dve.errors import UnsupportedError
from lightning_dve.layers import parameter_block, split_block
from lightning_dve.store import TrajectoryStore
from tests.conftest import TinyMLP
from tests.helpers import check_rows_against_per_example_grads

DTYPE = torch.float64


class Mixed(nn.Module):
    """Every norm type and input layout: LayerNorm over ``[B, T, 6]``, over two dims ``[B, T, 2, 3]`` without a
    bias and with one, GroupNorm over a ``Conv1d``'s ``[B, 4, T]`` and a ``Conv2d``'s ``[B, 4, T, 2]``, then
    BatchNorm2d (eval mode, running statistics) on that, RMSNorm, and BatchNorm1d on ``[B, 6]``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.ln = nn.Linear(5, 6), nn.LayerNorm(6)
        self.ln2, self.ln3 = nn.LayerNorm((2, 3), bias=False), nn.LayerNorm((2, 3))
        self.c, self.gn = nn.Conv1d(3, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.c2, self.gn2 = nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(4, 4)
        self.bn2, self.rms, self.bn1 = nn.BatchNorm2d(4), nn.RMSNorm(6), nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)
        with torch.no_grad():  # weights, biases and running statistics away from their 1 and 0
            for norm in (self.ln, self.ln2, self.ln3, self.gn, self.gn2, self.bn2, self.rms, self.bn1):
                for parameter in norm.parameters():
                    parameter.normal_()
            for norm in (self.bn1, self.bn2):
                norm.running_mean.normal_()
                norm.running_var.uniform_(0.5, 2.0)
                norm.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.ln(self.a(x)))  # [B, T, 6]
        h = h + self.ln2(h.unflatten(2, (2, 3))).flatten(2)
        h = h + self.ln3(h.unflatten(2, (2, 3))).flatten(2)
        c = self.gn(self.c(h[..., :3].transpose(1, 2)))  # [B, 4, T]
        c2 = self.bn2(self.gn2(self.c2(h[..., None, :, :2].flatten(2, 3).unsqueeze(1))))  # [B, 4, T, 2]
        h = h + c.mean(1, keepdim=True).transpose(1, 2) + c2.mean((1, 3))[..., None]
        return self.head(self.bn1(torch.tanh(self.rms(h)).mean(1)))


@pytest.mark.parametrize("projection_dim", [None, 4])
def test_captured_rows_are_the_per_example_gradients(projection_dim: int | None) -> None:
    """Plain rows ``P_out G_z P_in^T`` and, through a rank-1 preconditioner ``r c^T``, ``P_out (diag(r) G_z
    diag(c)) P_in^T``, with ``G_z`` the block of sample ``z``'s own backward."""
    torch.manual_seed(0)
    model = Mixed().to(DTYPE)
    kinds = check_rows_against_per_example_grads(model, torch.randn(5, 7, 5, dtype=DTYPE), torch.randint(0, 3, (5,)),
                                                 projection_dim)
    assert kinds == ["linear", "layer_norm", "layer_norm", "layer_norm", "conv1d", "group_norm", "conv2d", "group_norm",
                     "batch_norm", "rms_norm", "batch_norm", "linear"]


def test_a_call_on_an_unbatched_input_is_refused() -> None:
    """A LayerNorm over the last dim called on one sample's ``[3]`` has no batch dimension."""
    model = nn.ModuleDict({"linear": nn.Linear(3, 3), "norm": nn.LayerNorm(3)})
    capture = GradientCapture(resolve_layers(model, DVEConfig()))
    capture.attach()
    capture.begin()
    model["norm"](model["linear"](torch.randn(2, 3))[0]).sum().backward()
    with pytest.raises(UnsupportedError, match=r"layer 'norm' \(LayerNorm\) was called on an unbatched input of "
                                               r"shape \(3,\)"):
        capture.batch_size()


def test_a_layer_norms_block_maps_back_to_its_weight_and_bias_of_two_dims() -> None:
    """``split_block`` inverts ``parameter_block`` for a LayerNorm over ``(2, 3)`` with a bias (its bias column was
    the ``[2, 1, 3]`` bias unsqueezed: a raw error in the gradient check and Adam's state)."""
    norm, weight, bias = nn.LayerNorm((2, 3)), torch.randn(2, 3), torch.randn(2, 3)
    block = parameter_block(norm, weight, bias)
    assert block.shape == (6, 2)
    got = split_block(norm, block.flatten())
    assert torch.equal(got["weight"], weight) and torch.equal(got["bias"], bias)

class TokenNorm(TinyMLP):
    """Digits as 4 tokens of 16 pixels: ``Linear(16, 12)``, LayerNorm over tokens and features ``[4, 12]`` (a
    weight and a bias of two dims), tanh, token mean, RMSNorm, head."""

    def __init__(self, optimizer: str = "momentum") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.ln = nn.Linear(16, 12), nn.LayerNorm((4, 12))
        self.rms, self.head = nn.RMSNorm(12), nn.Linear(12, 10)
        self.optimizer = optimizer
        del self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rms(torch.tanh(self.ln(self.embed(x.view(-1, 4, 16)))).mean(dim=1)))

    def configure_optimizers(self) -> Any:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.5 if self.optimizer == "momentum" else 0.0)


class ImageNorm(TokenNorm):
    """Digits as ``[1, 8, 8]`` images: ``Conv2d(1, 8, 3)``, GroupNorm(4, 8), tanh, 2x2 average pool, head."""

    def __init__(self, optimizer: str = "momentum") -> None:
        super().__init__(optimizer)
        torch.manual_seed(0)
        del self.embed, self.ln, self.rms
        self.conv, self.gn, self.head = nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.avg_pool2d(torch.tanh(self.gn(self.conv(x.view(-1, 1, 8, 8)))), 2).flatten(1))


class ImageBatchNorm(ImageNorm):
    """:class:`ImageNorm` with a BatchNorm2d in eval mode (running statistics, as a fine-tuned backbone's)."""

    def __init__(self, optimizer: str = "momentum") -> None:
        super().__init__(optimizer)
        self.gn = nn.BatchNorm2d(8)
        with torch.no_grad():
            self.gn.running_mean.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
            self.gn.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(2))

    def on_train_epoch_start(self) -> None:
        self.gn.eval()


def _float64(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


@pytest.mark.parametrize(("net", "optimizer"), [(TokenNorm, "momentum"), (TokenNorm, "adamw"), (ImageNorm, "sgd"),
                                                (ImageBatchNorm, "adamw")])
def test_replayed_embeddings_equal_exact_replay_once_the_norms_are_tracked(
        fit: Callable, tmp_path: Path, test_batch: dict, net: type[TokenNorm], optimizer: str) -> None:
    """With every trainable parameter in a tracked layer and no projection, the replayed embeddings (each
    coordinate of every tracked layer's block carried back through the replayed run, mapped to the parameters by
    the block layout) score as ``exact_influence``; with a LayerNorm left out they did not (README)."""
    model = net(optimizer).double()
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, embeddings="replay", report=None)
    fit(model, dve, precision="64-true")
    test = _float64(test_batch)
    torch.testing.assert_close(dve.embeddings.influence(model, test, per_step=True).scores,
                               dve.embeddings.exact_influence(model, test, per_step=True).scores, rtol=1e-9, atol=1e-13)


class Trajectory(L.Callback):
    """The parameters before every step and the batches, for the oracle."""

    def __init__(self) -> None:
        self.params: list[dict[str, torch.Tensor]] = []
        self.batches: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
                             ) -> None:
        self.params.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})
        self.batches.append(batch)


def _per_sample_grads(model: nn.Module, params: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
    """``grad l(theta, z)`` over every parameter, flattened: ``[B, D]``."""
    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, batch["x"], batch["y"])
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)


@pytest.mark.parametrize("net", [TokenNorm, ImageNorm, ImageBatchNorm])
def test_exact_mode_scores_equal_the_explicit_product_over_every_parameter(
        fit: Callable, tmp_path: Path, test_batch: dict, net: type[TokenNorm]) -> None:
    """Plain SGD, one ``M`` over all layers, empirical Fisher: ``g_test . lr w prod_k (I - lr H_k) g`` with
    ``H_k = sum_z w g g^T`` over all parameters (method.md §2), the norms' weights and biases among them."""
    model, trajectory = net("sgd").double(), Trajectory()
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, layout="full", report=None)
    fit(model, dve, precision="64-true", callbacks=[trajectory])
    grads = [_per_sample_grads(model, params, batch) for params, batch in zip(trajectory.params, trajectory.batches)]
    embeddings = []
    for t, rows in enumerate(grads):
        vectors = 0.2 / len(rows) * rows
        for later in grads[t + 1:]:
            vectors = vectors - 0.2 / len(later) * (vectors @ later.T) @ later
        embeddings.append(vectors)
    test = _float64(test_batch)
    final = {k: v.detach() for k, v in model.named_parameters()}
    expected = _per_sample_grads(model, final, test) @ torch.cat(embeddings).T
    result = dve.embeddings.influence(model, test, per_step=True)
    assert torch.equal(result.sample_ids, torch.cat([b["index"] for b in trajectory.batches]))
    torch.testing.assert_close(result.scores, expected, rtol=1e-9, atol=1e-13)


class SecondMoments(L.Callback):
    """The LayerNorm's AdamW second moment and step count after every step."""

    def __init__(self) -> None:
        self.rows: list[tuple[torch.Tensor, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        state = trainer.optimizers[0].state
        weight, bias = pl_module.ln.weight, pl_module.ln.bias
        v = torch.stack([state[weight]["exp_avg_sq"].flatten(), state[bias]["exp_avg_sq"].flatten()], dim=1)  # [d, 2]
        self.rows.append((v.clone(), float(state[weight]["step"])))


def test_the_recorded_adam_preconditioner_of_a_layer_norm_is_torchs_in_the_block_layout(
        fit: Callable, tmp_path: Path) -> None:
    """Exact mode: the recorded ``1 / (sqrt(v_hat) + eps)`` of ``ln`` is torch's, weight column then bias column."""
    probe = SecondMoments()
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None, report=None)
    fit(TokenNorm("adamw").double(), dve, precision="64-true", callbacks=[probe])
    store = TrajectoryStore.open(tmp_path / "dve")
    assert [layer["kind"] for layer in store.manifest["layers"]] == ["linear", "layer_norm", "rms_norm", "linear"]
    for step, (v, count) in enumerate(probe.rows):
        expected = 1.0 / ((v / (1 - 0.99**count)).sqrt() + 1e-8)
        recorded = store.read_step(step).vectors["precond"]["ln"].reshape(48, 2)  # [weight | bias] columns
        torch.testing.assert_close(recorded, expected, rtol=1e-12, atol=0)


class LayerNorm2d(nn.LayerNorm):
    """timm's channels-first LayerNorm: the input ``[B, C, H, W]`` permuted to channels last, normalised, back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_a_norm_subclass_with_its_own_forward_and_a_norm_without_parameters_are_refused() -> None:
    """The hook cannot read a ``LayerNorm2d``'s channels-first input as a LayerNorm's (a raw torch error from the
    capture before the refusal); a LayerNorm without affine parameters named in ``layers=`` has nothing to track
    (it was called parametrised)."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), LayerNorm2d(4), nn.Flatten(), nn.Linear(4 * 64, 3))
    capture = GradientCapture(resolve_layers(model, DVEConfig()))
    capture.attach()
    capture.begin()
    with pytest.raises(UnsupportedError, match=r"layer '1' \(LayerNorm2d\): its forward does not apply the layer "
                                               r"to its input.*timm's LayerNorm2d.*nn.GroupNorm\(1, C\).*"
                                               r"exclude=\('1',\)"):
        model(torch.randn(2, 1, 8, 8))
    plain = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4, elementwise_affine=False), nn.Linear(4, 2))
    with pytest.raises(UnsupportedError, match=r"layer '1' \(LayerNorm\) has no parameters of its own.*Leave it out"):
        resolve_layers(plain, DVEConfig(layers=("0", "1", "2")))
    assert list(resolve_layers(plain, DVEConfig())) == ["0", "2"]


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                                "2147483648 bytes")])
def test_running_out_of_memory_in_the_capture_is_raised_as_it_is(monkeypatch: pytest.MonkeyPatch,
                                                                   error: RuntimeError) -> None:
    """Not as a layer whose forward does not apply its maths (a reviewer's finding): Lightning's own handling and
    the user's fix (a smaller batch) depend on seeing it."""
    from lightning_dve import layers_norm

    def fail(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise error

    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    capture = GradientCapture(resolve_layers(model, DVEConfig()))
    capture.attach()
    capture.begin()
    monkeypatch.setattr(layers_norm, "_features_last", fail)  # in the hook only, after the module's own forward
    with pytest.raises(type(error), match="allocate") as info:
        model(torch.randn(2, 3))
    assert not isinstance(info.value, UnsupportedError)
