"""The real configs compose for every option, every method's YAML is complete, and kd_epochs is the one source of
the student's epochs."""
import importlib
import shutil
import subprocess

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF, METHODS, MODELS, ROOT, compose_config
from kd.losses.base import DistillationLoss, loss_factory

GROUPS = {"data": "data", "model@model.teacher": "model", "model@model.student": "model", "optim": "optim",
          "method": "method", "logger": "logger", "teacher_training": "teacher_training", "experiment": "experiment"}


@pytest.mark.parametrize("override,option", [(key, p.stem) for key, folder in GROUPS.items()
                                             for p in sorted((CONF / folder).glob("*.yaml"))])
def test_every_option_composes_and_resolves(override, option):
    cfg = compose_config([f"{override}={option}"])
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["kd_epochs"] == (240 if override == "experiment" else 10)


def test_the_lists_come_from_the_folders():
    assert METHODS == sorted(p.stem for p in (CONF / "method").glob("*.yaml")) and len(METHODS) >= 10
    assert {"ce", "kd", "fitnet"} <= set(METHODS) and {"resnet18", "resnet56", "smallnet"} <= set(MODELS)
    assert not (CONF / "model" / "teacher").exists() and not (CONF / "model" / "student").exists()


@pytest.mark.parametrize("method", METHODS)
def test_each_method_yaml_is_complete(method):
    cfg = compose_config([f"method={method}"]).method
    assert cfg.name == method
    for key in ("display_name", "description", "formula"):
        assert str(cfg[key]).strip(), key
    assert "paper" in cfg  # a citation, or null for the baseline and the notebook's own methods
    factory = loss_factory(cfg.loss)  # the target imports and the YAML's arguments fit the class
    assert issubclass(factory.loss_class, DistillationLoss)
    module = importlib.import_module(factory.loss_class.__module__)
    assert module.__name__ == f"kd.losses.{module.__name__.rsplit('.', 1)[1]}"
    assert factory.loss_class.__doc__, "each loss documents its paper and formula"


@pytest.mark.parametrize("model", MODELS)
def test_each_model_names_its_stages_under_the_common_keys(model):
    taps = compose_config([f"model@model.student={model}"]).model.student.taps
    stages = sorted(k for k in taps if k.startswith("stage") and not k.endswith("_preact"))
    assert stages == [f"stage{i}" for i in range(1, len(stages) + 1)] and len(stages) >= 3
    assert {f"{s}_preact" for s in stages} <= set(taps)
    assert {"stem", "feat", "embed"} <= set(taps) and taps.feat == taps[stages[-1]]


def test_one_model_group_selected_twice_with_the_teacher_checkpoint_in_one_place(tmp_path):
    cfg = compose_config(["model@model.teacher=resnet56", "model@model.student=resnet20", "data=synthetic"])
    assert cfg.model.teacher.name == "resnet56" and cfg.model.student.name == "resnet20"
    assert cfg.model.teacher.ckpt == str(tmp_path / "checkpoints/teachers/resnet56_synthetic.pt")  # KD_ROOT: conftest
    assert "ckpt" not in cfg.model.student
    # the default path, and the CIFAR-100 benchmark's own teacher folder
    assert sorted(str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml") if "ckpt:" in p.read_text()) == \
        ["config.yaml", "experiment/recipes/cifar100.yaml"]


def test_kd_epochs_reaches_schedule_and_there_is_no_second_epoch_key():
    cfg = compose_config(["kd_epochs=7"])
    assert "epochs" not in cfg.trainer
    optimizer = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    scheduler = instantiate(cfg.optim.scheduler)(optimizer)
    assert scheduler.T_max == 7


def test_kd_epochs_is_defined_once():
    """No training config sets the student's epochs other than through ${kd_epochs}.

    conf/bench/ and the experiment recipes are excluded: they override it (to 1 for the benchmark, to the field's
    240 for the CIFAR-100 presets), as a command-line override would.
    """
    defined = [str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml")
               if "kd_epochs:" in p.read_text() and p.parent.name not in ("bench", "recipes")]
    assert defined == ["config.yaml"]


def test_method_overrides_learning_rate_only_where_it_says():
    assert compose_config(["method=rkd"]).optim.optimizer.lr == 0.05
    assert compose_config(["method=at"]).optim.optimizer.lr == 0.05
    assert compose_config(["method=kd"]).optim.optimizer.lr == 0.1
    assert compose_config(["method=rkd", "optim.optimizer.lr=0.2"]).optim.optimizer.lr == 0.2


def test_a_feature_method_taps_what_its_loss_reads():
    cfg = compose_config(["method=fitnet", "method.loss.feature=stage2"])
    assert list(cfg.method.taps) == ["stage2"]


def test_defaults_are_the_notebooks():
    cfg = compose_config()
    assert cfg.method.name == "kd" and cfg.seed == 42 and cfg.device == "auto"
    assert cfg.method.loss.temperature == 4.0 and cfg.method.loss.alpha == 0.7
    assert cfg.optim.batch_size == 64 and cfg.optim.optimizer.momentum == 0.9
    assert cfg.optim.optimizer.weight_decay == 5e-4
    assert cfg.model.teacher.name == "resnet18" and cfg.model.student.name == "smallnet"


def test_a_preset_is_the_fields_recipe_for_its_pair_and_the_command_line_still_wins():
    cfg = compose_config(["experiment=resnet32x4_resnet8x4"])
    assert (cfg.data.name, cfg.model.teacher.name, cfg.model.student.name) == ("cifar100", "resnet32x4", "resnet8x4")
    assert cfg.model.teacher.arch.shortcut == cfg.model.student.arch.shortcut == "projection"
    assert cfg.kd_epochs == 240 and cfg.teacher_training.epochs == 240 and cfg.optim.optimizer.lr == 0.05
    scheduler = instantiate(cfg.optim.scheduler)(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05))
    assert scheduler.milestones == {150: 1, 180: 1, 210: 1}
    assert "cifar100-benchmark" in cfg.model.teacher.ckpt
    assert compose_config(["experiment=vgg13_mobilenetv2"]).optim.optimizer.lr == 0.01
    short = compose_config(["experiment=resnet56_resnet20", "kd_epochs=24"])
    scheduler = instantiate(short.optim.scheduler)(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05))
    assert short.kd_epochs == 24 and scheduler.milestones == {15: 1, 18: 1, 21: 1}


