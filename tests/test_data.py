import shutil

import pytest
import torch

from kd.data import DeviceLoader, RandomCrops, build_splits
from kd.datasets.synthetic import synthetic


def test_split_is_deterministic_disjoint_and_sized():
    arrays = synthetic(num_train=1000, num_test=10)
    # tag each training image with its index so the split can be traced back
    train_x = torch.arange(1000).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    arrays = (train_x, arrays[1], arrays[2], arrays[3])
    a = build_splits(arrays, 0.1, split_seed=3, num_classes=10, train_subset=None, device=torch.device("cpu"))
    b = build_splits(arrays, 0.1, split_seed=3, num_classes=10, train_subset=None, device=torch.device("cpu"))
    c = build_splits(arrays, 0.1, split_seed=4, num_classes=10, train_subset=None, device=torch.device("cpu"))
    ids = lambda x: set(x[:, 0, 0, 0].tolist())  # noqa: E731
    assert len(a.train_y) == 900 and len(a.val_y) == 100
    assert ids(a.train_x) | ids(a.val_x) == set(range(1000)) and not ids(a.train_x) & ids(a.val_x)
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_x, b.train_x)
    assert ids(a.val_x) != ids(c.val_x)


def test_train_subset_keeps_that_many():
    s = build_splits(synthetic(num_train=500, num_test=10), 0.1, 0, 10, train_subset=123, device=torch.device("cpu"))
    assert len(s.train_y) == 123 and len(s.val_y) == 50


def _epoch(loader, epoch):
    return [(b.images.clone(), b.labels.clone(), b.indices.clone()) for b in loader.epoch(epoch)]


def test_augmentation_repeats_for_same_seed_and_epoch_and_differs_otherwise():
    x, y, _, _ = synthetic(num_train=200, num_test=1)
    first = _epoch(DeviceLoader(x, y, 64, seed=1), 0)
    again = _epoch(DeviceLoader(x, y, 64, seed=1), 0)
    next_epoch = _epoch(DeviceLoader(x, y, 64, seed=1), 1)
    other_seed = _epoch(DeviceLoader(x, y, 64, seed=2), 0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], next_epoch[0][0])
    assert not torch.equal(first[0][0], other_seed[0][0])


def test_loader_keeps_the_last_partial_batch_and_every_image_once():
    x, y, _, _ = synthetic(num_train=150, num_test=1)
    batches = _epoch(DeviceLoader(x, y, 64, seed=0), 0)
    assert [len(b[1]) for b in batches] == [64, 64, 22]
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == sorted(y.tolist())
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(150))
    assert all(torch.equal(y[b[2]], b[1]) for b in batches)
    assert all(0 <= b[0].min() and b[0].max() <= 1 and b[0].dtype == torch.float32 for b in batches)


def test_random_crops_match_a_direct_crop_and_flip():
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    index = torch.tensor([4, 0, 2, 2, 1])
    dx, dy = torch.tensor([0, 8, 3, 0, 8]), torch.tensor([0, 5, 8, 1, 8])
    flip = torch.tensor([False, True, True, False, True])
    out = RandomCrops(images)(index, dx, dy, flip)
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.uint8
    for i, k in enumerate(index.tolist()):
        padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
        padded[:, 4:36, 4:36] = images[k]
        expected = padded[:, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        if flip[i]:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected)
    assert torch.equal(out[0], torch.nn.functional.pad(images[4], (4, 4, 4, 4))[:, :32, :32])


def test_loader_batches_are_the_epochs_crops_in_its_order():
    x, y, _, _ = synthetic(num_train=100, num_test=1)
    loader = DeviceLoader(x, y, 32, seed=5)
    generator = torch.Generator().manual_seed(5 * 100_003 + 2)  # the loader's documented (seed, epoch) seeding
    order = torch.randperm(100, generator=generator)
    dx, dy = torch.randint(0, 9, (2, 100), generator=generator)
    flip = torch.rand(100, generator=generator) < 0.5
    images, labels, indices = map(torch.cat, zip(*_epoch(loader, 2)))
    assert torch.equal(indices, order)  # each image's position in the training split travels with it
    for position in (0, 31, 32, 99):
        k = order[position]
        crop = torch.nn.functional.pad(x[k], (4, 4, 4, 4))[:, dy[position]:dy[position] + 32,
                                                           dx[position]:dx[position] + 32]
        crop = crop.flip(-1) if flip[position] else crop
        assert labels[position] == y[k]
        assert torch.equal(images[position], crop.float() / 255)


