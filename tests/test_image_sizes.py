"""Images of any size: every consumer reads it from the data (the taps' probe, the loss built for them, the
benchmark's classic loop), or from results.json where the data is not at hand (the report's FLOPs); every method
trains at 64x64 and 96x96, and the STL-10 and Tiny-ImageNet presets train on stand-in folders of their size."""
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from conftest import METHODS, TINY, compose_config
from kd.bench import classic, measure
from kd.bench.__main__ import compose_bench
from kd.losses.batch import Batch, Progress
from kd.models import CIFAR_IMAGE_SIZE, resnet20
from kd.report.complexity import complexity, flops_per_image, recorded_image_size
from kd.run import train
from kd.setup import build_networks, prepare
from kd.taps import probe_shapes, tapped

SIZES = [64, 96]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads' synchronisation made these runs 2-4x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def synthetic_of_side(side: int) -> list[str]:
    return [*TINY, f"data.source.image_size={side}"]


def test_the_probe_reads_height_and_width_apart():
    cfg = compose_config(["model@model.student=resnet20"]).model.student
    net = tapped(cfg, resnet20(), ["feat", "embed"])
    assert probe_shapes(net, torch.device("cpu"), (64, 96)) == {"feat": (64, 16, 24), "embed": (64,)}
    assert probe_shapes(net, torch.device("cpu"), 96) == {"feat": (64, 24, 24), "embed": (64,)}
    with pytest.raises(ValueError, match=r"image_size=\(3, 96, 96\) is invalid: give \(height, width\)"):
        probe_shapes(net, torch.device("cpu"), (3, 96, 96))


def test_a_feature_loss_is_built_for_the_training_images_and_takes_their_batch():
    """FitNet's projector pools the student's map to the teacher's probed size: probed at 32x32 it was 4x4 and a
    96x96 batch (12x12) failed in the first step."""
    cfg = compose_config([*synthetic_of_side(96), "method=fitnet", "model@model.teacher=resnet18"])
    torch.manual_seed(0)
    teacher_model = instantiate(cfg.model.teacher.arch).eval().requires_grad_(False)
    student, teacher, loss = build_networks(cfg, prepare(cfg), teacher_model, torch.arange(8) % 10,
                                            image_size=torch.Size([96, 96]))
    images = torch.rand(4, 3, 96, 96)
    with torch.no_grad():
        target = teacher.eval()(images)
    batch = Batch(images, torch.arange(4), torch.arange(4), Progress(0, 0, 1, 1))
    parts = loss(student(images), target, batch)
    assert target.features["feat"].shape[-2:] == (12, 12) and torch.isfinite(parts.total)


def test_the_report_measures_at_the_recorded_size_and_at_cifars_for_older_runs():
    assert recorded_image_size({"data": {"name": "stl10", "image_size": [96, 96]}}) == (96, 96)
    assert recorded_image_size({"data": {"name": "cifar10", "train": 45000}}) == CIFAR_IMAGE_SIZE
    assert recorded_image_size(None) == CIFAR_IMAGE_SIZE


def test_flops_at_64x64_are_four_times_those_at_32x32_for_a_cifar_resnet():
    model = resnet20()
    at_32, at_64 = flops_per_image(model, (32, 32)), flops_per_image(model, (64, 64))
    assert at_64 == pytest.approx(4 * at_32, rel=1e-3)  # all but the classifier scales with the pixels
    measured = complexity(model, 2, 0, 0, image_size=(64, 64))
    assert measured["flops"] == at_64 and measured["macs"] == at_64 // 2


def test_the_benchmarks_classic_loop_crops_and_steps_at_the_datas_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_bench(["data=synthetic", "data.source.num_train=100", "data.source.num_test=20",
                         "data.source.image_size=96", "bench.images=32", "bench.val_images=8",
                         "model@model.teacher=resnet20", "device=cpu", "trainer.precision=fp32"], "fitnet")
    s = measure.setup(cfg)
    student, loss, teacher = measure._networks(cfg, s, plain=True)
    norm = cfg.model.student.normalization
    batches = classic.loader(s.splits.train_x, s.splits.train_y, list(norm.mean), list(norm.std), 8, 0, True,
                             cfg.seed, s.device)
    images, labels, indices = next(iter(batches))
    assert images.shape == (8, 3, 96, 96)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    batch = Batch(images, labels, indices, Progress(0, 0, len(batches), 1, torch.tensor(1 / len(batches))))
    loss_value, _ = classic.train_step(student, loss, teacher, optimizer, batch)
    assert torch.isfinite(torch.tensor(loss_value))


@pytest.mark.slow
@pytest.mark.parametrize("side", SIZES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_an_epoch_on_larger_images(method, side, tmp_path, monkeypatch, random_teacher_ckpts):
    """ResNet-20's checkpoint (BatchNorm calibrated on 32x32 images) loads at any size: global pooling before the
    classifier, no parameter that depends on the input's size."""
    monkeypatch.chdir(tmp_path)
    cfg = compose_config([*synthetic_of_side(side), f"method={method}", "kd_epochs=1", "data.source.num_train=40",
                          "data.source.num_test=16", "model@model.teacher=resnet20",
                          f"model.teacher.ckpt={random_teacher_ckpts['resnet20']}"])
    results = train(cfg)
    assert results["data"]["image_size"] == [side, side] and len(results["history"]) == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in results["history"][0]["terms"].values())


def stand_in_folder(root, side: int, classes: int = 3, train: int = 12, test: int = 4):
    """root/train/<class>/*.png and root/test/<class>/*.png: side x side images, one colour per class plus noise."""
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            colour = torch.tensor([80 * c, 255 - 80 * c, 128]).view(1, 1, 3)
            for i in range(count):
                noise = torch.randint(-40, 41, (side, side, 3), generator=g)
                pixels = (colour + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


PRESETS = {"stl10_resnet18_resnet8x4": 96, "tiny_imagenet_resnet32x4_resnet8x4": 64}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "fitnet"])
@pytest.mark.parametrize("preset,side", PRESETS.items())
def test_a_larger_image_preset_trains_an_epoch_on_a_stand_in_folder(preset, side, method, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = stand_in_folder(tmp_path / "images", side)
    cfg = compose_config([f"experiment={preset}", f"data.root={root}", "data.num_classes=3", f"method={method}",
                          "kd_epochs=1", "teacher_training.epochs=1", "logger=none", "trainer.progress_bar=false",
                          "device=cpu", "trainer.precision=fp32"])
    results = train(cfg)
    assert results["data"]["image_size"] == [side, side] and results["data"]["test"] == 12
    assert (results["teacher"]["arch"], results["student"]["arch"]) == (cfg.model.teacher.name, cfg.model.student.name)
    assert len(results["history"]) == 1 and 0 <= results["test_acc"] <= 1
