"""Influence checkpointing (segments), data value dynamics, storage dtypes, interruption and memory bounds."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from lightning_dve import ConfigError, DataValueEmbedding, DataValueEmbeddings, StoreError
from lightning_dve.records import decode, encode
from lightning_dve.store import StepRecord, TrajectoryStore
from tests.conftest import DigitsDict


def float64_batch(batch: dict) -> dict:
    return {**batch, "x": batch["x"].double()}


def run(mlp_cls: type, fit: Callable, loader: DataLoader, root: Path, max_steps: int = -1, **kwargs) -> tuple:
    """Fit a float64 MLP for 2 epochs (8 steps) with float64 storage, so only round-off separates variants."""
    model = mlp_cls().double()
    dve = DataValueEmbedding(root, projection_dim=32, storage_dtype="float64", **kwargs)
    fit(model, dve, loader, precision="64-true", max_epochs=2, max_steps=max_steps)
    return model, dve


@pytest.mark.parametrize("layout", ["per_layer", "full"])
def test_segment_parallel_equals_sequential(mlp_cls: type, fit: Callable, make_loader: Callable, tmp_path: Path,
                                            test_batch: dict, layout: str) -> None:
    model, sequential = run(mlp_cls, fit, make_loader(), tmp_path / "one", layout=layout)
    _, segmented = run(mlp_cls, fit, make_loader(), tmp_path / "three", layout=layout, segments=3)
    assert segmented.embeddings.segment_boundaries == [2, 4, 7]  # 8 steps split 3/2/3
    batch = float64_batch(test_batch)
    expected = sequential.embeddings.influence(model, batch, per_step=True)
    got = segmented.embeddings.influence(model, batch, per_step=True)
    assert torch.equal(got.steps, expected.steps) and torch.equal(got.sample_ids, expected.sample_ids)
    torch.testing.assert_close(got.scores, expected.scores, rtol=1e-10, atol=1e-15)
    # the last segment's local embeddings are the final ones; earlier ones differ (they are segment-local)
    last = sequential.embeddings.store.embedding_arrays().step(7)[1]
    assert all(torch.allclose(last[n], segmented.embeddings.store.embedding_arrays().step(7)[1][n]) for n in last)
    first_seq, first_seg = (e.store.embedding_arrays().step(0)[1]
                            for e in (sequential.embeddings, segmented.embeddings))
    assert not all(torch.allclose(first_seq[n], first_seg[n]) for n in first_seq)


def test_more_segments_than_steps_warn_and_give_one_segment_per_step(
    mlp_cls: type, fit: Callable, make_loader: Callable, tmp_path: Path
) -> None:
    """``segments=10`` over 4 steps: 4 segments of one step each, said in a warning (it was silent)."""
    with pytest.warns(UserWarning, match=r"segments=10, but the 4 recorded step\(s\) make 4 segment\(s\)"):
        _, dve = run(mlp_cls, fit, make_loader(), tmp_path / "dve", max_steps=4, segments=10)
    assert dve.embeddings.segment_boundaries == [0, 1, 2, 3]


def test_a_planned_boundary_with_no_recorded_step_is_named(mlp_cls: type, fit: Callable, make_loader: Callable,
                                                           tmp_path: Path) -> None:
    """``training_step`` returned None at the planned boundary (step 3 of 8): the boundary was dropped, shifting the
    indices ``influence_at`` takes, and the warning only said the steps make fewer segments."""
    class SkipsStep3(mlp_cls):
        def training_step(self, batch, batch_idx):
            return None if self.global_step == 3 else super().training_step(batch, batch_idx)

    with pytest.warns(UserWarning, match=r"segments=2, but no step was recorded at the planned boundaries after "
                                         r"steps \[3\] .*boundary indices of influence_at\(\) shift"):
        fit(SkipsStep3(), DataValueEmbedding(tmp_path / "dve", projection_dim=8, segments=2, report=None),
            make_loader(), max_epochs=2)


class DigitStream(torch.utils.data.IterableDataset):
    """Digits 0..31 as a stream: a loader without ``__len__``."""

    def __iter__(self):
        return iter(DigitsDict(range(32)))


@pytest.mark.parametrize("max_steps", [-1, 2])
def test_boundaries_a_loader_of_unknown_length_cannot_plan_are_warned_about(mlp_cls: type, fit: Callable,
                                                                          tmp_path: Path, max_steps: int) -> None:
    """A stream gives no step count at train start: the boundaries are placed at train end, without references
    at them, so the dynamics had the final model only, silently. ``max_steps`` plans them."""
    loader = DataLoader(DigitStream(), batch_size=8)
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=8, segments=2, report=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(mlp_cls(), dve, loader, max_steps=max_steps)
    warned = [w for w in caught if "the boundaries are placed at train end" in str(w.message)]
    assert len(warned) == int(max_steps == -1) and dve.embeddings.segment_boundaries == ([1, 3] if max_steps < 0
                                                                                          else [0, 1])


class StopAfter(Callback):
    """Stops the fit after ``steps`` optimizer steps, as EarlyStopping or max_time would."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, *args) -> None:
        trainer.should_stop = trainer.should_stop or trainer.global_step >= self.steps


