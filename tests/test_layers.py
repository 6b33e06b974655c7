"""Hooked per-sample gradients against a per-example backward loop (the batch-size-1 oracle).

The capture under test (``GradientCapture``) builds every sample's gradient block from the one batched backward
of the training loss (method.md §3). The oracle runs the model on one sample at a time and differentiates that
sample's own loss ``l_i`` (never divided by the batch size) with ``torch.autograd.grad``. Everything is float64
so exact agreement is checked to ~1e-10.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_dve.capture import GradientCapture, resolve_layers
from lightning_dve.config import DVEConfig
from lightning_dve.errors import ConfigError, UnsupportedError
from lightning_dve.layers import split_block

DTYPE = torch.float64
ATOL = 1e-10


# --- helpers -------------------------------------------------------------------------------------------


def per_sample_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Nonlinear per-sample loss ``[B]``: summed over every non-batch dim (tokens, pixels, features)."""
    return (0.5 * (out - target) ** 2 + 0.1 * torch.tanh(out) ** 3).flatten(1).sum(1)


def batch_weights(kind: str, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample weights ``w`` inside the loss: 1/B (mean), 1 (sum) or an arbitrary positive vector."""
    if kind == "mean":
        return torch.full((batch,), 1.0 / batch, dtype=DTYPE)
    if kind == "sum":
        return torch.ones(batch, dtype=DTYPE)
    return 0.25 + torch.rand(batch, dtype=DTYPE, generator=generator) * 2.0


def reduce_loss(losses: torch.Tensor, kind: str, weights: torch.Tensor) -> torch.Tensor:
    """The training loss as the user would write it (``mean()`` / ``sum()`` / an explicit weighted sum)."""
    if kind == "mean":
        return losses.mean()
    if kind == "sum":
        return losses.sum()
    return (weights * losses).sum()


def make_capture(model: nn.Module, **config) -> tuple[dict, GradientCapture]:
    config.setdefault("projection_dim", None)
    tracked = resolve_layers(model, DVEConfig(**config))
    capture = GradientCapture(tracked)
    capture.attach()
    return tracked, capture


def captured_grads(
    capture: GradientCapture, model: nn.Module, x: torch.Tensor, target: torch.Tensor, kind: str,
    weights: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """One hooked training step: begin, forward, backward of the reduced loss, finish(weights)."""
    model.zero_grad(set_to_none=True)
    capture.begin()
    loss = reduce_loss(per_sample_loss(model(x), target), kind, weights)
    loss.backward()
    return capture.finish(weights)


def oracle_grads(model: nn.Module, module: nn.Module, x: torch.Tensor, target: torch.Tensor) -> list[dict]:
    """Per-example loop: ``grad l_i`` w.r.t. ``module``'s trainable parameters, one sample at a time."""
    names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    params = [getattr(module, n) for n in names]
    out = []
    for i in range(x.shape[0]):
        loss_i = per_sample_loss(model(x[i : i + 1]), target[i : i + 1])[0]
        grads = torch.autograd.grad(loss_i, params, allow_unused=True)
        out.append({n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)})
    return out


def assert_matches_oracle(
    model: nn.Module, tracked: dict, grads: dict[str, torch.Tensor], x: torch.Tensor, target: torch.Tensor
) -> None:
    for name, layer in tracked.items():
        block = grads[name]
        assert block.shape == (x.shape[0], layer.projection.dim)
        assert block.dtype == DTYPE
        expected = oracle_grads(model, layer.module, x, target)
        for i, exp in enumerate(expected):
            got = split_block(layer.module, block[i])
            assert set(got) == set(exp), (name, sorted(got), sorted(exp))
            for pname, value in exp.items():
                torch.testing.assert_close(got[pname], value, atol=ATOL, rtol=0, msg=f"{name}.{pname} sample {i}")


