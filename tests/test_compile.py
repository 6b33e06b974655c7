"""``torch.compile``: capture through compiled modules records the same rows as eager training.

The hooks run inside the compiled forward (dynamo traces them; the output-gradient hooks run in the backward), so
the embeddings and the influence of a compiled run must equal an eager run of the same trajectory to round-off.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_dve import DataValueEmbedding
from tests import helpers as H


class QuietMLP(H.DigitsMLP):
    """The float64 digits MLP without ``self.log`` (dynamo cannot trace Lightning's logging in a compiled step)."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["x"]), batch["y"])


def _fit(save_dir: Path, compiled: str | None, replay: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Train 2 epochs of 4 steps; return the final embeddings ``{layer: [N, k]}`` and 8 test points' influence
    (with ``replay``: the embeddings replayed at train end, and the scores of ``exact_influence``; compiled with
    ``aot_eager``, which differentiates as inductor does, through aot_autograd, without its code generation)."""
    model = QuietMLP(hidden=16)
    backend = "aot_eager" if replay else "inductor"
    if compiled == "submodule":
        model.net = torch.compile(model.net, backend=backend)
    fitted = torch.compile(model, backend=backend) if compiled == "module" else model
    dve = DataValueEmbedding(save_dir, projection_dim=None, report=None, checkpoint_interval=4 if replay else None,
                             embeddings="replay" if replay else "recursion")
    H.make_trainer(2, [dve]).fit(fitted, H.make_loader(H.DigitsDataset(list(range(128))), 32))
    test = next(iter(H.make_loader(H.DigitsDataset(list(range(1000, 1008))), 8)))
    scores = dve.embeddings.influence(model, test, per_step=True).scores
    # the compiled object itself is a query module too (its layers are the module's it wraps)
    torch.testing.assert_close(dve.embeddings.influence(fitted, test, per_step=True).scores, scores)
    if replay:
        assert dve.embeddings.store.manifest["embeddings_source"] == "replay"
        exact = dve.embeddings.exact_influence(fitted, test, per_step=True).scores
        torch.testing.assert_close(exact, scores, rtol=1e-10, atol=1e-14)  # unprojected: the same scores
    embeddings = dve.embeddings.embedding_matrix().embeddings
    return {name.replace("_orig_mod.", ""): rows.clone() for name, rows in embeddings.items()}, scores


@pytest.mark.slow
@pytest.mark.parametrize("compiled", ["submodule", "module"])
def test_a_compiled_model_records_what_eager_training_records(tmp_path: Path, compiled: str) -> None:
    eager, eager_scores = _fit(tmp_path / "eager", None)
    rows, scores = _fit(tmp_path / "compiled", compiled)
    assert sorted(rows) == sorted(eager) == ["net.0", "net.2"]
    for name, expected in eager.items():
        torch.testing.assert_close(rows[name], expected, rtol=1e-10, atol=1e-14)
    assert eager_scores.abs().max() > 0
    torch.testing.assert_close(scores, eager_scores, rtol=1e-10, atol=1e-14)


@pytest.mark.slow
def test_the_exact_replay_runs_a_compiled_model_eagerly(tmp_path: Path) -> None:
    """The replay differentiates the training backward, which a compiled graph cannot (aot_autograd has no double
    backward): until session 40, ``embeddings="replay"`` failed the fit and ``exact_influence`` raised torch's
    error, for a compiled submodule and a compiled LightningModule alike (an audit). Both run compiled code eagerly
    now, in one context (``query_layers.eager``); this runs the submodule (the LightningModule case, checked by the
    session's review, takes minutes to compile on 2 cores), and its replay equals the eager run's."""
    eager, eager_scores = _fit(tmp_path / "eager", None, replay=True)
    rows, scores = _fit(tmp_path / "compiled", "submodule", replay=True)
    for name, expected in eager.items():
        torch.testing.assert_close(rows[name], expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(scores, eager_scores, rtol=1e-10, atol=1e-14)