def test_a_fit_without_an_epoch_limit_names_it_as_why_the_boundaries_are_unplanned(
    mlp_cls: type, fit: Callable, make_loader: Callable, tmp_path: Path
) -> None:
    """A sized loader with ``max_epochs=-1`` (a ``max_time`` budget, or a stop in a hook) has no step count at train
    start either; the warning named only loaders without ``__len__``, which this one is not."""
    with pytest.warns(UserWarning, match=r"segments=2, but trainer\.estimated_stepping_batches is unknown .*no epoch "
                                         r"limit: max_epochs=-1 with max_time.*Set max_steps"):
        fit(mlp_cls(), DataValueEmbedding(tmp_path / "dve", projection_dim=8, segments=2, report=None),
            make_loader(), max_epochs=-1, callbacks=[StopAfter(3)])


def test_a_run_stopped_before_its_planned_boundaries_says_so(
    mlp_cls: type, fit: Callable, make_loader: Callable, tmp_path: Path
) -> None:
    """Boundaries are planned at train start for the 8 steps of two epochs (after step 3); a run stopped after 3
    steps ends before it (one segment), and the warning said 3 steps make 1 segment, which 3 steps need not."""
    with pytest.warns(UserWarning, match=r"segments=2, but the boundaries were planned at train start \(after steps "
                                         r"\[3\], .*the run stopped after step 2 \(EarlyStopping.*: 1 segment\(s\)"):
        fit(mlp_cls(), DataValueEmbedding(tmp_path / "dve", projection_dim=8, segments=2, report=None),
            make_loader(), max_epochs=2, callbacks=[StopAfter(3)])


@pytest.mark.parametrize("layout", ["per_layer", "full"])
def test_segments_as_asked_do_not_warn(mlp_cls: type, fit: Callable, make_loader: Callable, tmp_path: Path,
                                       layout: str) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*recorded step.* make \d+ segment")
        run(mlp_cls, fit, make_loader(), tmp_path / "dve", layout=layout, segments=3)