def exact_block(module: nn.Module, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Exact per-sample block ``G [d_out, d_in]`` from parameter gradients (written independently of the package)."""
    if isinstance(module, nn.Embedding):
        return grads["weight"].T
    weight = grads["weight"].reshape(grads["weight"].shape[0], -1)
    if "bias" in grads:
        return torch.cat([weight, grads["bias"].unsqueeze(1)], dim=1)
    return weight


class Twice(nn.Module):
    """One square Linear applied twice in one forward (weight sharing), then a head."""

    def __init__(self, d: int, d_out: int) -> None:
        super().__init__()
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class TokenModel(nn.Module):
    """Embedding -> Linear over a token sequence."""

    def __init__(self, vocab: int, dim: int, d_out: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.proj = nn.Linear(dim, d_out)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.emb(idx)))


# --- nn.Linear -----------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 5),
    tokens=st.one_of(st.none(), st.integers(1, 4)),
    d_in=st.integers(1, 6),
    d_hidden=st.integers(1, 6),
    d_out=st.integers(1, 6),
    bias=st.booleans(),
    kind=st.sampled_from(["mean", "sum", "weights"]),
    seed=st.integers(0, 2**16),
)
def test_linear_matches_per_example_loop(batch, tokens, d_in, d_hidden, d_out, bias, kind, seed):
    """2-D inputs ``[B, d]`` and token sequences ``[B, T, d]`` (per-sample gradient sums over positions)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_hidden, bias=bias), nn.Tanh(), nn.Linear(d_hidden, d_out)).to(DTYPE)
    shape = (batch, d_in) if tokens is None else (batch, tokens, d_in)
    x = torch.randn(*shape, dtype=DTYPE)
    target = torch.randn(*shape[:-1], d_out, dtype=DTYPE)
    tracked, capture = make_capture(model)
    assert list(tracked) == ["0", "2"]
    weights = batch_weights(kind, batch)
    grads = captured_grads(capture, model, x, target, kind, weights)
    assert_matches_oracle(model, tracked, grads, x, target)


@pytest.mark.parametrize("kind", ["mean", "sum"])
def test_captured_blocks_sum_to_the_training_gradient(kind):
    """sum_i w_i g_i equals the ``.grad`` the optimizer sees (the scale convention of method.md §2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)).to(DTYPE)
    x, target = torch.randn(6, 3, 5, dtype=DTYPE), torch.randn(6, 3, 3, dtype=DTYPE)
    tracked, capture = make_capture(model)
    weights = batch_weights(kind, 6)
    grads = captured_grads(capture, model, x, target, kind, weights)
    for name, layer in tracked.items():
        total = (weights.unsqueeze(1) * grads[name]).sum(0)
        got = split_block(layer.module, total)
        torch.testing.assert_close(got["weight"], layer.module.weight.grad, atol=ATOL, rtol=0)
        if "bias" in got:
            torch.testing.assert_close(got["bias"], layer.module.bias.grad, atol=ATOL, rtol=0)


def test_linear_frozen_bias_has_no_bias_column():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3)).to(DTYPE)
    model[0].bias.requires_grad_(False)
    x, target = torch.randn(3, 4, dtype=DTYPE), torch.randn(3, 3, dtype=DTYPE)
    tracked, capture = make_capture(model)
    assert tracked["0"].projection.dim == 3 * 4
    grads = captured_grads(capture, model, x, target, "mean", batch_weights("mean", 3))
    assert set(split_block(model[0], grads["0"][0])) == {"weight"}
    assert_matches_oracle(model, tracked, grads, x, target)


@pytest.mark.parametrize("tokens", [None, 3])
def test_module_called_twice_sums_both_calls(tokens):
    torch.manual_seed(2)
    model = Twice(4, 2).to(DTYPE)
    shape = (5, 4) if tokens is None else (5, tokens, 4)
    x = torch.randn(*shape, dtype=DTYPE)
    target = torch.randn(*shape[:-1], 2, dtype=DTYPE)
    tracked, capture = make_capture(model)
    grads = captured_grads(capture, model, x, target, "mean", batch_weights("mean", 5))
    assert_matches_oracle(model, tracked, grads, x, target)


class ScaledOutput(nn.Module):
    """A Linear whose output gradient the model rescales per feature with its own tensor hook, registered in the
    forward after the capture's (gradient scaling; the negative factor reverses, as in domain adaptation)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)
        self.scale = torch.tensor([-1.0, 0.1, 1.0, 2.0], dtype=DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        h.register_hook(lambda g: g * self.scale)
        return self.head(torch.tanh(h))


def test_a_gradient_hook_of_the_model_on_a_tracked_output_acts_before_the_rows_are_taken():
    """The rows hold the gradient the model's own output hook hands on, as ``.grad`` does (before, the capture's
    hook, registered first, read it unscaled: rows off by the hook's factors, silently where the weight check did
    not run)."""
    torch.manual_seed(5)
    model = ScaledOutput().to(DTYPE)
    x, target = torch.randn(6, 5, dtype=DTYPE), torch.randn(6, 3, dtype=DTYPE)
    tracked, capture = make_capture(model)
    weights = batch_weights("mean", 6)
    capture.begin()
    loss = reduce_loss(per_sample_loss(model(x), target), "mean", weights)
    capture.start_backward()  # the training loop's on_before_backward
    loss.backward()
    grads = capture.finish(weights)
    assert_matches_oracle(model, tracked, grads, x, target)
    total = split_block(model.hidden, (weights.unsqueeze(1) * grads["hidden"]).sum(0))
    torch.testing.assert_close(total["weight"], model.hidden.weight.grad, atol=ATOL, rtol=0)


def test_a_model_with_no_trainable_supported_layer_is_refused_naming_the_frozen_ones():
    """The refusal listed the supported types only, though the Linear it needed was there and frozen (an audit of
    session 39)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    with pytest.raises(ConfigError, match=r"no layer to track in Sequential \(layers=None, exclude=\('2',\); frozen "
                                          r"supported layers: \['0'\]\): .* Unfreeze one, or change layers=/exclude="):
        resolve_layers(model, DVEConfig(exclude=("2",)))


def test_custom_weight_vector_including_zero():
    """A weighted loss: dividing by w_i recovers grad l_i; a sample with w_i = 0 gets a zero gradient."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    x, target = torch.randn(4, 3, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE)
    weights = torch.tensor([0.3, 2.0, 0.0, 1.5], dtype=DTYPE)
    tracked, capture = make_capture(model)
    grads = captured_grads(capture, model, x, target, "weights", weights)
    keep = torch.tensor([0, 1, 3])
    for name in tracked:
        assert torch.equal(grads[name][2], torch.zeros_like(grads[name][2]))
    assert_matches_oracle(model, tracked, {n: g[keep] for n, g in grads.items()}, x[keep], target[keep])


def test_layer_the_backward_never_reaches_gets_zeros():
    torch.manual_seed(4)

    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.unused(x)  # called, but its output does not enter the loss
            return self.used(x)

    model = Branches().to(DTYPE)
    x, target = torch.randn(3, 3, dtype=DTYPE), torch.randn(3, 2, dtype=DTYPE)
    tracked, capture = make_capture(model)
    grads = captured_grads(capture, model, x, target, "sum", batch_weights("sum", 3))
    assert torch.equal(grads["unused"], torch.zeros(3, 2 * 4, dtype=DTYPE))
    assert_matches_oracle(model, {"used": tracked["used"]}, grads, x, target)


# --- nn.Conv2d -----------------------------------------------------------------------------------------


def _conv_model(c_in: int, c_out: int, kernel, stride, padding, dilation, bias: bool, groups: int = 1,
                padding_mode: str = "zeros", spatial: int = 2) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial]
    return nn.Sequential(conv(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias,
                              groups=groups, padding_mode=padding_mode)).to(DTYPE)


