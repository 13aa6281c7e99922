"""Adding a method is one loss file plus one YAML file: in a copy of the project, three new methods (a logit
method, a multi-stage method and one with a memory bank) are picked up by the glob sweep and by every
per-method test, with no other file edited."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, TINY

pytestmark = pytest.mark.slow

NEW_METHODS = {
    "throwaway_logit": ('''
        import torch.nn.functional as F

        from kd.losses.base import DistillationLoss, LossParts


        class SoftmaxDistance(DistillationLoss):
            """A throwaway logit method: CE + weight * mean squared difference of the two softmaxes."""

            def __init__(self, weight: float):
                super().__init__()
                self.weight = weight

            def forward(self, student, teacher, batch):
                ce = F.cross_entropy(student.logits, batch.labels)
                distance = (student.logits.softmax(1) - teacher.logits.softmax(1)).pow(2).sum(1).mean()
                return LossParts(ce, self.weight * distance, {"ce": ce, "distance": distance})
        ''', '''
        # @package _global_
        method:
          name: throwaway_logit
          display_name: Throwaway logit method
          paper: null
          description: A test method that compares the two softmax outputs.
          formula: "L = CE + weight * mean ||p_s - p_t||^2"
          taps: []
          loss:
            _target_: kd.losses.throwaway_logit.SoftmaxDistance
            weight: 1.0
        '''),
    "throwaway_stages": ('''
        import torch.nn.functional as F

        from kd.losses.base import DistillationLoss, LossParts


        class StageAttention(DistillationLoss):
            """A throwaway multi-stage method: attention maps of several stages, each compared at the smaller size."""

            def __init__(self, features: list, weight: float, feature_shapes):
                super().__init__()
                self.features, self.weight = list(features), weight
                self.sizes = [min(feature_shapes["student"][f][-1], feature_shapes["teacher"][f][-1]) for f in features]

            def forward(self, student, teacher, batch):
                def attention(x, size):
                    return F.normalize(F.adaptive_avg_pool2d(x.pow(2).mean(1, keepdim=True), size).flatten(1), dim=1)
                terms = {f: F.mse_loss(attention(student.features[f], s), attention(teacher.features[f], s))
                         for f, s in zip(self.features, self.sizes)}
                ce = F.cross_entropy(student.logits, batch.labels)
                return LossParts(ce, self.weight * sum(terms.values()), {"ce": ce, **terms})
        ''', '''
        # @package _global_
        method:
          name: throwaway_stages
          display_name: Throwaway multi-stage method
          paper: null
          description: A test method that reads the last three stages of both networks.
          formula: "L = CE + weight * sum_k MSE(A(F_s^k), A(F_t^k))"
          taps: ${method.loss.features}
          loss:
            _target_: kd.losses.throwaway_stages.StageAttention
            features: [stage-3, stage-2, stage-1]
            weight: 100.0
        '''),
    "throwaway_bank": ('''
        import torch
        import torch.nn.functional as F

        from kd.losses.base import DistillationLoss, LossParts


        class EmbeddingBank(DistillationLoss):
            """A throwaway memory-bank method: each image's teacher embedding is kept and the student's is pulled
            towards it."""

            def __init__(self, weight: float, num_train, feature_shapes):
                super().__init__()
                self.weight = weight
                dim = feature_shapes["teacher"]["embed"][0]
                self.head = torch.nn.Linear(feature_shapes["student"]["embed"][0], dim)
                self.register_buffer("bank", torch.zeros(num_train, dim))

            def forward(self, student, teacher, batch):
                with torch.no_grad():
                    self.bank[batch.indices] = F.normalize(teacher.features["embed"], dim=1)
                pull = (F.normalize(self.head(student.features["embed"]), dim=1) - self.bank[batch.indices]).pow(2).sum(1).mean()
                ce = F.cross_entropy(student.logits, batch.labels)
                return LossParts(ce, self.weight * pull, {"ce": ce, "pull": pull})
        ''', '''
        # @package _global_
        method:
          name: throwaway_bank
          display_name: Throwaway memory-bank method
          paper: null
          description: A test method with a bank of teacher embeddings, one per training image.
          formula: "L = CE + weight * ||e_s - bank[i]||^2"
          taps: [embed]
          loss:
            _target_: kd.losses.throwaway_bank.EmbeddingBank
            weight: 1.0
        '''),
}


@pytest.fixture(scope="module")
def project_with_new_methods(tmp_path_factory):
    copy = tmp_path_factory.mktemp("project")
    for name in ("kd", "conf", "tests"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("train.py", "pyproject.toml"):
        shutil.copy(ROOT / name, copy / name)
    before = {p.relative_to(copy) for p in copy.rglob("*") if p.is_file()}
    for name, (loss, yaml) in NEW_METHODS.items():
        (copy / "kd" / "losses" / f"{name}.py").write_text(textwrap.dedent(loss).lstrip())
        (copy / "conf" / "method" / f"{name}.yaml").write_text(textwrap.dedent(yaml).lstrip())
    after = {p.relative_to(copy) for p in copy.rglob("*") if p.is_file()}
    assert len(after - before) == 2 * len(NEW_METHODS)  # two new files per method, nothing else touched
    return copy


def run_in(copy, *args, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(copy), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_glob_sweep_picks_up_the_new_methods(project_with_new_methods, random_teacher_ckpts):
    copy = project_with_new_methods
    proc = run_in(copy, "train.py", "-m", "method=glob(throwaway_*)", *TINY, "kd_epochs=1",
                  "model@model.teacher=resnet18", f"model.teacher.ckpt={random_teacher_ckpts['resnet18']}",
                  f"hydra.sweep.dir={copy / 'sweep'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {json.loads(p.read_text())["method"]: json.loads(p.read_text()) for p in (copy / "sweep").glob("*/results.json")}
    assert sorted(results) == sorted(NEW_METHODS)
    assert set(results["throwaway_stages"]["history"][0]["terms"]) == {"ce", "stage-3", "stage-2", "stage-1"}
    assert results["throwaway_bank"]["history"][0]["terms"]["pull"] > 0


def test_every_per_method_test_picks_up_the_new_methods(project_with_new_methods):
    proc = run_in(project_with_new_methods, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-k", "throwaway",
                  "tests/test_losses.py", "tests/test_config.py", "tests/test_cli.py", "-W", "ignore")
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    passed = [line for line in proc.stdout.splitlines() if " PASSED" in line]
    for method in NEW_METHODS:
        # gradients with 2 teachers, tiny batches x3, its YAML composes and is complete, the CLI run
        assert sum(bool(re.search(rf"\[([^]]*-)?{method}(-[^]]*)?\]", line)) for line in passed) == 8, (method, passed)