def test_dynamics_at_last_boundary_equal_final_and_intermediate_equal_a_shorter_run(
    mlp_cls: type, fit: Callable, make_loader: Callable, tmp_path: Path, test_batch: dict
) -> None:
    batch = float64_batch(test_batch)
    model, dve = run(mlp_cls, fit, make_loader(), tmp_path / "long", segments=4)
    emb = dve.embeddings
    torch.testing.assert_close(emb.influence_at(3, model, batch).scores, emb.influence(model, batch).scores)
    # the model at boundary 1 (after step 3) is the model of a run stopped after 4 steps
    boundary_step = emb.segment_boundaries[1]
    short_model, short = run(mlp_cls, fit, make_loader(), tmp_path / "short", max_steps=boundary_step + 1)
    expected = short.embeddings.influence(short_model, batch, per_step=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model at boundary 1 is not warned about there
        got = emb.influence_at(1, short_model, batch, per_step=True)
    assert got.steps.max().item() == boundary_step
    torch.testing.assert_close(got.scores, expected.scores, rtol=1e-10, atol=1e-15)
    with pytest.raises(ConfigError, match="boundary 4 is out of range: this store has 4"):
        emb.influence_at(4, model, batch)


def test_a_model_at_other_weights_than_its_boundarys_is_warned_about(
    mlp_cls: type, fit: Callable, make_loader: Callable, tmp_path: Path, test_batch: dict
) -> None:
    """The weights at each segment boundary are kept (sampled coordinates, as the final ones): the final model given
    to ``influence_at`` for an earlier boundary, or the boundary's model to ``influence``, is warned about, naming
    the fix. Until session 41 neither was (silently other scores: the test gradients at other weights)."""
    batch = float64_batch(test_batch)
    model, dve = run(mlp_cls, fit, make_loader(), tmp_path / "long", segments=4)
    emb = dve.embeddings
    step = emb.segment_boundaries[1]
    assert sorted(map(int, emb.store.manifest["boundary_weights"])) == emb.segment_boundaries[:-1]
    with pytest.warns(UserWarning, match=rf"are not those of the recorded run at segment boundary 1 \(after step "
                                         rf"{step}\).*checkpoint saved at global_step == {step + 1}"):
        emb.influence_at(1, model, batch)
    short_model, _ = run(mlp_cls, fit, make_loader(), tmp_path / "short", max_steps=step + 1)
    with pytest.warns(UserWarning, match=r"are not the final weights.*these are the weights at segment boundary 1, "
                                         r"which influence_at\(1, \.\.\.\) scores"):
        emb.influence(short_model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb.influence_at(3, model, batch)  # the last boundary is the final model
        emb.influence(model, batch)


def test_float16_rows_are_scaled_so_late_gradients_do_not_underflow() -> None:
    tiny = torch.randn(4, 256) * 1e-7  # below float16's normal range (6e-5)
    plain = tiny.to(torch.float16).to(torch.float32)
    scaled = decode("a", encode({"a": tiny}, "float16"))
    rel = lambda x: ((x - tiny).norm() / tiny.norm()).item()  # noqa: E731
    assert rel(plain) > 1e-2 and rel(scaled) < 1e-3
    assert decode("a", encode({"a": tiny}, "bfloat16")).dtype == torch.float32
    assert decode("a", encode({"a": tiny.double()}, "float64")).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float16_encoding_divides_each_layers_rows_by_their_own_largest_magnitude(dtype: torch.dtype) -> None:
    """Layers of different widths and dtypes and magnitudes (one row all zero, one NaN), scaled together through
    one concatenation and an ``amax`` scatter: the same bits as dividing each layer's rows by their own largest
    magnitude, in the dtype the layers promote to."""
    generator = torch.Generator().manual_seed(0)
    rows = {name: torch.randn(5, width, generator=generator, dtype=dtype) * magnitude
            for name, width, magnitude in (("a", 3, 1e-6), ("b", 17, 1.0), ("c", 1, 1e3))}
    rows["b"][2] = 0
    encoded = encode(rows, "float16", "curv")
    for name, grad in rows.items():
        scale = grad.abs().amax(dim=1).to(torch.float32).clamp_min(torch.finfo(torch.float32).tiny)
        assert torch.equal(encoded[f"curv_scale/{name}"], scale)
        assert torch.equal(encoded[f"curv/{name}"], (grad / scale.to(dtype).unsqueeze(1)).to(torch.float16))
    assert encoded["curv/b"][2].abs().max() == 0
    mixed = encode({"a": rows["a"].to(torch.bfloat16), "b": rows["b"]}, "float16")  # in the type they promote to
    assert torch.equal(mixed["grad/a"], encode({"a": rows["a"].to(torch.bfloat16).to(dtype)}, "float16")["grad/a"])
    rows["c"][1] = float("nan")
    assert encode(rows, "float16")["scale/c"][1].isnan()  # a NaN row stays NaN (refused before it is stored)
    half = encode({"a": rows["b"].to(torch.float16)}, "float16")  # half rows: a zero row's scale is no 0 in them
    torch.testing.assert_close(decode("a", half), rows["b"].to(torch.float16).to(torch.float32), rtol=1e-3, atol=0)


@pytest.mark.parametrize("storage, expected", [("auto", "float16"), ("bfloat16", "bfloat16"), ("float32", "float32")])
def test_storage_dtype_setting_reaches_the_files(mlp_cls: type, fit: Callable, tmp_path: Path, storage: str,
                                                 expected: str) -> None:
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=32, storage_dtype=storage)
    fit(mlp_cls(), dve)
    store = TrajectoryStore.open(tmp_path / "dve")
    assert store.manifest["storage_dtype"] == expected
    from safetensors import safe_open

    with safe_open(str(tmp_path / "dve" / "steps" / "step_00000000.safetensors"), "pt") as handle:
        assert handle.get_tensor("grad/net.0").dtype == getattr(torch, expected)
    assert store.manifest["bytes_per_step"] > 0 and store.manifest["bytes_total"] >= store.manifest["bytes_per_step"]


def test_exact_mode_keeps_float64(mlp_cls: type, fit: Callable, tmp_path: Path) -> None:
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=None)
    fit(mlp_cls().double(), dve, precision="64-true")
    record = TrajectoryStore.open(tmp_path / "dve").read_step(0)
    assert TrajectoryStore.open(tmp_path / "dve").manifest["storage_dtype"] == "float64"
    assert all(g.dtype == torch.float64 for g in record.grads.values())


