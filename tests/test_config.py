"""Config validation: defaults, and one-line errors that name the file and key."""

from __future__ import annotations

import copy

import pytest
import yaml

from therapist_effects.config import DEFAULT_MODELS, load_config, model_applies
from therapist_effects.exceptions import ConfigError

PATIENT = {
    "datasets": {
        "exam": {
            "path": "exam.csv",
            "layout": "patient",
            "columns": {"patient": "student", "therapist": "school", "outcome": "normexam", "baseline": "standLRT"},
        }
    }
}


def test_defaults_are_filled():
    cfg = load_config(copy.deepcopy(PATIENT))
    ds = cfg["datasets"]["exam"]
    assert ds["multi_therapist"] == "majority"
    assert ds["min_sessions"] == 2
    assert ds["columns"]["covariates"] == []
    assert cfg["intervals"] == {"method": "profile", "level": 0.95, "bootstrap_replicates": 1000}
    assert cfg["report"]["min_caseload"] == 10 and cfg["report"]["suppress_below"] == 8
    assert [m["id"] for m in cfg["models"]] == [m["id"] for m in DEFAULT_MODELS]
    assert cfg["_explicit_models"] is False
    assert cfg["models"][0]["family"] == "gaussian" and cfg["models"][0]["engine"] == "reml"


def test_default_models_skip_what_the_data_do_not_allow():
    cfg = load_config(copy.deepcopy(PATIENT))
    ds = cfg["datasets"]["exam"]
    reasons = {m["id"]: model_applies(m, ds) for m in cfg["models"]}
    assert reasons["ri"] is None
    assert reasons["arm"] == "no arm column configured"
    assert reasons["nested"] == "no cluster column configured"
    assert "needs an instrument" in reasons["recovery"]


def test_demo_config_is_valid():
    cfg = load_config("config/config.yaml")
    assert "demo" in cfg["datasets"]
    assert cfg["_explicit_models"] is True


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["datasets"]["exam"].update(layout="wide"),
         "cfg.yaml: datasets.exam.layout: 'wide' is not one of ['patient', 'session']"),
        (lambda c: c["datasets"]["exam"]["columns"].pop("therapist"),
         "cfg.yaml: datasets.exam.columns: 'therapist' is a required property"),
        (lambda c: c["datasets"]["exam"]["columns"].pop("outcome"),
         "cfg.yaml: datasets.exam.columns.outcome is missing: the patient layout needs the end-of-treatment score column"),
        (lambda c: c.update(seed=-1), "cfg.yaml: seed: -1 is less than the minimum of 0"),
        (lambda c: c.update(models=[{"id": "a", "type": "random_intercept"}, {"id": "a", "type": "nested"}]),
         "cfg.yaml: models[1].id: 'a' is used twice; model ids must be unique"),
        (lambda c: c.update(models=[{"id": "a", "type": "arm_variance"}]),
         "cfg.yaml: models[0]: a arm_variance model needs datasets.exam.columns.arm"),
        (lambda c: c.update(models=[{"id": "a", "type": "random_intercept", "method": "laplace"}]),
         "cfg.yaml: models[0].method: 'laplace' is for binomial models; use REML or ML"),
        (lambda c: c.update(colour="blue"),
         "cfg.yaml: (top level): Additional properties are not allowed ('colour' was unexpected)"),
        (lambda c: c["datasets"]["exam"].update(instrument="PHQ-99"), "cfg.yaml: datasets.exam.instrument: "),
    ],
)
def test_config_errors_are_one_line(mutate, expected):
    cfg = copy.deepcopy(PATIENT)
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        load_config(cfg, source="cfg.yaml")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(expected)


def test_session_layout_needs_score_and_occasion():
    cfg = {"datasets": {"d": {"path": "x.csv", "layout": "session",
                              "columns": {"patient": "p", "therapist": "t", "score": "phq9"}}}}
    with pytest.raises(ConfigError, match=r"^c.yaml: datasets.d.columns.occasion is missing"):
        load_config(cfg, source="c.yaml")


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read the config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ is not valid YAML"):
        load_config(bad)


def test_yaml_round_trip_of_documented_example(tmp_path):
    """The example of ../shared/CONTRACT.md (patient layout with arm, cluster, covariates) is valid."""
    text = """
datasets:
  exam:
    path: data/exam.csv
    layout: patient
    columns:
      patient: student
      therapist: school
      outcome: normexam
      baseline: standLRT
      arm: feedback
      cluster: trial_id
      covariates: [sex]
    instrument: PHQ-9
models:
  - {id: ri,     type: random_intercept}
  - {id: arm,    type: arm_variance}
  - {id: nested, type: nested}
  - {id: recovery, type: random_intercept, family: binomial, outcome: recovered}
"""
    p = tmp_path / "my.yaml"
    p.write_text(text)
    cfg = load_config(p)
    assert [m["id"] for m in cfg["models"]] == ["ri", "arm", "nested", "recovery"]
    assert yaml.safe_load(text)["datasets"]["exam"]["columns"]["covariates"] == ["sex"]


def test_no_datasets_needs_a_study_table():
    with pytest.raises(ConfigError, match=r"^m.yaml: datasets: expected at least one dataset"):
        load_config({}, source="m.yaml")
    cfg = load_config({"meta": {"studies": "published.csv"}}, source="m.yaml")
    assert cfg["datasets"] == {} and cfg["meta"]["method"] == "REML"
    assert (cfg["meta"]["test"], cfg["meta"]["scale"], cfg["meta"]["columns"]) == ("z", "fisher_z", {})