def test_every_kept_file_starts_at_the_project_folder_wherever_train_py_is_launched(tmp_path, monkeypatch):
    monkeypatch.delenv("KD_ROOT")
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["data=imagefolder", "data.root=images"], return_hydra_config=True)
    kept = {"teacher": cfg.model.teacher.ckpt, "teacher cache": cfg.teacher_cache.dir,
            "decoded images": cfg.data.source.cache_dir, "runs": cfg.hydra.run.dir, "sweeps": cfg.hydra.sweep.dir}
    assert cfg.paths.root == str(ROOT)
    assert {k: v for k, v in kept.items() if not v.startswith(str(ROOT) + "/")} == {}
    assert cfg.data.root == "images"  # given on the command line: from the launch folder, as the user meant


def test_a_machines_own_settings_in_conf_local_apply_last(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf, ignore=shutil.ignore_patterns("local"))
    (conf / "local").mkdir()
    (conf / "local" / "default.yaml").write_text("# @package _global_\npaths:\n  caches: /scratch/kd\n"
                                                 "trainer:\n  eval_batch_size: 7\n")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=resnet56_resnet20"])
    assert cfg.teacher_cache.dir == "/scratch/kd/teacher-cache" and cfg.trainer.eval_batch_size == 7
    assert cfg.model.teacher.ckpt.startswith(str(tmp_path / "checkpoints/teachers/cifar100-benchmark/"))


def test_the_machines_own_settings_are_never_committed():
    ignored = subprocess.run(["git", "check-ignore", "conf/local/default.yaml"], cwd=ROOT, capture_output=True)
    kept = subprocess.run(["git", "check-ignore", "conf/local/README.md"], cwd=ROOT, capture_output=True)
    assert ignored.returncode == 0 and kept.returncode == 1


LARGER_IMAGES = {"stl10": 10, "tiny_imagenet": 200}


@pytest.mark.parametrize("data,classes", LARGER_IMAGES.items())
def test_the_larger_image_data_presets_are_image_folders_that_need_a_root(data, classes, tmp_path):
    from kd.datasets import DataError
    folder = compose_config(["data=imagefolder"]).data
    cfg = compose_config([f"data={data}"]).data
    assert (cfg.name, cfg.num_classes, cfg.root) == (data, classes, None)
    assert OmegaConf.to_container(cfg.source) == OmegaConf.to_container(folder.source)  # one source, unresolved
    assert cfg.val_fraction == folder.val_fraction
    with pytest.raises(DataError, match="needs data.root"):
        instantiate(cfg.source, _partial_=True)()
    assert compose_config([f"data={data}", f"data.root={tmp_path}"]).data.source.root == str(tmp_path)


@pytest.mark.parametrize("preset,side,teacher_map,student_map", [
    ("stl10_resnet18_resnet8x4", 96, (512, 3, 3), (256, 6, 6)),
    ("tiny_imagenet_resnet32x4_resnet8x4", 64, (256, 8, 8), (256, 8, 8))])
def test_a_larger_image_preset_sets_stems_that_bring_its_images_near_cifars_size(preset, side, teacher_map,
                                                                                 student_map):
    from kd.taps import probe_shapes, tapped
    cfg = compose_config([f"experiment={preset}"])
    assert cfg.data.name == preset.split("_resnet")[0] and cfg.kd_epochs == 240
    assert cfg.model.teacher.normalization == cfg.model.student.normalization
    for role, expected in (("teacher", teacher_map), ("student", student_map)):
        model_cfg = cfg.model[role]
        net = tapped(model_cfg, instantiate(model_cfg.arch), ["feat"])
        assert probe_shapes(net, torch.device("cpu"), (side, side))["feat"] == expected, role
