"""Where the report lands on a dashboard's axes and tags, read back from real loggers' files.

The oracle is the trainer (``trainer.global_step`` when the report is logged) and the tags other loggers of the
same trainer use; W&B runs are real offline runs, parsed as in :mod:`tests.test_reporting`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch.core.saving import load_hparams_from_yaml
from torch.utils.data import DataLoader

from lightning_dve import ConfigError, DataValueEmbedding
from tests.conftest import DigitsDict, TinyMLP
from tests.test_reporting import SMALL, finished_run_records, item_key, read_csv, report_dir


def test_wandb_report_row_is_at_the_trainers_global_step(fit, wandb_env):
    """The report's W&B row carries ``trainer/global_step = trainer.global_step`` (where TensorBoard and CSV put the
    summary scalars), not whatever step the user's metrics last logged: with nothing logged during training (a
    ``log_every_n_steps`` longer than the run, no validation) W&B's step sync would put the train-end report at
    step 0 of every ``trainer/global_step`` panel."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    train = DataLoader(DigitsDict(range(64)), batch_size=16)
    reference = DigitsDict(range(1500, 1520)).batch()
    callback = DataValueEmbedding(wandb_env / "dve", projection_dim=16, report=SMALL, reference=reference)
    logger = WandbLogger(offline=True, save_dir=str(wandb_env), project="dve-test")
    try:
        trainer = fit(TinyMLP(), callback, train, max_epochs=2, logger=logger, log_every_n_steps=50)
        run_dir = Path(logger.experiment.dir).parent
    finally:
        wandb.finish()
    history = [{item_key(i): json.loads(i.value_json) for i in r.history.item} for r in finished_run_records(run_dir)
               if r.WhichOneof("record_type") == "history"]
    rows = [row for row in history if "dve/total_influence" in row]
    assert len(rows) == 1 and trainer.global_step == 8
    assert rows[0]["trainer/global_step"] == trainer.global_step


def test_a_curve_longer_than_a_wandb_table_is_binned_not_cut(fit, wandb_env, monkeypatch):
    """W&B keeps the first ``wandb.Table.MAX_ROWS`` rows of a logged table and drops the rest (10,000: a run of
    10,500 steps lost its last 500 without a word). Here the limit is 10 for 25 steps: the W&B curve has 9 rows,
    each the mean of 3 consecutive steps of ``curve.csv`` (the oracle, summed for ``n_samples``), and it says so."""
    import numpy as np
    import pytest
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setattr(wandb.Table, "MAX_ROWS", 10)
    train = DataLoader(DigitsDict(range(100)), batch_size=4)
    callback = DataValueEmbedding(wandb_env / "dve", projection_dim=16, report=SMALL,
                                  reference=DigitsDict(range(1500, 1520)).batch())
    logger = WandbLogger(offline=True, save_dir=str(wandb_env), project="dve-test")
    try:
        with pytest.warns(UserWarning, match=r"the curve has 25 steps, more than W&B keeps in a table \(10 rows\): "
                                             r"the W&B curve shows means over 3 steps per point"):
            fit(TinyMLP(), callback, train, max_epochs=1, logger=logger)
        run_dir = Path(logger.experiment.dir).parent
    finally:
        wandb.finish()
    history = [{item_key(i): json.loads(i.value_json) for i in r.history.item} for r in finished_run_records(run_dir)
               if r.WhichOneof("record_type") == "history"]
    [row] = [row for row in history if "dve/total_influence" in row]
    assert row["dve/curve/steps_per_row"] == 3
    table = json.loads((run_dir / "files" / row["dve/curve/table/path"]).read_text())
    full = np.array([[float(v) for v in r.values()] for r in read_csv(report_dir(callback) / "curve.csv")])
    assert len(full) == 25 and len(table["data"]) == 9
    expected = [[*g[0, :2], g[:, 2].mean(), g[:, 3].sum(), *g[:, 4:].mean(axis=0)]
                for g in (full[lo:lo + 3] for lo in range(0, 25, 3))]
    np.testing.assert_allclose(np.array(table["data"], dtype=float), np.array(expected), rtol=1e-12)