def _check_conv(model: nn.Module, batch: int, c_in: int, *sizes: int, kind: str = "mean") -> None:
    x = torch.randn(batch, c_in, *sizes, dtype=DTYPE)
    with torch.no_grad():
        target = torch.randn_like(model(x))
    tracked, capture = make_capture(model)
    grads = captured_grads(capture, model, x, target, kind, batch_weights(kind, batch))
    assert_matches_oracle(model, tracked, grads, x, target)


def _input_size(kernel: int, dilation: int, padding: int | str, padding_mode: str, extra: int) -> int:
    """A spatial size the convolution accepts: at least its effective kernel, and at least the padding where the
    padding mode reads the input (reflect needs more than the padding)."""
    pad = 0 if isinstance(padding, str) else padding
    size = max(1, dilation * (kernel - 1) + 1 - 2 * pad) + extra
    return max(size, dilation * (kernel - 1) + 1 if padding_mode != "zeros" else 1, pad + 1)


_conv_settings = dict(
    batch=st.integers(1, 4),
    group_channels=st.tuples(st.integers(1, 2), st.integers(1, 3)),
    groups=st.sampled_from([1, 1, 2, 3]),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding_mode=st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]),
    bias=st.booleans(),
    kind=st.sampled_from(["mean", "sum", "weights"]),
    seed=st.integers(0, 2**16),
)


@settings(max_examples=30, deadline=None)
@given(
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.one_of(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.just("same"), st.just("valid")),
    extra=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    **_conv_settings,
)
def test_conv2d_matches_per_example_loop(batch, group_channels, groups, kernel, stride, dilation, padding, extra,
                                         padding_mode, bias, kind, seed):
    """Any padding (even kernels under 'same' pad one more zero on the right, as torch does), padding mode, stride,
    dilation and group count, against the per-example loop."""
    torch.manual_seed(seed)
    stride = 1 if padding == "same" else stride  # torch refuses padding='same' with stride > 1
    sizes = [_input_size(k, dilation, p, padding_mode, e)
             for k, p, e in zip(kernel, padding if isinstance(padding, tuple) else (padding, padding), extra)]
    c_in, c_out = group_channels[0] * groups, group_channels[1] * groups
    model = _conv_model(c_in, c_out, kernel, stride, padding, dilation, bias, groups, padding_mode)
    _check_conv(model, batch, c_in, *sizes, kind=kind)