WRITER = textwrap.dedent('''
    import sys, time, torch, lightning as L
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from tests.conftest import TinyMLP, DigitsDict
    from torch.utils.data import DataLoader
    from lightning_dve import DataValueEmbedding

    class Slow(L.Callback):
        def on_train_batch_end(self, *args):
            if args[-1] >= 3:
                last = Path({store!r}) / "steps" / "step_00000003.safetensors"
                for _ in range(600):  # steps are written by a background thread: wait for step 3's file
                    if last.exists():
                        break
                    time.sleep(0.01)
                print("READY", flush=True)
                time.sleep(60)

    dve = DataValueEmbedding({store!r}, projection_dim=32, report=None)
    L.Trainer(max_epochs=1, callbacks=[dve, Slow()], logger=False, enable_progress_bar=False,
              enable_checkpointing=False, enable_model_summary=False).fit(
        TinyMLP(), DataLoader(DigitsDict(range(128)), batch_size=16))
''')


def test_killed_run_keeps_its_completed_steps_and_is_refused_for_queries(tmp_path: Path) -> None:
    root = tmp_path / "dve"
    script = WRITER.format(root=str(Path(__file__).parents[1]), store=str(root))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert proc.stdout is not None and "READY" in proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    store = TrajectoryStore.open(root)
    assert store.manifest["status"] == "recording" and store.steps == [0, 1, 2, 3]
    assert store.read_step(3).grads["net.0"].shape == (16, store.read_step(3).grads["net.0"].shape[1])
    with pytest.raises(StoreError, match="status='recording'.*interrupted"):
        DataValueEmbeddings.load(root)
    # a write cut off in the middle of a step file is detected, never used
    path = root / "steps" / "step_00000003.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StoreError, match="corrupt or truncated.*Delete it"):
        TrajectoryStore.open(root)


MEMORY = textwrap.dedent('''
    import sys, threading, time, torch
    from pathlib import Path
    from lightning_dve.store import StepRecord, TrajectoryStore
    from lightning_dve.recursion_ranks import embed_trajectory
    from lightning_dve.distributed import SingleProcess
    from lightning_dve.config import AccumulatorLayout
    torch.set_num_threads(1)

    def write(root, steps):
        manifest = {"settings": {}, "settings_hash": "x", "storage_dtype": "float16",
                    "layers": [{"name": "a"}, {"name": "b"}]}
        store = TrajectoryStore.create(root, manifest, overwrite=True)
        g = torch.Generator().manual_seed(0)
        for t in range(steps):
            grads = {n: torch.randn(32, 1024, generator=g) for n in ("a", "b")}
            store.append(StepRecord(t, torch.arange(32) + 32 * t, torch.full((32,), 1 / 32, dtype=torch.float64),
                                    torch.tensor([0.1, 0.1], dtype=torch.float64), grads))
        store.finish_recording({})
        return store

    def anonymous_kib():  # resident anonymous memory: the memory-mapped embeddings' pages are file pages
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    def peak_growth(run):  # the highest RssAnon over the current while run() runs, sampled every millisecond
        before, peak, done = anonymous_kib(), [0], threading.Event()
        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], anonymous_kib())
                time.sleep(0.001)
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            run()
        finally:
            done.set()
            sampler.join()
        return max(peak[0], anonymous_kib()) - before

    root, sizes = Path(sys.argv[1]), [int(s) for s in sys.argv[2:]]
    stores = [write(root / f"s{steps}", steps) for steps in sizes]  # all written first: one baseline for all
    for store in stores:
        print(peak_growth(lambda: embed_trajectory(SingleProcess(), store, AccumulatorLayout.PER_LAYER, [["a", "b"]],
                                                   {"a": 1024, "b": 1024}, torch.float32)))
''')


@pytest.mark.slow
def test_recursion_peak_memory_does_not_grow_with_the_trajectory(tmp_path: Path) -> None:
    """400 steps of 32 x 2 x 1024 gradients are 52 MB in float16 and 105 MB of float32 embeddings; the
    recursion holds two 4 MB matrices and one step at a time, so its peak must stay far below either.

    One process writes both stores, then runs 50 steps and 400 steps, each measured as the peak growth of its
    resident anonymous memory (RssAnon, sampled every millisecond): the pages of the memory-mapped embeddings
    are file pages, which peak RSS counts on some kernels (81 MB at 400 steps on one) and not on others. A
    recursion that kept every block's embeddings grows by 127 MB there.
    """
    sizes = (50, 400)
    out = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path), *map(str, sizes)], capture_output=True,
                         text=True, check=True)
    growth = dict(zip(sizes, map(int, out.stdout.split()[-len(sizes):])))  # KiB
    assert growth[400] < 40 * 1024, growth
    assert growth[400] < growth[50] + 16 * 1024, growth