@pytest.mark.parametrize("namespace", ["dve", "dve_b"])
def test_tensorboard_prefix_names_every_tag(tmp_path, namespace):
    """``TensorBoardLogger(prefix=...)`` prefixes the scalars it logs (``pre-dve/...``); the figures, histogram and
    tables the report writes through the logger's writer carry the same prefix, so one report's tags stay together
    and apart from another prefixed model's in the same log folder. A ``ReportConfig.namespace`` replaces ``dve``
    in every tag."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing import event_accumulator

    from lightning_dve import figures
    from lightning_dve.reporting_loggers import log_tensorboard
    from tests.test_reporting_loggers import synthetic_report

    report = synthetic_report(tmp_path)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", prefix="pre")
    curve = figures.render(figures.curve_figure(report.curves))
    log_tensorboard(logger, report, {"curve": curve}, step=60, namespace=namespace)
    events = event_accumulator.EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0,
                                                                              "histograms": 0, "tensors": 0})
    events.Reload()
    tags = {kind: set(events.Tags()[kind]) for kind in ("scalars", "images", "histograms", "tensors")}
    assert f"pre-{namespace}/total_influence" in tags["scalars"]
    assert f"pre-{namespace}/curve/influence" in tags["scalars"]
    assert tags["images"] == {f"pre-{namespace}/figures/curve"}
    assert tags["histograms"] == {f"pre-{namespace}/samples/total_influence"}
    assert {f"pre-{namespace}/stages/text_summary", f"pre-{namespace}/top_k/helpful/text_summary"} <= tags["tensors"]
    assert all(tag.startswith(f"pre-{namespace}/") for kind in tags.values() for tag in kind)


class _WithHyperparameters(TinyMLP):
    def __init__(self, hidden: int = 16, lr: float = 0.1) -> None:
        super().__init__(hidden, lr)
        self.save_hyperparameters()


def test_the_recording_settings_are_in_the_wandb_config_and_hparams_next_to_the_modules(fit, wandb_env):
    """The W&B run config (read back from the offline run's config records) and the CSVLogger's ``hparams.yaml``
    hold the recording's settings under ``dve`` (as in the store's manifest, the storage dtype resolved), next to
    the module's own hyperparameters, which Lightning logs after them."""
    import wandb
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    train = DataLoader(DigitsDict(range(64)), batch_size=16)
    reference = DigitsDict(range(1500, 1520)).batch()
    callback = DataValueEmbedding(wandb_env / "dve", projection_dim=16, report=SMALL, reference=reference)
    loggers = [WandbLogger(offline=True, save_dir=str(wandb_env), project="dve-test"),
               CSVLogger(save_dir=str(wandb_env), name="csv")]
    try:
        fit(_WithHyperparameters(hidden=12), callback, train, max_epochs=1, logger=loggers)
        run_dir = Path(loggers[0].experiment.dir).parent
    finally:
        wandb.finish()
    manifest = json.loads((wandb_env / "dve" / "manifest.json").read_text())
    expected = {**manifest["settings"], "storage_dtype": "float16", "embeddings": "recursion",
                "store": str(wandb_env / "dve"), "settings_hash": manifest["settings_hash"], "tracked_layers": 2,
                "embedding_dims": 16 + 16}
    assert manifest["storage_dtype"] == "float16" and manifest["settings"]["storage_dtype"] == "auto"
    config = {item_key(i): json.loads(i.value_json) for r in finished_run_records(run_dir)
              if r.WhichOneof("record_type") == "config" for i in r.config.update}
    assert config["dve"] == expected
    assert (config["hidden"], config["lr"]) == (12, 0.1)
    hparams = load_hparams_from_yaml(Path(loggers[1].log_dir) / "hparams.yaml")
    assert hparams["dve"] == expected and hparams["hidden"] == 12