@settings(max_examples=30, deadline=None)
@given(kernel=st.integers(1, 4), padding=st.one_of(st.integers(0, 2), st.just("same"), st.just("valid")),
       extra=st.integers(0, 3), **_conv_settings)
def test_conv1d_matches_per_example_loop(batch, group_channels, groups, kernel, stride, dilation, padding, extra,
                                         padding_mode, bias, kind, seed):
    torch.manual_seed(seed)
    stride = 1 if padding == "same" else stride
    c_in, c_out = group_channels[0] * groups, group_channels[1] * groups
    model = _conv_model(c_in, c_out, kernel, stride, padding, dilation, bias, groups, padding_mode, spatial=1)
    _check_conv(model, batch, c_in, _input_size(kernel, dilation, padding, padding_mode, extra), kind=kind)


def test_a_depthwise_convolution_keeps_only_its_input_until_the_backward():
    """Its patches with the groups apart are ``[B, P, C, 10]`` for a 3x3 kernel, ten times the input, held from
    the forward to the backward; the block is formed in the backward from the input itself instead."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8)).to(DTYPE)
    _, capture = make_capture(model, projection_dim=64)
    capture.begin()
    x = torch.randn(2, 8, 6, 6, dtype=DTYPE, requires_grad=True)
    model(x)
    (held,) = capture._inputs["0"]
    assert held.data_ptr() == x.data_ptr() and held.shape == x.shape


@settings(max_examples=20, deadline=None)
@given(kernel=st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(1, 3)),
       padding=st.one_of(st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, 1)), st.just("same"),
                         st.just("valid")),
       extra=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)), **_conv_settings)
def test_conv3d_matches_per_example_loop(batch, group_channels, groups, kernel, stride, dilation, padding, extra,
                                         padding_mode, bias, kind, seed):
    """``F.unfold`` takes two spatial dims; a 3-D convolution's patches come from strided windows instead."""
    torch.manual_seed(seed)
    stride = 1 if padding == "same" else stride
    sizes = [_input_size(k, dilation, p, padding_mode, e)
             for k, p, e in zip(kernel, padding if isinstance(padding, tuple) else (padding,) * 3, extra)]
    c_in, c_out = group_channels[0] * groups, group_channels[1] * groups
    model = _conv_model(c_in, c_out, kernel, stride, padding, dilation, bias, groups, padding_mode, spatial=3)
    _check_conv(model, batch, c_in, *sizes, kind=kind)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [
        (3, 1, 0, 1),
        (3, 2, 1, 1),
        ((2, 3), (2, 1), (1, 0), (1, 2)),
        (3, 1, "same", 1),
        (3, 1, "same", 2),
        (2, 1, "same", 2),  # even kernel but even effective size d*(k-1) = 2: symmetric padding
        (2, 1, "same", 1),  # odd effective size: one more zero on the right, as torch pads it
        ((1, 3), 1, "same", (3, 1)),
        (3, 1, "valid", 1),
        (1, 1, 0, 1),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_variants(kernel, stride, padding, dilation, bias):
    torch.manual_seed(5)
    model = _conv_model(2, 3, kernel, stride, padding, dilation, bias)
    _check_conv(model, 3, 2, 7, 6)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_depthwise_and_grouped_convolutions_match_per_example_loop(padding_mode):
    """A depthwise convolution (groups = channels, as in MobileNet and ConvNeXt) then a grouped one, with every
    padding mode: the per-group blocks against the per-example loop."""
    torch.manual_seed(12)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode=padding_mode), nn.Tanh(),
        nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode=padding_mode, bias=False), nn.Tanh(),
        nn.Flatten(2), nn.Conv1d(6, 6, 3, padding=1, groups=3, padding_mode=padding_mode),  # [B, 6, 5 * 4]
    ).to(DTYPE)
    x = torch.randn(3, 4, 5, 4, dtype=DTYPE)
    target = torch.randn(3, 6, 20, dtype=DTYPE)
    tracked, capture = make_capture(model)
    grads = captured_grads(capture, model, x, target, "mean", batch_weights("mean", 3))
    assert_matches_oracle(model, tracked, grads, x, target)


