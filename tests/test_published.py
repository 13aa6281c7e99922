"""The published CIFAR-100 numbers: every row cited and mapped onto this harness's configs, and joined with the
jobs of a sweep. The jobs' numbers below are fabricated test data, not claims."""
import math

import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import METHODS, MODELS
from kd.report import markdown
from kd.report.collect import Job
from kd.report.published import comparison, published


def test_every_published_number_is_cited_and_maps_onto_a_config():
    rows = published()
    assert len(rows) > 300
    for column in ("paper", "citation", "table", "row", "source"):
        assert rows[column].str.strip().ne("").all(), column
    assert rows.top1.between(30, 100).all() and rows.top1.notna().all()
    assert set(rows.method) <= set(METHODS) | {"teacher"}
    assert set(rows.teacher) | set(rows.student) <= set(MODELS)
    assert set(rows.optim) <= {"", "dot"}
    key = ["paper", "table", "row", "teacher", "student"]
    assert not rows.duplicated(key).any()  # one number per paper, table, row and pair
    crd_kd = rows[(rows.paper == "crd2020") & (rows.row == "KD") & (rows.teacher == "resnet56")]
    assert list(crd_kd.method) == ["kd"] and "Tian" in crd_kd.citation.iloc[0]


def _job(tmp_path, method, seed, test_acc, last, optim="sgd_step", teacher="resnet56", student="resnet20",
         data="cifar100"):
    cfg = OmegaConf.create({"method": {"name": method}, "seed": seed, "data": {"name": data},
                            "optim": {"name": optim}, "model": {"teacher": {"name": teacher},
                                                                "student": {"name": student}}})
    results = {"test_acc": test_acc, "test_acc_last": last, "teacher": {"test_acc": 0.73}}
    return Job(tmp_path / f"{method}_{seed}", tmp_path, seed, cfg, None, results, "ok")


def test_jobs_are_joined_with_every_published_row_of_their_pair_and_method(tmp_path):
    jobs = [_job(tmp_path, "kd", 0, 0.700, 0.690), _job(tmp_path, "kd", 1, 0.720, 0.700),
            _job(tmp_path, "kd", 2, 0.710, 0.695, optim="dot"),
            _job(tmp_path, "crd_nce", 0, 0.71, 0.71, data="cifar10"),  # not CIFAR-100: no published row
            _job(tmp_path, "kd", 3, 0.5, 0.5, student="resnet8")]      # no published pair
    beside = comparison(jobs)
    rows = published()
    kd_rows = rows[(rows.method == "kd") & (rows.teacher == "resnet56") & (rows.student == "resnet20") & (rows.optim == "")]
    plain = beside[(beside.method == "kd") & (beside.optim == "")]
    assert len(plain) == len(kd_rows) > 1  # the CRD, DKD, ... papers' KD rows for this pair
    crd = plain[plain.paper == "crd2020"].iloc[0]
    assert crd.seeds == 2 and crd.ours_mean == pytest.approx(71.0) and crd.ours_std == pytest.approx(math.sqrt(2))
    assert crd.difference == pytest.approx(71.0 - crd.top1)
    assert crd.ours_last_mean == pytest.approx(69.5) and crd.difference_last == pytest.approx(69.5 - crd.top1)
    dot = beside[beside.optim == "dot"]
    assert set(dot.paper) <= {"dot2023"} and (dot.seeds == 1).all()
    teachers = beside[beside.method == "teacher"]
    assert len(teachers) and list(teachers.ours_mean) == pytest.approx([73.0] * len(teachers))
    assert set(teachers.seeds) == {3}  # the teacher of the resnet56 -> resnet20 jobs, seeds 0, 1, 2
    assert set(beside.student) == {"resnet20"}


def test_the_report_section_names_paper_table_and_row(tmp_path):
    beside = comparison([_job(tmp_path, "dkd", 0, 0.71, 0.70)])
    text = markdown.published_section(beside)
    assert "dkd2022" in text and "| DKD |" in text and "71.00" in text
    assert pd.notna(beside.difference).all()
