"""DVEConfig: validation messages, manifest (de)serialisation and the settings hash."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from lightning_dve.config import AUTO_FULL_MAX_DIM, DEFAULT_PROJECTION_DIM, AccumulatorLayout, DVEConfig, LossReduction
from lightning_dve.errors import ConfigError

# --- projection_dim ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 1.5, True, False, "1024", 1024.0])
def test_bad_projection_dim_is_rejected(value):
    with pytest.raises(ConfigError, match=rf"projection_dim must be a positive int .* or None .*; got {re.escape(repr(value))}\."):
        DVEConfig(projection_dim=value)


@pytest.mark.parametrize("value", [1, 7, DEFAULT_PROJECTION_DIM, None])
def test_good_projection_dim_is_kept(value):
    config = DVEConfig(projection_dim=value)
    assert config.projection_dim == value
    assert config.exact is (value is None)


# --- layers / exclude ----------------------------------------------------------------------------------


def test_string_layers_is_rejected_suggesting_a_tuple():
    with pytest.raises(ConfigError, match=r"layers must be a sequence of module names, not a string; got 'net\.0'\. "
                                          r"Use layers=\('net\.0',\)\."):
        DVEConfig(layers="net.0")


def test_string_exclude_is_rejected_suggesting_a_tuple():
    with pytest.raises(ConfigError, match=r"exclude must be a sequence of module names, not a string; got 'head'\. "
                                          r"Use exclude=\('head',\)\."):
        DVEConfig(exclude="head")


def test_layer_sequences_become_tuples():
    config = DVEConfig(layers=["a", "b"], exclude=["c*"])
    assert config.layers == ("a", "b") and config.exclude == ("c*",)
    assert config == DVEConfig(layers=("a", "b"), exclude=("c*",))


# --- enums ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "enum_type", "bad"),
    [("loss_reduction", LossReduction, "avg"), ("loss_reduction", LossReduction, None),
     ("layout", AccumulatorLayout, "diagonal"), ("layout", AccumulatorLayout, "PER_LAYER")],
)
def test_bad_enum_value_lists_every_allowed_value(field, enum_type, bad):
    with pytest.raises(ConfigError, match=rf"{enum_type.__name__} got {re.escape(repr(bad))}; allowed values are") as info:
        DVEConfig(**{field: bad})
    message = str(info.value)
    for member in enum_type:
        assert repr(member.value) in message, (member, message)


@pytest.mark.parametrize("value", ["sum", LossReduction.SUM])
def test_enum_accepts_member_or_value(value):
    config = DVEConfig(loss_reduction=value, layout="full")
    assert config.loss_reduction is LossReduction.SUM
    assert config.layout is AccumulatorLayout.FULL


@pytest.mark.parametrize("value", [True, 1.0, "0", None])
def test_bad_seed_is_rejected(value):
    with pytest.raises(ConfigError, match=rf"seed must be an int; got {re.escape(repr(value))}\."):
        DVEConfig(seed=value)


# --- to_dict / from_dict -------------------------------------------------------------------------------

CONFIGS = [
    DVEConfig(),
    DVEConfig(projection_dim=None, loss_reduction="sum", layers=("net.0", "net.2"), exclude=("head*",),
              layout="full", allow_duplicate_ids=True, seed=17),
    DVEConfig(projection_dim=3, loss_reduction=LossReduction.WEIGHTS, layers=("net.1",), seed=-4),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_round_trip_through_json(config):
    data = json.loads(json.dumps(config.to_dict()))
    restored = DVEConfig.from_dict(data)
    assert restored == config
    assert restored.settings_hash() == config.settings_hash()
    assert isinstance(restored.loss_reduction, LossReduction) and isinstance(restored.layout, AccumulatorLayout)
    assert restored.layers is None or isinstance(restored.layers, tuple)
    assert isinstance(restored.exclude, tuple)


def test_to_dict_is_plain_json():
    data = CONFIGS[1].to_dict()
    assert data == {"projection_dim": None, "loss_reduction": "sum", "layers": ["net.0", "net.2"],
                    "exclude": ["head*"], "layout": "full", "allow_duplicate_ids": True, "seed": 17,
                    "storage_dtype": "auto", "segments": 1, "curvature": "empirical_fisher",
                    "checkpoint_interval": "auto",
                    "adam_second_moment": False}


def test_unknown_keys_are_rejected():
    data = DVEConfig().to_dict()
    data["projection"] = 64
    data["zz_extra"] = 1
    with pytest.raises(ConfigError, match=r"unknown settings \['projection', 'zz_extra'\] in manifest; known settings "
                                          r"are \['adam_second_moment', 'allow_duplicate_ids', 'checkpoint_interval', "
                                          r"'curvature', 'exclude', 'layers', 'layout', 'loss_reduction', "
                                          r"'projection_dim', 'seed', 'segments', 'storage_dtype'\]"):
        DVEConfig.from_dict(data)


def test_from_dict_validates_values():
    data = DVEConfig().to_dict()
    data["layout"] = "blockwise"
    with pytest.raises(ConfigError, match=r"AccumulatorLayout got 'blockwise'; allowed values are 'auto', 'per_layer', 'full'"):
        DVEConfig.from_dict(data)


# --- settings_hash -------------------------------------------------------------------------------------

#: One changed value per field: every field must move the hash (a new field must be added here).
VARIANTS = {
    "projection_dim": [None, 1023, 1],
    "loss_reduction": ["sum", "weights"],
    "layers": [("net.0",), ("net.0", "net.2"), ("net.2", "net.0")],
    "exclude": [("net.0",), ("net.*",)],
    "layout": ["full"],
    "allow_duplicate_ids": [True],
    "seed": [1, -1],
    "storage_dtype": ["float64", "float32", "bfloat16", "float16"],
    "segments": [2, 5],
    "curvature": ["ggn", "none"],
    "checkpoint_interval": [None, 1, 7],
    "adam_second_moment": [True],
}
#: Other settings a variant needs to be valid.
NEEDS = {"adam_second_moment": {"projection_dim": None}}


def test_settings_hash_is_pinned_and_stable():
    """Manifests written by an earlier version must keep matching: the default hash is pinned."""
    per_layer = DVEConfig().resolved(AUTO_FULL_MAX_DIM + 1)  # stores hold the resolved layout
    assert per_layer.settings_hash() == "71e764a3caf5f8b9"
    assert DVEConfig().settings_hash() == DVEConfig().settings_hash()
    same = DVEConfig(projection_dim=DEFAULT_PROJECTION_DIM, loss_reduction=LossReduction.MEAN, layers=None,
                     exclude=[], layout=AccumulatorLayout.PER_LAYER, allow_duplicate_ids=False, seed=0)
    assert same.settings_hash() == per_layer.settings_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", DVEConfig().settings_hash())


def test_settings_hash_is_sensitive_to_every_field():
    assert set(VARIANTS) == {field.name for field in dataclasses.fields(DVEConfig)}
    hashes = {DVEConfig().settings_hash(): "default"}
    for field, values in VARIANTS.items():
        for value in values:
            digest = DVEConfig(**{field: value, **NEEDS.get(field, {})}).settings_hash()
            assert digest not in hashes, (field, value, hashes.get(digest))
            hashes[digest] = f"{field}={value!r}"


def test_adam_second_moment_needs_exact_gradients():
    with pytest.raises(ConfigError, match=r"adam_second_moment=True needs exact per-sample gradients "
                                          r"\(projection_dim=None\).*got projection_dim=1024"):
        DVEConfig(adam_second_moment=True)
    with pytest.raises(ConfigError, match="adam_second_moment must be a bool; got 1"):
        DVEConfig(adam_second_moment=1, projection_dim=None)


def test_added_fields_at_default_keep_old_hashes():
    """A manifest written before ``curvature`` existed has no such key: it must read back to the same hash."""
    old = DVEConfig().to_dict()
    del old["curvature"]
    assert DVEConfig.from_dict(old).settings_hash() == DVEConfig().settings_hash()


def test_settings_hash_independent_of_input_spelling():
    assert DVEConfig(layers=["a"], layout="full").settings_hash() == DVEConfig(
        layers=("a",), layout=AccumulatorLayout.FULL).settings_hash()


@pytest.mark.parametrize("value", [0, -3, 1.5, True, "never", "AUTO"])
def test_bad_checkpoint_interval_is_rejected(value):
    with pytest.raises(ConfigError, match=rf"checkpoint_interval must be a positive int .*, 'auto' or None \(off\); "
                                          rf"got {re.escape(repr(value))}\."):
        DVEConfig(checkpoint_interval=value)


@pytest.mark.parametrize("value", [0, -1, 2.0, True, False, "2"])
def test_bad_segments_is_rejected(value):
    with pytest.raises(ConfigError, match=rf"segments must be a positive int \(1 = one sequential recursion\); "
                                          rf"got {re.escape(repr(value))}\."):
        DVEConfig(segments=value)


def test_checkpoint_interval_at_default_keeps_old_hashes():
    old = DVEConfig().to_dict()
    del old["checkpoint_interval"]
    assert DVEConfig.from_dict(old).settings_hash() == DVEConfig().settings_hash()


def test_auto_layout_is_full_up_to_the_limit_and_per_layer_above():
    assert DVEConfig().layout is AccumulatorLayout.AUTO
    assert DVEConfig().resolved(AUTO_FULL_MAX_DIM).layout is AccumulatorLayout.FULL
    assert DVEConfig().resolved(AUTO_FULL_MAX_DIM + 1).layout is AccumulatorLayout.PER_LAYER
    for explicit in (AccumulatorLayout.FULL, AccumulatorLayout.PER_LAYER):  # a user's choice is kept at any size
        assert DVEConfig(layout=explicit).resolved(1).layout is explicit
        assert DVEConfig(layout=explicit).resolved(10**6).layout is explicit


@pytest.mark.parametrize("field", ["layers", "exclude"])
def test_callback_refuses_a_string_for_layers_or_exclude(field):
    """The callback must not split a bare string into characters before DVEConfig sees it."""
    from lightning_dve import DataValueEmbedding

    with pytest.raises(ConfigError, match=rf"{field} must be a sequence of module names, not a string; got 'net\.0'\. "
                                          rf"Use {field}=\('net\.0',\)\."):
        DataValueEmbedding(**{field: "net.0"})


@pytest.mark.parametrize("field", ["layers", "exclude"])
def test_non_string_layer_names_are_refused(field):
    with pytest.raises(ConfigError, match=rf"{field} must hold module names \(str\); got \[3\]"):
        DVEConfig(**{field: ["net.0", 3]})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"layers": 5}, r"layers must be a sequence of module names \(a list or tuple of str\); got 5\. Pass layers=None"),
    ({"exclude": 5}, r"exclude must be a sequence of module names \(a list or tuple of str\); got 5\. Use "
                     r"exclude=\(\)"),
    ({"exclude": {"net.0": 1}}, r"exclude must be a sequence .*got \{'net\.0': 1\}"),
    ({"layers": {"net.0"}}, r"layers must be a sequence .*got \{'net\.0'\}"),
    ({"layers": []}, r"layers=\[\] names no module\. Pass layers=None to track every supported layer"),
    ({"sample_ids": ""}, r"sample_ids must be a dict key \(str\) or a callable .*got ''"),
    ({"save_dir": ""}, r"save_dir must be a path .*got '' \(an empty one would be the working directory itself\)"),
    ({"reference": 5}, r"reference must be a batch as the training loader yields one, a DataLoader .*got 5"),
    ({"reference": "val"}, r"reference must be a batch .*got 'val'"),
])
def test_the_callback_refuses_malformed_arguments_when_it_is_built(kwargs, message):
    """Found by an audit: a bare TypeError (layers=5), a dict's keys taken as names, and arguments refused only at
    fit start or the first step (layers=[], sample_ids=""), at train end with a misleading hint (reference=5), or
    never (save_dir="" recorded into the working directory itself, beside the user's files)."""
    from lightning_dve import DataValueEmbedding

    with pytest.raises(ConfigError, match=message):
        DataValueEmbedding(**kwargs)


def test_repeated_layer_names_are_one_layer_with_one_settings_hash():
    assert DVEConfig(layers=["net.0", "net.0", "net.2"]).layers == ("net.0", "net.2")
    assert (DVEConfig(layers=("net.0", "net.0")).settings_hash() == DVEConfig(layers=("net.0",)).settings_hash())


def test_exclude_none_is_refused_naming_the_fix():
    with pytest.raises(ConfigError, match=r"exclude must be a sequence .*got None\. Use exclude=\(\)"):
        DVEConfig(exclude=None)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"report": True}, r"report must be a ReportConfig or None \(no report\); got True\."),
    ({"report": {"top_k": 3}}, r"report must be a ReportConfig or None .*got \{'top_k': 3\}"),
    ({"describe": "label"}, r"describe must be a callable sample -> str or None; got 'label'\."),
    ({"save_dir": 123}, r"save_dir must be a path \(str or os\.PathLike\) or None .*got 123\."),
    ({"overwrite": "no"}, r"overwrite must be a bool .*got 'no'\."),
    ({"allow_duplicate_ids": "no"}, r"allow_duplicate_ids must be a bool; got 'no'\."),
])
def test_callback_refuses_arguments_of_the_wrong_type_at_construction(kwargs, message):
    """Refused when built, not after training (report, describe) nor silently by truthiness (overwrite='no')."""
    from lightning_dve import DataValueEmbedding

    with pytest.raises(ConfigError, match=message):
        DataValueEmbedding(**kwargs)