def test_conv2d_in_a_cnn_with_inplace_relu():
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(3, 2, 3, stride=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(2 * 2 * 2, 3),
    ).to(DTYPE)
    x = torch.randn(4, 1, 6, 6, dtype=DTYPE)
    target = torch.randn(4, 3, dtype=DTYPE)
    tracked, capture = make_capture(model)
    assert list(tracked) == ["0", "2", "5"]
    grads = captured_grads(capture, model, x, target, "mean", batch_weights("mean", 4))
    assert_matches_oracle(model, tracked, grads, x, target)


# --- nn.Embedding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_idx", [None, 0, 3])
@pytest.mark.parametrize("index_shape", [(5,), (5, 4), (5, 2, 3)])
def test_embedding_matches_per_example_loop(padding_idx, index_shape):
    torch.manual_seed(7)
    model = TokenModel(vocab=6, dim=3, d_out=2, padding_idx=padding_idx).to(DTYPE)
    idx = torch.randint(0, 6, index_shape)
    idx.view(-1)[::3] = 3  # repeated tokens (and the padding row when padding_idx == 3)
    idx.view(-1)[1] = 0
    target = torch.randn(*index_shape, 2, dtype=DTYPE)
    tracked, capture = make_capture(model)
    grads = captured_grads(capture, model, idx, target, "mean", batch_weights("mean", index_shape[0]))
    assert_matches_oracle(model, tracked, grads, idx, target)
    if padding_idx is not None:
        rows = torch.stack([split_block(model.emb, g)["weight"][padding_idx] for g in grads["emb"]])
        assert torch.equal(rows, torch.zeros_like(rows))


@pytest.mark.parametrize("projection_dim", [None, 4])
def test_embedding_with_int32_ids_matches_per_example_loop(projection_dim):
    """``nn.Embedding`` takes int32 ids as well as int64: the exact mode's one-hot rows must too (it raised a raw
    ``one_hot is only applicable to index tensor of type LongTensor`` from inside the forward hook)."""
    torch.manual_seed(16)
    model = TokenModel(vocab=6, dim=3, d_out=2, padding_idx=0).to(DTYPE)
    idx = torch.randint(0, 6, (4, 5), dtype=torch.int32)
    idx[:, 0] = 0
    target = torch.randn(4, 5, 2, dtype=DTYPE)
    tracked, capture = make_capture(model, projection_dim=projection_dim)
    grads = captured_grads(capture, model, idx, target, "mean", batch_weights("mean", 4))
    expected = captured_grads(capture, model, idx.long(), target, "mean", batch_weights("mean", 4))
    for name in tracked:
        torch.testing.assert_close(grads[name], expected[name], atol=0, rtol=0)
    if projection_dim is None:
        assert_matches_oracle(model, tracked, grads, idx, target)


# --- Kronecker projection (method.md §3) ---------------------------------------------------------------


def _check_kronecker(model: nn.Module, x: torch.Tensor, target: torch.Tensor, projection_dim: int, kind: str):
    tracked, capture = make_capture(model, projection_dim=projection_dim, seed=11)
    batch = x.shape[0]
    weights = batch_weights(kind, batch, torch.Generator().manual_seed(0))
    grads = captured_grads(capture, model, x, target, kind, weights)
    for name, layer in tracked.items():
        p_out = layer.projection.output.matrix()
        p_in = layer.projection.input.matrix()
        d_out, d_in = layer.spec.dims(layer.module)
        assert p_out.shape[1] == d_out and p_in.shape[1] == d_in
        assert p_out.shape[0] < d_out and p_in.shape[0] < d_in, "the test must project both sides"
        kron = torch.kron(p_out, p_in)
        for i, exact in enumerate(oracle_grads(model, layer.module, x, target)):
            g_exact = exact_block(layer.module, exact)
            assert g_exact.shape == (d_out, d_in)
            expected = kron @ g_exact.reshape(-1)
            torch.testing.assert_close(grads[name][i], expected, atol=ATOL, rtol=0, msg=f"{name} sample {i}")


def test_kronecker_identity_linear_tokens():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 5)).to(DTYPE)
    x, target = torch.randn(4, 3, 7, dtype=DTYPE), torch.randn(4, 3, 5, dtype=DTYPE)
    _check_kronecker(model, x, target, projection_dim=12, kind="weights")


def test_kronecker_identity_conv2d():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1, stride=2)).to(DTYPE)
    x = torch.randn(3, 2, 6, 5, dtype=DTYPE)
    target = torch.randn(3, 5, 3, 3, dtype=DTYPE)
    _check_kronecker(model, x, target, projection_dim=12, kind="mean")