def test_no_settings_reach_the_loggers_when_the_report_does_not(fit, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    train = DataLoader(DigitsDict(range(32)), batch_size=16)
    for name, report in (("off", dataclasses.replace(SMALL, log_to_loggers=False)), ("none", None)):
        logger = CSVLogger(save_dir=str(tmp_path / "csv"), name=name)
        fit(_WithHyperparameters(), DataValueEmbedding(tmp_path / name, projection_dim=16, report=report), train,
            max_epochs=1, logger=logger)
        hparams = load_hparams_from_yaml(Path(logger.log_dir) / "hparams.yaml")
        assert hparams["hidden"] == 16 and "dve" not in hparams


def test_tensorboard_keeps_the_settings_in_hparams_yaml_only(fit, tmp_path):
    """In TensorBoard the settings go to ``hparams.yaml``; the event file gets no ``hp_metric`` scalar and no
    hyperparameter summary from them (a module without hyperparameters has none at all)."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing import event_accumulator

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=SMALL,
                                  reference=DigitsDict(range(1500, 1520)).batch())
    fit(TinyMLP(), callback, DataLoader(DigitsDict(range(32)), batch_size=16), max_epochs=1, logger=logger)
    assert load_hparams_from_yaml(Path(logger.log_dir) / "hparams.yaml")["dve"]["projection_dim"] == 16
    events = event_accumulator.EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert "dve/total_influence" in events.Tags()["scalars"] and "hp_metric" not in events.Tags()["scalars"]
    assert not any(tag.startswith("_hparams_") for tag in events.Tags()["tensors"])


def test_tensorboard_shows_the_figure_files_pixels(fit, tmp_path):
    """Each figure is drawn once: the image TensorBoard shows is the report's PNG file, pixel for pixel."""
    import io

    from lightning.pytorch.loggers import TensorBoardLogger
    from matplotlib.image import imread
    from tensorboard.backend.event_processing import event_accumulator

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    callback = DataValueEmbedding(tmp_path / "dve", projection_dim=16, report=SMALL,
                                  reference=DigitsDict(range(1500, 1520)).batch())
    fit(TinyMLP(), callback, DataLoader(DigitsDict(range(32)), batch_size=16), max_epochs=1, logger=logger)
    events = event_accumulator.EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    names = {tag.rsplit("/", 1)[1] for tag in events.Tags()["images"]}
    assert names == {path.stem for path in report_dir(callback).glob("*.png")} >= {"curve", "epochs", "histogram"}
    for name in names:
        [shown] = events.Images(f"dve/figures/{name}")
        written = imread(report_dir(callback) / f"{name}.png")  # RGBA, opaque, as savefig wrote it
        assert written.shape[0] > 100 and (written[..., 3] == 1).all()
        np.testing.assert_array_equal(imread(io.BytesIO(shown.encoded_image_string)), written[..., :3])


def test_two_callbacks_log_under_their_own_namespaces_and_one_namespace_is_refused(fit, wandb_env):
    """Two callbacks of one Trainer (e.g. two curvatures side by side) log every key under their own
    ``ReportConfig(namespace=...)``: read back from the offline W&B run (history and config) and the CSV log, each
    namespace's total influence is its own ``summary.json``'s. Both under the default namespace wrote the same keys,
    the second overwriting the first's dashboards silently; that is refused at fit start, before anything is
    recorded, naming the namespace and the fix (a Trainer without loggers has no keys to share)."""
    import wandb
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    train = DataLoader(DigitsDict(range(64)), batch_size=16)
    reference = DigitsDict(range(1500, 1520)).batch()

    def callbacks(*namespaces: str) -> list[DataValueEmbedding]:
        return [DataValueEmbedding(wandb_env / f"{namespace}_{curvature}", projection_dim=16, curvature=curvature,
                                   report=dataclasses.replace(SMALL, namespace=namespace), reference=reference)
                for namespace, curvature in zip(namespaces, ("empirical_fisher", "none"))]

    first, second = callbacks("dve", "dve")
    with pytest.raises(ConfigError, match=r"under the same keys 'dve/\.\.\.'.*ReportConfig\(namespace=\.\.\.\)"):
        fit(TinyMLP(), first, train, max_epochs=1, callbacks=[second], logger=CSVLogger(str(wandb_env / "refused")))
    assert not (wandb_env / "dve_empirical_fisher").exists()
    fit(TinyMLP(), *callbacks("dve", "dve")[:1], train, max_epochs=1, callbacks=callbacks("dve", "dve")[1:])
    assert (wandb_env / "dve_none" / "report" / "summary.json").exists()  # no logger: nothing to overwrite
    loggers = [WandbLogger(offline=True, save_dir=str(wandb_env), project="dve-test"),
               CSVLogger(save_dir=str(wandb_env), name="csv")]
    first, second = callbacks("dve_a", "dve_b")
    try:
        fit(TinyMLP(), first, train, max_epochs=1, logger=loggers, callbacks=[second])
        run_dir = Path(loggers[0].experiment.dir).parent
    finally:
        wandb.finish()
    totals = {name: json.loads((report_dir(callback) / "summary.json").read_text())["total_influence"]
              for name, callback in (("dve_a", first), ("dve_b", second))}
    assert totals["dve_a"] != totals["dve_b"]
    records = finished_run_records(run_dir)
    history = [{item_key(i): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    config = {item_key(i): json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    csv = read_csv(Path(loggers[1].log_dir) / "metrics.csv")
    for name, total in totals.items():
        logged = [row[f"{name}/total_influence"] for row in history if f"{name}/total_influence" in row]
        row = next(r for r in history if f"{name}/total_influence" in r)
        assert logged == [total] and any(key.startswith(f"{name}/curve/table") for key in row)
        assert config[name]["store"] == str(wandb_env / f"{name}_{'empirical_fisher' if name == 'dve_a' else 'none'}")
        assert [float(row[f"{name}/total_influence"]) for row in csv if row.get(f"{name}/total_influence")] == \
            [pytest.approx(total)]
    assert not any(key.startswith("dve/") for row in history for key in row) and "dve" not in config