def test_imagefolder_decodes_every_image_with_sorted_class_indices(tmp_path):
    from PIL import Image

    from kd.datasets.imagefolder import imagefolder

    classes = ["zebra", "apple", "moth"]  # sorted: apple=0, moth=1, zebra=2
    written = {}
    for split, count in (("train", 3), ("test", 2)):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / split / name / f"{i}.png")
                written[(split, sorted(classes).index(name), i)] = image
    train_x, train_y, test_x, test_y = imagefolder(str(tmp_path), num_classes=3, cache_dir=None)
    assert train_x.shape == (9, 3, 32, 32) and train_x.dtype == torch.uint8 and test_x.shape == (6, 3, 32, 32)
    assert train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(train_x[3], written[("train", 1, 0)]) and torch.equal(test_x[5], written[("test", 2, 1)])


# ---------------------------------------------------------------- image folders that cannot work

def _image_folder(root, classes=("cat", "dog"), size=32, per_class=2, fmt="PNG"):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=g).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.{fmt.lower()}", fmt)
    return root


def test_pillow_decoding_gives_torchvisions_pixels(tmp_path):
    import warnings

    from torchvision.io import ImageReadMode, decode_image

    from kd.datasets.imagefolder import _decode
    root = _image_folder(tmp_path, fmt="JPEG")
    for file in sorted(root.rglob("*.jpeg")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            expected = decode_image(str(file), mode=ImageReadMode.RGB)
        assert torch.equal(_decode(file), expected), file


def test_hidden_files_are_skipped(tmp_path):
    from kd.datasets.imagefolder import imagefolder
    root = _image_folder(tmp_path)
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"")
    (root / "train" / ".hidden_class").mkdir()
    train_x, train_y, _, _ = imagefolder(str(root), num_classes=2, cache_dir=None)
    assert len(train_y) == 4 and train_y.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("damage,message", [
    ("no_classes", "has no class folders"),
    ("text_file", r"cannot read .*notes\.txt as an image"),
    ("other_size", r"dog/9\.png is 64x64 but the other images are 32x32"),
    ("few_classes", r"has 2 class folders \(cat, dog\) but data.num_classes=10; set data.num_classes=2"),
    ("empty_class", r"class folder .*dog holds no images"),
])
def test_each_broken_image_folder_names_the_file_or_the_count(tmp_path, damage, message):
    from PIL import Image

    from kd.datasets import DataError
    from kd.datasets.imagefolder import imagefolder
    root = _image_folder(tmp_path)
    num_classes = 2
    if damage == "no_classes":
        for split in ("train", "test"):
            shutil.rmtree(root / split)
            (root / split).mkdir()
            (root / split / "stray.png").write_bytes(b"")
    elif damage == "text_file":
        (root / "train" / "cat" / "notes.txt").write_text("not an image")
    elif damage == "other_size":
        Image.new("RGB", (64, 64)).save(root / "train" / "dog" / "9.png")
    elif damage == "few_classes":
        num_classes = 10
    elif damage == "empty_class":
        shutil.rmtree(root / "train" / "dog")
        (root / "train" / "dog").mkdir()
    with pytest.raises(DataError, match=message):
        imagefolder(str(root), num_classes=num_classes, cache_dir=None)


def test_a_folder_is_decoded_once_and_again_when_its_content_changes(tmp_path, monkeypatch):
    import os

    from kd.datasets import imagefolder as data
    root, cache = _image_folder(tmp_path / "images", fmt="JPEG"), tmp_path / "cache"
    decoded = []
    original = data._decode
    monkeypatch.setattr(data, "_decode", lambda file: decoded.append(file) or original(file))
    first = data.imagefolder(str(root), num_classes=2, cache_dir=str(cache))
    assert len(decoded) == 8 and len(list(cache.glob("imagefolder-*.pt"))) == 1
    again = data.imagefolder(str(root), num_classes=2, cache_dir=str(cache))
    assert len(decoded) == 8  # read, not decoded
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.equal(a, b) for a, b in zip(first, data.imagefolder(str(root), 2, cache_dir=None)))
    file = root / "train" / "cat" / "0.jpeg"
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 1_000_000))
    data.imagefolder(str(root), num_classes=2, cache_dir=str(cache))
    assert len(decoded) == 8 + 8 + 8 and len(list(cache.glob("imagefolder-*.pt"))) == 2
