import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

# torch.compile's kernels in a folder of this test session: a machine-wide cache that another torch build or another
# instruction set (ATEN_CPU_CAPABILITY) wrote can crash a compiled step ("malloc(): unaligned fastbin chunk").
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="kd-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# The lists of methods and models are the config folders: a method added there is tested without an edit here.
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))

@pytest.fixture(autouse=True)
def files_in_the_test_folder(tmp_path, monkeypatch):
    """`paths.root` (teachers, caches, outputs) is each test's own folder, never the project's."""
    monkeypatch.setenv("KD_ROOT", str(tmp_path))


# Small, fast runs on generated data; a test adds what it is about.
TINY = ["data=synthetic", "data.source.num_train=300", "data.source.num_test=200", "logger=none",
        "trainer.progress_bar=false", "device=cpu", "trainer.precision=fp32"]  # fp32 on any CPU: the same numbers


def compose_config(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def train_command(args):
    return [sys.executable, str(ROOT / "train.py"), *args]


def train_env(**extra):
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **extra}


def run_train(args, cwd, timeout=600, **env):
    """`python train.py ARGS` in a subprocess, as a user would run it; its files under `cwd` unless a test set
    KD_ROOT (a module-wide fixture runs before the per-test KD_ROOT is set)."""
    if "KD_ROOT" not in os.environ:
        env.setdefault("KD_ROOT", str(cwd))
    return subprocess.run(train_command(args), cwd=cwd, env=train_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def comparable(results):
    """results.json without what legitimately differs between two runs of the same config (wall times)."""
    drop = {"train_time_sec", "resumed_from_epoch", "host", "teacher_cache"}
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in results["history"]]
    return {**{k: v for k, v in results.items() if k not in drop}, "history": history}


@pytest.fixture(scope="session")
def random_teacher_ckpts(tmp_path_factory):
    """Untrained ResNet-18 (512x4x4 features) and ResNet-20 (64x8x8, ResNet-56's shape) teacher checkpoints.

    Random weights, but BatchNorm statistics measured on the synthetic images (as training would leave them):
    with the initial statistics every block adds variance and the last features reach magnitudes in the tens,
    which no trained teacher has and which a method's own training stage is not built for.
    """
    from omegaconf import OmegaConf

    from kd.datasets.synthetic import synthetic
    from kd.models import ResNet18, resnet20

    images = synthetic(num_train=512, num_test=1)[0].float() / 255
    folder = tmp_path_factory.mktemp("teachers")
    paths = {}
    for name, make in (("resnet18", ResNet18), ("resnet20", resnet20)):
        torch.manual_seed(0)
        model = make()
        norm = OmegaConf.load(CONF / "model" / f"{name}.yaml").normalization
        calibrate_batchnorm(model, (images - torch.tensor(norm.mean).view(1, 3, 1, 1)) / torch.tensor(norm.std).view(1, 3, 1, 1))
        paths[name] = folder / f"{name}.pt"
        torch.save(model.state_dict(), paths[name])
    return paths


def calibrate_batchnorm(model, images):
    """Running statistics = the statistics of `images` (cumulative average over batches of 128)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for batch in images.split(128):
            model(batch)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    model.eval()


@pytest.fixture
def float64():
    """Direct comparisons of a loss with its reference in float64 (the tests' default dtype meanwhile)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def logits_batch():
    """Student and teacher logits (6 x 10) and labels, seeded."""
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3
    y = torch.randint(10, (6,), generator=g)
    return zs, zt, y