@pytest.mark.parametrize("bias", [True, False])
def test_kronecker_identity_grouped_conv1d(bias):
    """A grouped convolution's block is formed per group before the output side's projection: the projected rows
    still equal ``(P_out kron P_in) vec(G)`` of the exact per-sample gradient."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Conv1d(6, 9, 3, padding=1, groups=3, padding_mode="reflect", bias=bias)).to(DTYPE)
    x = torch.randn(3, 6, 7, dtype=DTYPE)
    target = torch.randn(3, 9, 7, dtype=DTYPE)
    _check_kronecker(model, x, target, projection_dim=12, kind="weights")


def test_kronecker_identity_embedding():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Embedding(10, 6, padding_idx=2)).to(DTYPE)
    idx = torch.randint(0, 10, (4, 5))
    idx[:, 0] = 2
    idx[:, 1] = 7
    target = torch.randn(4, 5, 6, dtype=DTYPE)
    _check_kronecker(model, idx, target, projection_dim=8, kind="sum")


# --- hooks are inert outside begin/finish --------------------------------------------------------------


def _assert_idle(capture: GradientCapture) -> None:
    assert not capture.captured
    assert capture.outputs == []
    assert all(not pending for pending in capture._inputs.values())


def test_hooks_do_nothing_outside_begin_finish():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    tracked, capture = make_capture(model)
    x1, t1 = torch.randn(3, 3, dtype=DTYPE), torch.randn(3, 2, dtype=DTYPE)
    x2, t2 = torch.randn(2, 3, dtype=DTYPE), torch.randn(2, 2, dtype=DTYPE)

    # attached but never begun: nothing is recorded
    per_sample_loss(model(x1), t1).sum().backward()
    _assert_idle(capture)

    grads = captured_grads(capture, model, x1, t1, "mean", batch_weights("mean", 3))
    assert_matches_oracle(model, tracked, grads, x1, t1)

    # after finish: a forward/backward (e.g. validation with grad) leaves no state
    per_sample_loss(model(x2), t2).sum().backward()
    _assert_idle(capture)
    with torch.no_grad():
        model(x2)
    _assert_idle(capture)

    # and the next step sees only its own batch
    grads = captured_grads(capture, model, x2, t2, "sum", batch_weights("sum", 2))
    assert_matches_oracle(model, tracked, grads, x2, t2)

    # detach removes the hooks: begin + backward records nothing
    capture.detach()
    capture.begin()
    per_sample_loss(model(x2), t2).sum().backward()
    _assert_idle(capture)


def test_backward_after_abort_is_ignored():
    """A graph built during a step that is then aborted must not touch the capture when backpropagated."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(3, 2)).to(DTYPE)
    tracked, capture = make_capture(model)
    capture.begin()
    loss = per_sample_loss(model(torch.randn(2, 3, dtype=DTYPE)), torch.zeros(2, 2, dtype=DTYPE)).sum()
    capture.abort()
    loss.backward()
    _assert_idle(capture)


def test_graph_of_an_aborted_step_does_not_leak_into_the_next_step():
    """Hooks registered in an aborted step must not fire into the next step's state (same layer, same call
    index 0): the next step must still capture exactly its own per-sample gradients."""
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(3, 2)).to(DTYPE)
    tracked, capture = make_capture(model)
    x1, t1 = torch.randn(2, 3, dtype=DTYPE), torch.randn(2, 2, dtype=DTYPE)
    x2, t2 = torch.randn(2, 3, dtype=DTYPE), torch.randn(2, 2, dtype=DTYPE)
    capture.begin()
    stale = per_sample_loss(model(x1), t1).sum()
    capture.abort()
    capture.begin()
    fresh = per_sample_loss(model(x2), t2).sum()
    stale.backward()
    assert not capture.captured
    fresh.backward()
    grads = capture.finish(torch.ones(2, dtype=DTYPE))
    assert_matches_oracle(model, tracked, grads, x2, t2)


def test_second_backward_after_finish_is_ignored():
    """``retain_graph`` + a second backward after ``finish`` must leave the capture idle."""
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(3, 2)).to(DTYPE)
    tracked, capture = make_capture(model)
    x, target = torch.randn(2, 3, dtype=DTYPE), torch.randn(2, 2, dtype=DTYPE)
    capture.begin()
    loss = per_sample_loss(model(x), target).sum()
    loss.backward(retain_graph=True)
    capture.finish(torch.ones(2, dtype=DTYPE))
    loss.backward()
    _assert_idle(capture)


# --- unsupported layers --------------------------------------------------------------------------------


def _frozen_weight() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[1].weight.requires_grad_(False)  # bias still trains
    return model


