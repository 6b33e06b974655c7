"""Queries on a finished recording: layer matching, side effects, loss paths, aggregation and rankings."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dve import ConfigError, DataValueEmbedding, DataValueEmbeddings, LayerMismatchError


def per_sample_ce(module, batch):
    return F.cross_entropy(module(batch["x"]), batch["y"], reduction="none")


# --- the query module --------------------------------------------------------------------------------------


def test_query_module_missing_a_layer(trained, test_batch):
    class Truncated(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 16), nn.Tanh())

    with pytest.raises(LayerMismatchError, match=r"'net\.2': recorded linear \(10, 17\), found missing"):
        trained.dve.embeddings.influence(Truncated(), test_batch, loss_fn=lambda m, b: m.net(b["x"]).sum(1))


def test_query_module_with_other_shapes(trained, mlp_cls, test_batch):
    """Refused, without first the warning that the weights are not the run's final ones (they are another model's)."""
    with pytest.raises(LayerMismatchError) as info, warnings.catch_warnings():
        warnings.simplefilter("error")
        trained.dve.embeddings.influence(mlp_cls(hidden=8), test_batch)
    message = str(info.value)
    assert "'net.0': recorded linear (16, 65), found Linear with exact block (8, 65)" in message
    assert "'net.2': recorded linear (10, 17), found Linear with exact block (10, 9)" in message


def test_query_module_with_a_layer_of_another_kind_and_the_same_block(trained, test_batch):
    class ConvHead(nn.Module):  # net.2 as a 1x1 Conv2d: block (10, 16 * 1 * 1 + 1), the recorded Linear's (10, 17)
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Conv2d(16, 10, kernel_size=1))

    with pytest.raises(LayerMismatchError, match=r"'net\.2': recorded linear \(10, 17\), found Conv2d with exact "
                                                 r"block \(10, 17\)"):
        trained.dve.embeddings.influence(ConvHead(), test_batch, loss_fn=lambda m, b: m.net(b["x"]).sum(1))


def test_query_leaves_module_untouched(trained, test_batch):
    model = copy.deepcopy(trained.model)
    model.train()
    model.net[1].eval()  # mixed modes must come back per submodule
    model.net[0].weight.grad = torch.randn_like(model.net[0].weight)
    model.net[2].bias.grad = torch.zeros_like(model.net[2].bias)
    modes = {name: m.training for name, m in model.named_modules()}
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}

    result = trained.dve.embeddings.influence(model, test_batch)

    assert result.scores.abs().max() > 0
    assert {name: m.training for name, m in model.named_modules()} == modes
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
        assert p.requires_grad
        if grads[name] is None:
            assert p.grad is None, name
        else:
            assert torch.equal(p.grad, grads[name]), name
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_module_without_training_step_needs_loss_fn(trained, test_batch):
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = copy.deepcopy(trained.model.net)

        def forward(self, x):
            return self.net(x)

    plain = Plain()
    with pytest.raises(ConfigError, match=r"Plain has no training_step; pass loss_fn"):
        trained.dve.embeddings.influence(plain, test_batch)
    with_loss_fn = trained.dve.embeddings.influence(plain, test_batch, loss_fn=per_sample_ce)
    torch.testing.assert_close(with_loss_fn.scores, trained.dve.embeddings.influence(trained.model, test_batch).scores)


def test_loss_fn_returning_a_scalar(trained, test_batch):
    with pytest.raises(ConfigError, match=r"loss_fn must return per-sample losses as a 1-D Tensor\[B\]"):
        trained.dve.embeddings.influence(trained.model, test_batch, loss_fn=lambda m, b: per_sample_ce(m, b).mean())


# --- loss paths and aggregation ----------------------------------------------------------------------------


def test_loss_fn_path_equals_training_step_path(trained, test_batch):
    default = trained.dve.embeddings.influence(trained.model, test_batch, per_step=True)
    with_loss_fn = trained.dve.embeddings.influence(trained.model, test_batch, loss_fn=per_sample_ce, per_step=True)
    assert default.scores.shape == (12, 128)
    assert torch.equal(default.sample_ids, with_loss_fn.sample_ids) and torch.equal(default.steps, with_loss_fn.steps)
    torch.testing.assert_close(with_loss_fn.scores, default.scores)
    # and the test gradients of one row do not depend on the other rows of the batch
    single = {k: v[3:4] for k, v in test_batch.items()}
    torch.testing.assert_close(trained.dve.embeddings.influence(trained.model, single, per_step=True).scores,
                               default.scores[3:4])


def test_totals_are_per_step_columns_summed_by_sample(trained, test_batch):
    per_step = trained.dve.embeddings.influence(trained.model, test_batch, per_step=True)
    totals = trained.dve.embeddings.influence(trained.model, test_batch)
    assert per_step.steps.tolist() == [s for s in range(8) for _ in range(16)]
    assert totals.sample_ids.tolist() == list(range(64))
    assert totals.steps.tolist() == [-1] * 64
    expected = torch.zeros_like(totals.scores)
    for column, sample in enumerate(per_step.sample_ids.tolist()):
        expected[:, sample] += per_step.scores[:, column]
    torch.testing.assert_close(totals.scores, expected)
    # every sample was used once per epoch: two occurrences each
    assert torch.bincount(per_step.sample_ids).tolist() == [2] * 64


def test_score_refuses_test_gradients_of_other_shapes(trained, test_batch):
    embeddings = trained.dve.embeddings
    grads = embeddings.test_gradients(trained.model, test_batch)
    first = next(iter(grads))
    bad = {"missing layer": {k: v for k, v in grads.items() if k != first},
           "wrong width": {**grads, first: grads[first][:, :-1]},
           "1-D row": {k: v[0] for k, v in grads.items()},
           "row counts differ": {**grads, first: grads[first][:2]},
           "another layer too": {**grads, "head.extra": grads[first]},
           "not a dict": list(grads.values()),
           "numpy arrays": {k: v.numpy() for k, v in grads.items()}}  # was numpy's AttributeError on .detach()
    for case, value in bad.items():
        with pytest.raises(ConfigError, match=r"test_gradients must map every recorded layer, and no other key, to a "
                                              r".* Build it with test_gradients\(module, batch\)"):
            embeddings.score(value)
    assert embeddings.score(grads).scores.shape[0] == len(test_batch["y"])


def test_top_k_returns_highest_and_lowest_mean_scores(trained, test_batch):
    result = trained.dve.embeddings.influence(trained.model, test_batch, per_step=True)
    mean = result.scores.mean(dim=0)
    order = torch.argsort(mean, descending=True)
    assert (mean[order[:5]] > 0).all() and (mean[order.flip(0)[:5]] < 0).all()  # five of each sign
    helpful, harmful = result.top_k(5)
    torch.testing.assert_close(helpful.scores, mean[order[:5]])
    torch.testing.assert_close(harmful.scores, mean[order.flip(0)[:5]])
    assert helpful.sample_ids.tolist() == result.sample_ids[order[:5]].tolist()
    assert helpful.steps.tolist() == result.steps[order[:5]].tolist()
    assert harmful.sample_ids.tolist() == result.sample_ids[order.flip(0)[:5]].tolist()
    assert helpful.scores[0] >= helpful.scores[-1] > 0 > harmful.scores[-1] >= harmful.scores[0]

    row = result.scores[7]
    by_row, _ = result.top_k(3, test_index=7)
    torch.testing.assert_close(by_row.scores, torch.sort(row, descending=True).values[:3])

    everything, against = result.top_k(10_000)  # every column of each sign
    assert (everything.scores.numel(), against.scores.numel()) == (int((mean > 0).sum()), int((mean < 0).sum()))


def test_float64_test_gradients_are_scored_in_float64_against_a_float32_store(trained, test_batch):
    """Scores are taken in the wider of the two dtypes: float64 test gradients against the (float32) stored
    embeddings give float64 scores equal to the explicit float64 products ``sum_l g_l e_l^T``, per step."""
    embeddings = trained.dve.embeddings
    test = {n: g.double() * (1 + 1e-6) for n, g in embeddings.test_gradients(trained.model, test_batch).items()}
    result = embeddings.score(test, per_step=True)
    assert result.scores.dtype == torch.float64
    columns = []
    for step in embeddings.steps:
        _, stored = embeddings.store.embedding_arrays(embeddings.store.layer_names).step(step)
        assert all(e.dtype == torch.float32 for e in stored.values())
        columns.append(sum(test[n] @ e.double().T for n, e in stored.items()))
    torch.testing.assert_close(result.scores, torch.cat(columns, dim=1), rtol=1e-12, atol=1e-15)


# --- a store recorded with per-sample loss weights ---------------------------------------------------------


def weights_of(batch):
    return (1.0 + (batch["index"] % 3).float()) / 30.0


def test_weights_store_needs_loss_weights_or_loss_fn(fit, mlp_cls, save_dir, test_batch):
    class Weighted(mlp_cls):
        def loss(self, batch):
            return (F.cross_entropy(self(batch["x"]), batch["y"], reduction="none") * weights_of(batch)).sum()

    model = Weighted()
    dve = DataValueEmbedding(save_dir, loss_reduction=weights_of, projection_dim=64)
    fit(model, dve)
    in_process = dve.embeddings.influence(model, test_batch).scores  # the callback knows its callable

    loaded = DataValueEmbeddings.load(save_dir)
    with pytest.raises(ConfigError, match=r"loss_reduction callable.*loss_weights=.*loss_fn="):
        loaded.influence(model, test_batch)
    torch.testing.assert_close(DataValueEmbeddings.load(save_dir, loss_weights=weights_of).influence(
        model, test_batch).scores, in_process)
    torch.testing.assert_close(loaded.influence(model, test_batch, loss_fn=per_sample_ce).scores, in_process)