@pytest.mark.parametrize("whole", [False, True], ids=["blocks", "one_block"])
@pytest.mark.parametrize("segments", [1, 3])
def test_streamed_recursion_over_a_store_equals_the_in_memory_recursion(tmp_path: Path, segments: int, whole: bool,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Both blockings of the streamed recursion (a short segment in one block, or blocks of ``BLOCK_ROWS``; rows
    of 5 here, so 2 steps per block) against the step-by-step recursion held in memory."""
    from lightning_dve import recursion_ranks
    from lightning_dve.config import AccumulatorLayout
    from lightning_dve.distributed import SingleProcess
    from lightning_dve.recursion import BackwardRecursion, segment_bounds
    from lightning_dve.recursion_ranks import embed_trajectory

    monkeypatch.setattr(recursion_ranks, "BLOCK_ROWS", 10)
    monkeypatch.setattr(recursion_ranks, "whole_segment_rows", lambda widths, curvature: 10**6 if whole else 0)
    blocks = []
    monkeypatch.setattr(BackwardRecursion, "block", lambda self, records, update=True, _original=BackwardRecursion.block:
                        blocks.append(len(records)) or _original(self, records, update))

    g = torch.Generator().manual_seed(0)
    dims = {"a": 6, "b": 4}
    records = [StepRecord(t, torch.arange(5) + 5 * t, torch.rand(5, generator=g, dtype=torch.float64),
                          torch.rand(2, generator=g, dtype=torch.float64),
                          {n: torch.randn(5, k, generator=g, dtype=torch.float64) for n, k in dims.items()})
               for t in range(7)]
    in_memory = BackwardRecursion(list(dims), AccumulatorLayout.PER_LAYER)
    expected = {r.step: in_memory.step(r) for r in reversed(records)}
    manifest = {"settings": {}, "settings_hash": "h", "storage_dtype": "float64",
                "layers": [{"name": n} for n in dims]}
    store = TrajectoryStore.create(tmp_path / "s", manifest, overwrite=False)
    for record in records:
        store.append(record)
    store.finish_recording({})
    embed_trajectory(SingleProcess(), store, AccumulatorLayout.PER_LAYER, [list(dims)], dims, torch.float64,
                     segment_bounds(7, segments))
    expected_blocks = {(1, False): [2, 2, 2, 1], (1, True): [7], (3, False): [2, 1, 2, 2], (3, True): [3, 2, 2]}
    assert sorted(blocks) == sorted(expected_blocks[segments, whole])
    last_segment_first_step = {1: 0, 3: 5}[segments]
    for step in range(last_segment_first_step, 7):  # the last segment's embeddings are final
        _, streamed = store.embedding_arrays().step(step)
        for name in dims:
            torch.testing.assert_close(streamed[name], expected[step][name], rtol=1e-12, atol=1e-14)


def test_one_block_only_for_short_plain_sgd_segments() -> None:
    """A segment is one block while it has at most ``whole`` occurrences of plain-SGD steps; a longer one, or one
    with optimizer terms (the momentum form), is cut into blocks of ``rows``."""
    from lightning_dve.config import Curvature
    from lightning_dve.recursion_ranks import whole_segment_rows
    from lightning_dve.recursion_ranks import _blocks

    def records(n: int, optim: bool = False) -> list[StepRecord]:
        terms = {"momentum": torch.tensor([0.9])} if optim else {}
        return [StepRecord(t, torch.arange(4), torch.ones(4), torch.ones(1), {"a": torch.zeros(4, 2)}, optim=terms)
                for t in range(n)]

    sizes = lambda blocks: [len(b) for b in blocks]  # noqa: E731
    assert sizes(_blocks(iter(records(5)), rows=8, whole=20)) == [5]
    assert sizes(_blocks(iter(records(6)), rows=8, whole=20)) == [2, 2, 2]
    assert sizes(_blocks(iter(records(5, optim=True)), rows=8, whole=20)) == [2, 2, 1]
    assert sizes(_blocks(iter([]), rows=8, whole=20)) == []
    # the cost-weighted width of the groups; half of it where separate curvature rows double the Gram work
    assert whole_segment_rows([1024, 1024], Curvature.EMPIRICAL_FISHER) == 1024
    assert whole_segment_rows([300, 100], Curvature.EMPIRICAL_FISHER) == 250
    assert whole_segment_rows([300, 100], Curvature.GGN) == 125
    assert whole_segment_rows([], Curvature.EMPIRICAL_FISHER) == 0


class WithValidation:
    """Mixin: a validation step, so the report's reference set is the validation loader."""

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.loss(batch)


def test_report_dynamics_use_reference_gradients_taken_at_each_boundary(
    mlp_cls: type, fit: Callable, make_loader: Callable, tmp_path: Path
) -> None:
    """The reference gradient saved after step 3 equals the one a run stopped there takes at its end, taking it
    does not disturb training, and the dynamics rows are the boundary scores summed per segment."""
    model_cls = type("MLPWithValidation", (WithValidation, mlp_cls), {})
    val = make_loader(n=40, batch_size=20, offset=100)

    def train(root: Path, **kwargs) -> tuple:
        model = model_cls().double()
        dve = DataValueEmbedding(root, projection_dim=32, storage_dtype="float64", **kwargs)
        fit(model, dve, make_loader(), val, precision="64-true", max_epochs=3)
        return model, dve

    model, dve = train(tmp_path / "long", segments=3)
    emb = dve.embeddings
    assert emb.segment_boundaries == [3, 7, 11]
    saved = emb.store.read_references()
    assert sorted(saved) == [3, 7]
    short_model = model_cls().double()
    short = DataValueEmbedding(tmp_path / "short", projection_dim=32, storage_dtype="float64")
    fit(short_model, short, make_loader(), val, precision="64-true", max_steps=4)
    from lightning_dve.reporting_reference import reference_gradient

    expected = reference_gradient(short.embeddings, short_model, list(val), lambda b: float64_batch(b), 256, "val",
                                  False)
    for name, grad in saved[3].items():
        torch.testing.assert_close(grad, expected.gradients[name], rtol=1e-10, atol=1e-14)
    quiet_model, _ = train(tmp_path / "quiet", segments=3, report=None)
    for p, q in zip(model.parameters(), quiet_model.parameters()):
        assert torch.equal(p, q)  # the mid-training reference query left the trajectory untouched
    rows = [line.split(",") for line in (tmp_path / "long" / "report" / "dynamics.csv").read_text().splitlines()[1:]]
    assert [(int(r[0]), int(r[2])) for r in rows] == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
    # boundary_step is the boundary's last step; each segment's steps are its recorded ones (4 steps each)
    assert [(int(r[1]), int(r[3]), int(r[4])) for r in rows] == [(3, 0, 3), (7, 0, 3), (7, 4, 7), (11, 0, 3),
                                                                 (11, 4, 7), (11, 8, 11)]
    at_first = emb.score(saved[3], per_step=True, boundary=0)
    assert float(rows[0][5]) == pytest.approx(float(at_first.scores.sum()), rel=1e-12)


def test_the_boundary_reference_waits_for_a_slow_disk(mlp_cls: type, fit: Callable, make_loader: Callable,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the step files written in the background (as on a GPU; forced here on the CPU), the first one taking a
    second (a slow disk), and the first boundary right after it (2 steps in 2 segments): the boundary's reference
    gradient is still taken (once the step before it is on disk), not skipped as if nothing had been recorded."""
    import time
    import warnings

    from lightning_dve import callback as callback_module
    from lightning_dve.writer import StepWriter

    slow_once = TrajectoryStore.append

    def slow_append(store: TrajectoryStore, record: StepRecord) -> None:
        if record.step == 0:
            time.sleep(1.0)
        slow_once(store, record)

    monkeypatch.setattr(TrajectoryStore, "append", slow_append)
    monkeypatch.setattr(callback_module, "StepWriter", lambda store, **kwargs: StepWriter(store, background=True))
    model_cls = type("MLPWithValidation", (WithValidation, mlp_cls), {})
    dve = DataValueEmbedding(tmp_path / "dve", projection_dim=32, segments=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*influence report is skipped")
        fit(model_cls(), dve, make_loader(n=32), make_loader(n=40, batch_size=20, offset=100))
    assert dve.embeddings.segment_boundaries == [0, 1]
    assert sorted(dve.embeddings.store.read_references()) == [0]