class _WithPReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.act = nn.PReLU(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


@pytest.mark.parametrize(
    ("build", "layer", "reason"),
    [
        (_frozen_weight, "1", r"capture needs a trainable 'weight' and at most a 'bias' \(a frozen weight with a "
                                r"trained bias: bias-only fine-tuning, BitFit\)"),
        (_WithPReLU, "act",
         r"PReLU\) is not a supported layer type; supported types are BatchNorm1d, BatchNorm2d, BatchNorm3d, "
         r"Conv1D \(transformers\), Conv1d, Conv2d, Conv3d, Embedding, GroupNorm, LayerNorm, Linear, RMSNorm, "
         r"SyncBatchNorm"),
        (lambda: nn.Sequential(nn.ConvTranspose2d(2, 4, 3)), "0", r"ConvTranspose2d\) is not a supported layer type"),
        (lambda: nn.Sequential(nn.Embedding(5, 3, max_norm=1.0)), "0", r"max_norm=1\.0"),
        (lambda: nn.Sequential(nn.Embedding(5, 3, sparse=True)), "0", r"sparse=True: its weight gets a sparse gradient"),
        (lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))), "0", r"parametrised weight"),
    ],
)
def test_unsupported_layer_is_refused_naming_it_and_exclude(build, layer, reason):
    model = build()
    with pytest.raises(UnsupportedError, match=reason) as info:
        resolve_layers(model, DVEConfig(projection_dim=None))
    message = str(info.value)
    assert f"layer {layer!r}" in message
    assert "exclude" in message
    # the advice works: excluding the layer leaves the rest trackable
    if layer != "0":
        tracked = resolve_layers(model, DVEConfig(projection_dim=None, exclude=(layer,)))
        assert layer not in tracked


def test_every_unsupported_layer_of_a_transformer_stack_is_named_at_once_with_working_patterns():
    """A stack of ``nn.TransformerEncoderLayer`` has an attention in every block: one refusal names them all and
    gives ``exclude=`` patterns that leave out exactly those (children included), not one module per fit; a pattern
    that would also leave out a supported layer falls back to the exact names. Its LayerNorms are tracked."""
    stack = nn.Sequential(*(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True) for _ in range(2)))
    model = nn.ModuleDict({"enc": stack, "ln_f": nn.LayerNorm(8), "head": nn.Linear(8, 5)})
    with pytest.raises(UnsupportedError) as info:
        resolve_layers(model, DVEConfig(projection_dim=None))
    message = str(info.value)
    for block in ("enc.0", "enc.1"):
        assert f"'{block}.self_attn' (MultiheadAttention)" in message and f"'{block}.norm2'" not in message
    assert "exclude=('*.self_attn',) to train all 2" in message
    assert "build it from nn.Linear" in message
    tracked = resolve_layers(model, DVEConfig(projection_dim=None, exclude=("*.self_attn",)))
    assert list(tracked) == [f"enc.{i}.{name}" for i in (0, 1) for name in ("linear1", "linear2", "norm1", "norm2")] \
        + ["ln_f", "head"]

    model["extra"] = nn.ModuleDict({"self_attn": nn.Linear(8, 8)})  # a supported layer under the same last name
    with pytest.raises(UnsupportedError, match=r"exclude=\('enc\.0\.self_attn', 'enc\.1\.self_attn'\)"):
        resolve_layers(model, DVEConfig(projection_dim=None))


def test_two_unsupported_layers_are_named_in_one_refusal():
    """Two is already several: both modules are named at once with patterns for both, not one per fit."""
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(4), nn.Linear(4, 4), nn.PReLU(4), nn.Linear(4, 2))
    with pytest.raises(UnsupportedError, match=r"layers '1' \(PReLU\), '3' \(PReLU\) are not of a supported "
                                               r"layer type.*exclude=\('1', '3'\) to train all 2"):
        resolve_layers(model, DVEConfig(projection_dim=None))


def test_unsupported_layer_named_explicitly_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(4, 4, max_norm=1.0))
    with pytest.raises(UnsupportedError, match=r"layer '1' \(Embedding\) uses max_norm=1.0.*Add '1' to `exclude=`"):
        resolve_layers(model, DVEConfig(projection_dim=None, layers=("0", "1")))
    assert list(resolve_layers(model, DVEConfig(projection_dim=None, layers=("0",)))) == ["0"]