def test_numpy_integers_are_taken_as_ints():
    """Counts computed with numpy (``np.int64``) were refused as not an int; they are plain ints in the settings
    (JSON, hash) and in the report options."""
    import numpy as np

    from lightning_dve.config import ReportConfig

    config = DVEConfig(projection_dim=np.int64(64), segments=np.int32(2), seed=np.int64(3),
                       checkpoint_interval=np.int64(5))
    plain = DVEConfig(projection_dim=64, segments=2, seed=3, checkpoint_interval=5)
    assert config == plain
    assert type(config.projection_dim) is int and json.loads(json.dumps(config.to_dict()))["seed"] == 3
    assert config.settings_hash() == plain.settings_hash()
    report = ReportConfig(top_k=np.int64(3), max_reference_samples=np.int64(40), histogram_bins=np.int16(8))
    assert (report.top_k, report.max_reference_samples, report.histogram_bins) == (3, 40, 8)
    with pytest.raises(ConfigError, match="projection_dim must be a positive int"):
        DVEConfig(projection_dim=np.int64(0))


def test_the_callback_refuses_the_string_weights_asking_for_the_callable():
    """``"weights"`` is an option's value (what a callable gives), listed among the allowed ones: as a string it
    passed and the first step failed with a message for queries of a loaded store."""
    from lightning_dve import DataValueEmbedding

    with pytest.raises(ConfigError, match=r"loss_reduction='weights' names what a callable gives: pass the callable "
                                          r"itself, batch -> Tensor\[B\]"):
        DataValueEmbedding(loss_reduction="weights")


def test_a_wrong_option_names_the_argument_and_the_case():
    from lightning_dve import DataValueEmbedding

    with pytest.raises(ConfigError, match=r"^layout: AccumulatorLayout got 'blocks'; allowed values are .*'full'\.$"):
        DVEConfig(layout="blocks")
    with pytest.raises(ConfigError, match=r"^curvature: Curvature got 'GGN'; allowed values are .* \(lower case: "
                                          r"'ggn'\)\.$"):
        DVEConfig(curvature="GGN")
    with pytest.raises(ConfigError, match=r"^embeddings: EmbeddingMethod got 'both'; allowed values are"):
        DataValueEmbedding(embeddings="both")
    with pytest.raises(ConfigError, match=r"^loss_reduction: LossReduction got 'avg'; allowed values are 'mean', "
                                          r"'sum', or a callable batch -> Tensor\[B\] of per-sample weights"):
        DataValueEmbedding(loss_reduction="avg")  # not "'weights'" as a value to pass: that string is refused
