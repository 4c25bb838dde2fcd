"""Label-free auto-configuration: probes drawn from the collection, tuning at index time, the
record it leaves (saved, loaded, kept across adds, shown by ``himir info``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from himir_rag.autoconfig import Trial, _choose_auto, _prunes, _sign_test, _significantly_below, apply, apply_record, auto_tune, tune
from himir_rag.cli import app
from himir_rag.config import HiMIRConfig
from himir_rag.errors import ConfigError
from himir_rag.hierarchy import Level
from himir_rag.index import HiMIRIndex
from himir_rag.probes import default_vocabulary, probe_queries, text_probes
from himir_rag.scheduler import SchedulerParams
from tests.conftest import make_scene
from tests.test_engine import F32, _NoEncoder, planted_snapshot


@pytest.fixture(scope="module")
def planted_index():
    snapshot, _, _, _ = planted_snapshot(600)
    return HiMIRIndex.from_snapshot(snapshot, encoder=_NoEncoder(), config=F32)


def test_probes_are_deterministic_for_a_seed_and_drawn_from_the_collection(planted_index):
    snapshot = planted_index.snapshot
    a, b = probe_queries(snapshot, count=12, seed=3), probe_queries(snapshot, count=12, seed=3)
    other = probe_queries(snapshot, count=12, seed=4)
    assert len(a) == 12
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.vectors, y.vectors)
        assert x.source == y.source
    assert any(x.source != y.source for x, y in zip(a, other))
    for probe in a:
        assert 2 <= len(probe.vectors) <= 3
        np.testing.assert_allclose(np.linalg.norm(probe.vectors, axis=1), 1.0, rtol=1e-5)
        rows = snapshot.image_rows(probe.source)
        rows = rows[snapshot.levels[rows] != Level.GLOBAL]
        sims = probe.vectors @ snapshot.region_vectors(rows).T
        # each sub-query is turned 0.6 (cosine) away from its own region of the source photo
        assert np.allclose(sims.max(axis=1), 0.6, atol=1e-4)
        assert len(set(sims.argmax(axis=1).tolist())) == len(probe.vectors)


def _random_vocabulary(dim, *, seed, size=40):
    """``size`` made-up words and random unit embeddings for them."""
    embeddings = np.random.default_rng(seed).normal(size=(size, dim)).astype(np.float32)
    return [f"w{i}" for i in range(size)], embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def test_text_probes_are_deterministic_and_name_the_words_their_regions_evoke(planted_index):
    snapshot = planted_index.snapshot
    words, embeddings = _random_vocabulary(snapshot.dim, seed=7)
    a = text_probes(snapshot, words, embeddings, count=15, seed=3)
    b = text_probes(snapshot, words, embeddings, count=15, seed=3)
    assert len(a) == 15
    assert [(p.source, p.texts) for p in a] == [(p.source, p.texts) for p in b]
    assert [p.source for p in a] != [p.source for p in text_probes(snapshot, words, embeddings, count=15, seed=4)]
    for probe in a:
        assert 1 <= len(probe.texts) <= 3 and len(set(probe.texts)) == len(probe.texts)
        rows = snapshot.image_rows(probe.source)
        rows = rows[snapshot.levels[rows] != Level.GLOBAL]
        evoked = {words[w] for w in np.argmax(snapshot.region_vectors(rows) @ embeddings.T, axis=1)}
        assert set(probe.texts) <= evoked  # each word is the nearest word of one of the photo's regions
        for text, vector in zip(probe.texts, probe.vectors):
            np.testing.assert_array_equal(vector, embeddings[words.index(text)])
    with pytest.raises(ValueError, match="one row per word"):
        text_probes(snapshot, words[:3], embeddings, count=2)
    with pytest.raises(ValueError, match="dims"):
        text_probes(snapshot, words, embeddings[:, :5], count=2)
    with pytest.raises(ValueError, match="subqueries"):
        text_probes(snapshot, words, embeddings, count=2, subqueries=(0, 2))
    with pytest.raises(ValueError, match="subqueries"):
        probe_queries(snapshot, count=2, subqueries=(3, 2))


def test_text_probes_with_ranks_name_one_of_each_regions_nearest_words(planted_index):
    snapshot = planted_index.snapshot
    words, embeddings = _random_vocabulary(snapshot.dim, seed=8)
    a = text_probes(snapshot, words, embeddings, count=30, seed=5, ranks=4)
    assert [p.texts for p in a] == [p.texts for p in text_probes(snapshot, words, embeddings, count=30, seed=5, ranks=4)]
    nearest_only = text_probes(snapshot, words, embeddings, count=30, seed=5)
    assert [p.source for p in a] == [p.source for p in nearest_only]  # the same photos, other words
    assert [p.texts for p in a] != [p.texts for p in nearest_only]
    lower_ranked = 0
    for probe in a:
        rows = snapshot.image_rows(probe.source)
        rows = rows[snapshot.levels[rows] != Level.GLOBAL]
        order = np.argsort(-(snapshot.region_vectors(rows) @ embeddings.T), axis=1)
        top4 = {words[w] for w in order[:, :4].ravel()}
        assert set(probe.texts) <= top4  # each word is among the 4 nearest of one of the photo's regions
        lower_ranked += len(set(probe.texts) - {words[w] for w in order[:, 0]})
    assert lower_ranked > 0
    with pytest.raises(ValueError, match="ranks"):
        text_probes(snapshot, words, embeddings, count=2, ranks=0)


def test_the_default_vocabulary_is_the_shipped_class_names():
    vocabulary = default_vocabulary()
    assert len(vocabulary) == len(set(vocabulary)) == 998  # "crane" and "maillot" name two classes each
    assert all(isinstance(w, str) and w for w in vocabulary) and "tabby" in vocabulary


def test_auto_tune_probes_with_text_when_the_encoder_embeds_texts(tmp_path, color_encoder, planted_index):
    assert auto_tune(planted_index, probes=8, passes=1)["probe_kind"] == "vectors"  # no text encoder
    with pytest.raises(NotImplementedError):
        auto_tune(planted_index, probes=8, passes=1, probe_kind="text")
    with pytest.raises(ValueError, match="probe_kind"):
        auto_tune(planted_index, probes=8, passes=1, probe_kind="words")
    index = HiMIRIndex(color_encoder, HiMIRConfig())
    index.add(_photos(tmp_path / "photos", 12), progress=False)
    record = auto_tune(index, probes=8, passes=1)
    assert record["probe_kind"] == "text" and record["probes"] == 8 and record["probe_ranks"] == 1
    assert record["agreement_floor"] == min(record["min_agreement"], record["before"]["agreement"])
    assert auto_tune(index, probes=8, passes=1, probe_ranks=3)["probe_ranks"] == 3
    vectors = auto_tune(index, probes=8, passes=1, probe_kind="vectors")
    assert vectors["probe_kind"] == "vectors" and "probe_ranks" not in vectors  # ranks are words' ranks


def test_a_saved_index_whose_encoder_cannot_be_rebuilt_falls_back_to_vector_probes(tmp_path, planted_index):
    from himir_rag.bench.scale import VectorsOnlyEncoder

    snapshot = planted_index.snapshot
    HiMIRIndex.from_snapshot(snapshot, encoder=VectorsOnlyEncoder(snapshot.dim), config=F32).save(tmp_path / "idx")
    loaded = HiMIRIndex.load(tmp_path / "idx")  # its encoder spec names no encoder this library can build
    assert auto_tune(loaded, probes=8, passes=1)["probe_kind"] == "vectors"
    with pytest.raises(ConfigError, match="unknown"):
        auto_tune(loaded, probes=8, passes=1, probe_kind="text")


def _trial(accuracy, agreement, dots):
    return Trial({"candidate_k": int(dots)}, accuracy, float(dots), 1.0, agreement)


def test_the_rule_keeps_the_cheapest_trial_that_reaches_both_floors():
    trials = [_trial(0.80, 0.99, 900), _trial(0.80, 0.95, 500), _trial(0.80, 0.93, 200), _trial(0.70, 0.99, 100)]
    assert _choose_auto(trials, 0.795, 0.94, None, None).dot_products == 500  # 200 agrees too little, 100 misses
    assert _choose_auto(trials, 0.795, 0.90, None, None).dot_products == 200
    # nobody reaches the agreement floor (synthetic vectors): the recall floor alone decides
    assert _choose_auto(trials[1:3], 0.795, 0.99, None, None).dot_products == 200
    # nobody reaches the recall: the most accurate compete
    assert _choose_auto([_trial(0.5, 0.99, 300), _trial(0.6, 0.90, 400)], 0.8, 0.94, None, None).dot_products == 400
    # a budget: the most accurate trial within it
    assert _choose_auto(trials, 0.795, 0.94, 250, None).dot_products in (100, 200)
    with pytest.raises(ValueError, match="min_agreement"):
        auto_tune(HiMIRIndex.from_snapshot(planted_snapshot(20)[0], encoder=_NoEncoder(), config=F32), min_agreement=1.5)


def test_auto_tune_keeps_the_cheapest_setting_as_accurate_as_himir_full(planted_index):
    record = auto_tune(planted_index, probes=16, passes=1)
    assert record["source"] == "auto" and record["probes"] == 16 and record["reference"] == "himir-full"
    floor = record["himir_full"]["recall"] - record["tolerance"]
    assert record["recall"] >= floor - 1e-9 or record["recall"] >= record["before"]["recall"]
    assert record["dot_products"] <= record["before"]["dot_products"] or record["before"]["recall"] < floor
    assert record["dot_products"] < record["himir_full"]["dot_products"]
    assert record["trials"] > 5
    json.dumps(record, allow_nan=False)  # plain JSON, as saved in the manifest
    assert auto_tune(planted_index, probes=16, passes=1)["params"] == record["params"]  # deterministic


def test_a_setting_that_scores_every_image_is_not_a_pruning_setting():
    full = Trial({"mode": "himir-full"}, 0.8, 1000.0, 1.0, 1.0)
    assert _prunes(Trial({}, 0.8, 400.0, 1.0, 0.95, (), 60.0), full, 400)
    assert not _prunes(Trial({"probe_share": 0.3}, 0.8, 980.0, 1.0, 1.0, (), 400.0), full, 400)  # every image
    assert not _prunes(Trial({}, 0.8, 1000.0, 1.0, 1.0, (), 60.0), full, 400)  # no cheaper
    assert _prunes(Trial({}, 0.8, 400.0, 1.0, 0.95), full, 400)  # no count: the dot products decide


def test_the_recall_floor_falls_to_the_current_setting_only_within_chance():
    def trial(hits):
        return Trial({}, float(np.mean(hits)), 1.0, 1.0, 1.0, tuple(float(h) for h in hits))

    reference = trial([1] * 20)
    assert not _significantly_below(trial([0] * 4 + [1] * 16), reference)  # 4 of 4 differing: p = 1/16
    assert _significantly_below(trial([0] * 5 + [1] * 15), reference)  # 5 of 5: p = 1/32
    assert not _significantly_below(trial([1] * 20), reference)
    mixed = trial([0] * 6 + [1] * 14)
    assert _significantly_below(mixed, trial([1] * 20))  # 6 worse, none better: p = 1/64
    five_two = trial([1] * 5 + [0] * 3 + [1] * 12)  # mixed against it: 5 worse, 2 better
    assert _sign_test(mixed, five_two) == (5, 2, pytest.approx(29 / 128))  # P(X >= 5 | 7 differing)
    assert not _significantly_below(mixed, five_two)
    assert _sign_test(five_two, mixed) == (2, 5, 1.0)  # not worse at all
    with pytest.raises(ValueError, match="workloads"):
        _significantly_below(mixed, trial([1] * 5))


def test_auto_tune_starts_from_the_current_setting_the_probes_cannot_tell_from_the_reference(planted_index):
    record = auto_tune(planted_index, probes=16, passes=1)  # 2 probes of 16 the defaults miss: chance
    before, full = record["before"], record["himir_full"]
    assert before["recall"] < full["recall"] - record["tolerance"]
    assert record["recall_floor"] == before["recall"]
    assert record["recall"] >= before["recall"] and record["dot_products"] <= before["dot_products"]


def test_auto_tune_keeps_the_current_setting_for_a_small_saving(planted_index):
    # wide floors: the current setting reaches them on these probes, and cheaper settings too
    record = auto_tune(planted_index, probes=16, passes=1, tolerance=0.2, min_agreement=0.0, min_saving=0.0)
    before = record["before"]
    assert record["min_saving"] == 0.0 and before["recall"] >= record["himir_full"]["recall"] - 0.2
    saving = 1.0 - record["dot_products"] / before["dot_products"]
    assert 0.0 < saving < 0.99, record  # the planted collection's tuner finds a cheaper setting
    kept = auto_tune(planted_index, probes=16, passes=1, tolerance=0.2, min_agreement=0.0,
                     min_saving=round(saving + 0.005, 3))
    assert kept["params"] == before["params"] and kept["dot_products"] == before["dot_products"]
    # a current setting significantly below the reference never stays for want of a saving
    strict = auto_tune(planted_index, probes=64, passes=1, min_saving=0.9)
    assert strict["recall_floor"] == strict["himir_full"]["recall"] - strict["tolerance"]
    assert strict["before"]["recall"] < strict["recall_floor"] and strict["params"] != strict["before"]["params"]
    with pytest.raises(ValueError, match="min_saving"):
        auto_tune(planted_index, probes=4, passes=1, min_saving=1.0)
    with pytest.raises(ValueError, match="probes and probe_ranks"):
        auto_tune(planted_index, probes=0)
    with pytest.raises(ValueError, match="probes and probe_ranks"):
        auto_tune(planted_index, probes=4, probe_ranks=0)  # refused even where vector probes are drawn


def test_auto_tune_respects_a_budget(planted_index):
    free = auto_tune(planted_index, probes=16, passes=1)
    budget = 0.9 * free["before"]["dot_products"]
    record = auto_tune(planted_index, probes=16, passes=1, budget_dot_products=budget)
    assert record["dot_products"] <= budget and record["budget_dot_products"] == budget


def _photos(root, count, start=0):
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    for i in range(start, start + count):
        a, b = colours[i % 6], colours[(i // 6 + 1 + i) % 6]
        make_scene(root / f"p{i:03d}.png", [(a, (5 + i % 40, 5, 60 + i % 40, 50)), (b, (90, 60, 150, 110))])
    return root


def test_index_time_tuning_record_survives_save_load_and_small_adds(tmp_path, color_encoder):
    config = HiMIRConfig(auto_tune=True, auto_tune_min_images=8, auto_tune_probes=24)
    index = HiMIRIndex(color_encoder, config)
    report = index.add(_photos(tmp_path / "photos", 10), progress=False)
    assert report.auto_tuned and index.autoconfig["images"] == 10
    assert index.config.scheduler == SchedulerParams.from_dict(index.autoconfig["params"])
    index.save(tmp_path / "idx")
    loaded = HiMIRIndex.load(tmp_path / "idx", encoder=color_encoder)
    assert loaded.autoconfig == index.autoconfig and loaded.config.scheduler == index.config.scheduler
    # grew by less than 2x: not tuned again
    report = loaded.add(_photos(tmp_path / "photos", 4, start=10), progress=False)
    assert not report.auto_tuned and loaded.autoconfig["images"] == 10
    # 2x the size it was tuned at: tuned again
    report = loaded.add(_photos(tmp_path / "photos", 8, start=14), progress=False)
    assert report.auto_tuned and loaded.autoconfig["images"] == 22


def test_no_automatic_tuning_over_hand_set_or_user_tuned_parameters(tmp_path, color_encoder):
    hand = HiMIRIndex(color_encoder,
                      HiMIRConfig(auto_tune=True, auto_tune_min_images=4, auto_tune_probes=24,
                                  scheduler={"candidate_k": 8}))
    assert not hand.add(_photos(tmp_path / "a", 6), progress=False).auto_tuned
    assert hand.autoconfig is None and hand.config.scheduler.overrides() == {"candidate_k": 8}
    off = HiMIRIndex(color_encoder, HiMIRConfig(auto_tune=False, auto_tune_min_images=4, auto_tune_probes=24))
    assert not off.add(_photos(tmp_path / "b", 6), progress=False).auto_tuned
    tuned = HiMIRIndex(color_encoder, HiMIRConfig(auto_tune=True, auto_tune_min_images=100, auto_tune_probes=24))
    tuned.add(_photos(tmp_path / "c", 6), progress=False)
    apply(tuned, tune(tuned, ["red and blue", "green"], k=3, passes=1))
    assert tuned.autoconfig["source"] == "tune" and tuned.autoconfig["queries"] == 2
    tuned.set_config(tuned.config.replace(auto_tune_min_images=4))
    assert not tuned.add(_photos(tmp_path / "c", 6, start=6), progress=False).auto_tuned
    assert tuned.autoconfig["source"] == "tune"


def test_index_time_tuning_is_on_by_default_within_its_size_range(tmp_path, color_encoder):
    assert HiMIRConfig().auto_tune and HiMIRConfig().auto_tune_min_images <= HiMIRConfig().auto_tune_max_images
    default = HiMIRIndex(color_encoder, HiMIRConfig(auto_tune_min_images=4, auto_tune_probes=24))
    assert default.add(_photos(tmp_path / "a", 6), progress=False).auto_tuned
    assert default.autoconfig["source"] == "auto" and default.autoconfig["images"] == 6
    # above auto_tune_max_images the probes' exhaustive reference costs too much: the defaults stay
    large = HiMIRIndex(color_encoder, HiMIRConfig(auto_tune_min_images=4, auto_tune_max_images=5, auto_tune_probes=24))
    assert not large.add(_photos(tmp_path / "b", 6), progress=False).auto_tuned
    assert large.autoconfig is None and large.config.scheduler.overrides() == {}


def test_auto_tune_settings_are_validated():
    with pytest.raises(ConfigError, match="auto_tune_growth"):
        HiMIRConfig(auto_tune_growth=1.0)
    with pytest.raises(ConfigError, match="auto_tune_max_images"):
        HiMIRConfig(auto_tune_min_images=500, auto_tune_max_images=400)
    with pytest.raises(ConfigError, match="auto_tune_probes"):
        HiMIRConfig(auto_tune_probes=0)
    with pytest.raises(ConfigError, match="auto_tune must be"):
        HiMIRConfig(auto_tune="yes")


def test_himir_info_prints_counts_and_the_autoconfig_record(tmp_path, color_encoder):
    index = HiMIRIndex(color_encoder, HiMIRConfig(auto_tune=True, auto_tune_min_images=4, auto_tune_probes=24))
    index.add(_photos(tmp_path / "photos", 6), progress=False)
    index.save(tmp_path / "idx")
    runner = CliRunner()
    text = runner.invoke(app, ["info", str(tmp_path / "idx")])
    assert text.exit_code == 0, text.output
    assert "images     6" in text.output and "auto-tuned" in text.output and "1+4+16" in text.output
    assert "24 text probes" in text.output and "min agreement 0.94" in text.output  # the colour encoder embeds texts
    as_json = runner.invoke(app, ["info", str(tmp_path / "idx"), "--json"])
    assert as_json.exit_code == 0, as_json.output
    info = json.loads(as_json.output)
    assert info["counts"]["images"] == 6 and info["autoconfig"] == index.autoconfig
    assert info["bytes_on_disk"]["live_version"] > 0 and info["encoder"]["name"] == "test:color"
    missing = runner.invoke(app, ["info", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "error:" in missing.output and "Traceback" not in missing.output
    # the floors the choice had to reach, where they fell to the current setting's own figures
    from himir_rag.info import format_info

    record = {**index.autoconfig, "tolerance": 0.005, "himir_full": {**index.autoconfig["himir_full"], "recall": 0.8},
              "recall_floor": 0.78, "min_agreement": 0.94, "agreement_floor": 0.9}
    shown = format_info({**info, "autoconfig": record})
    assert "recall floor 0.780: the current setting's, within chance" in shown and "(floor 0.900)" in shown
    plain = format_info({**info, "autoconfig": {**record, "recall_floor": 0.795, "agreement_floor": 0.94}})
    assert "recall floor" not in plain and "(floor" not in plain


def test_himir_info_resolves_the_size_dependent_scheduler_defaults(tmp_path, color_encoder):
    index = HiMIRIndex(color_encoder, HiMIRConfig())
    index.add(_photos(tmp_path / "photos", 3), progress=False)
    index.save(tmp_path / "idx")
    info = json.loads(CliRunner().invoke(app, ["info", str(tmp_path / "idx"), "--json"]).output)
    assert info["config"]["scheduler"] == {}  # nothing set by hand
    effective = info["scheduler_effective"]
    assert effective["probe_share"] == {"region": 0.05, "segment": 0.05} and effective["ann_bound"] is True


def test_apply_record_sets_the_parameters(planted_index):
    index = HiMIRIndex.from_snapshot(planted_index.snapshot, encoder=_NoEncoder(), config=F32)
    apply_record(index, {"source": "auto", "params": {"candidate_k": 12}, "images": len(index)})
    assert index.config.scheduler_params.candidate_k == 12