def test_a_single_multihead_attention_is_refused_with_the_fix_that_applies_to_it():
    """One ``nn.MultiheadAttention`` was told to move its ``in_proj_weight`` into a submodule of its own so that
    ``out_proj`` stays tracked, which torch's module does not allow (and ``out_proj`` is used functionally)."""
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, batch_first=True), "head": nn.Linear(8, 3)})
    with pytest.raises(UnsupportedError) as info:
        resolve_layers(model, DVEConfig(projection_dim=None))
    message = str(info.value)
    assert "Add 'attn' to `exclude=`" in message and "build it from nn.Linear modules" in message
    assert "into a submodule of their own" not in message


def test_a_frozen_layer_named_in_layers_is_refused_as_frozen():
    """Its message was the one for a frozen weight with a trained bias (BitFit), with the bias frozen too."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[1].requires_grad_(False)
    with pytest.raises(UnsupportedError, match=r"layer '1' \(Linear\) is frozen \(no parameter of it trains\)"):
        resolve_layers(model, DVEConfig(projection_dim=None, layers=("0", "1")))
    model[1].bias.requires_grad_(True)
    with pytest.raises(UnsupportedError, match=r"trains parameters \['bias'\].*a frozen weight with a trained bias"):
        resolve_layers(model, DVEConfig(projection_dim=None, layers=("0", "1")))


def test_a_lazy_layer_not_yet_initialised_is_refused_naming_it_and_exclude():
    """A ``LazyLinear`` whose first forward has not run yet has no shape: refused with the layer's name and the
    fix, not a raw torch ``ValueError`` from the first use of its uninitialised weight."""
    model = nn.Sequential(nn.LazyLinear(3), nn.Tanh(), nn.Linear(3, 2))
    with pytest.raises(UnsupportedError,
                       match=r"layer '0' \(LazyLinear\) is a lazy module.*Run the model once.*exclude"):
        resolve_layers(model, DVEConfig(projection_dim=None))
    assert list(resolve_layers(model, DVEConfig(projection_dim=None, exclude=("0",)))) == ["2"]
    model(torch.randn(2, 5))  # initialised: tracked like a Linear
    assert list(resolve_layers(model, DVEConfig(projection_dim=None))) == ["0", "2"]


def test_embedding_scale_grad_by_freq_is_refused():
    """``scale_grad_by_freq`` divides each row's gradient by the token's count in the whole *batch*: a sample's
    gradient then depends on the other samples (like BatchNorm), and the hooked blocks do not sum to ``.grad``.
    It must be refused like ``max_norm``, not captured silently wrong."""
    model = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True)).to(DTYPE)
    with pytest.raises(UnsupportedError, match=r"layer '0' \(Embedding\).*scale_grad_by_freq.*exclude"):
        resolve_layers(model, DVEConfig(projection_dim=None))


def test_an_exclude_pattern_that_matches_no_module_warns_naming_it():
    """``exclude=("nomatch*",)`` was taken without a word: a typo leaves the layer tracked."""
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    with pytest.warns(UserWarning, match=r"exclude patterns \['nomatch\*', 'net.2'\] match no module of Sequential "
                                         r"\(a typo\?\); its modules are named like \['0', '1', '2'\]"):
        tracked = resolve_layers(net, DVEConfig(exclude=("nomatch*", "net.2", "1")))
    assert list(tracked) == ["0", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(resolve_layers(net, DVEConfig(exclude=("2",)))) == ["0"]


class ScaledBlock(nn.Module):
    """A block holding a parameter of its own (LayerScale's ``gamma``) next to a supported layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.gamma = nn.Linear(4, 4), nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.fc(x)


@pytest.mark.parametrize("blocks", [1, 2])
def test_a_block_holding_its_own_parameter_names_the_fix_that_keeps_its_layers(blocks):
    """Excluding the block (the only exclude the message could name) also leaves its Linear out: the message says
    so and names moving the block's own parameters into a submodule."""
    net = nn.Sequential(*[ScaledBlock() for _ in range(blocks)], nn.Linear(4, 2))
    names = [str(i) for i in range(blocks)]
    with pytest.raises(UnsupportedError, match=rf"Excluding {re.escape(repr(names))} leaves their supported child "
                                               r"layers untracked as well; to keep those, move the parameters they "
                                               r"hold themselves \({'0': \['gamma'\]"):
        resolve_layers(net, DVEConfig())


def test_parameters_the_model_holds_itself_are_refused_naming_both_fixes():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.scale = nn.Linear(4, 2), nn.Parameter(torch.ones(2))

    with pytest.raises(UnsupportedError, match=r"Scaled itself owns trainable parameters \['scale'\]; capture tracks "
                                               r"submodules only\. Move them into a supported submodule .*or into a "
                                               r"submodule of their own passed in exclude="):
        resolve_layers(Scaled(), DVEConfig())
