"""kd/augment.py, FixMatch's RandAugment + Cutout on tensors (MLKD's strong view), against PIL itself: each op on random
uint8 images of two sizes, Cutout, and whole RandAugment chains with the same draws. The comparisons are exact (no
tolerance): PIL computes in integers or float32 and each op repeats its steps, so any difference, even one level, is
a truncation or rounding done differently (255.0 / t computed as a reciprocal product, a filter rounded where PIL
truncates, float coordinates where PIL uses 16.16 fixed point), which a tolerance of one level would hide."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from kd import augment
from kd.augment import OPS, RANGES, RandAugment, apply_ops, cutout, op_index

SIZES = [(32, 32), (20, 27)]  # CIFAR's, and one neither square nor even
FILL = torch.tensor([125.0, 123.0, 114.0])


def pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def levels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()


def pil_op(image: Image.Image, name: str, v: float) -> Image.Image:
    """The FixMatch op `name` at magnitude v, by PIL (mdistiller/dataset/cifar100.py's semantics)."""
    w, h = image.size
    affine = {"ShearX": (1, v, 0, 0, 1, 0), "ShearY": (1, 0, 0, v, 1, 0), "TranslateX": (1, 0, v * w, 0, 1, 0),
              "TranslateY": (1, 0, 0, 0, 1, v * h)}
    if name in affine:
        return image.transform(image.size, Image.AFFINE, affine[name])
    enhance = {"Brightness": ImageEnhance.Brightness, "Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
               "Sharpness": ImageEnhance.Sharpness}
    if name in enhance:
        return enhance[name](image).enhance(v)
    return {"AutoContrast": lambda: ImageOps.autocontrast(image), "Equalize": lambda: ImageOps.equalize(image),
            "Identity": lambda: image, "Posterize": lambda: ImageOps.posterize(image, max(1, int(v))),
            "Rotate": lambda: image.rotate(v), "Solarize": lambda: ImageOps.solarize(image, v)}[name]()


def pil_cutout(image: Image.Image, v: float, numpy_state: int) -> Image.Image:
    """cifar100.py's Cutout(img, v): the square's centre from np.random.uniform(size), a RandomState seeded with
    `numpy_state`."""
    if v <= 0:
        return image
    w, h = image.size
    side = v * w
    rng = np.random.RandomState(numpy_state)
    x, y = rng.uniform(w), rng.uniform(h)
    x0, y0 = int(max(0, x - side / 2)), int(max(0, y - side / 2))
    image = image.copy()
    ImageDraw.Draw(image).rectangle((x0, y0, min(w, x0 + side), min(h, y0 + side)), (125, 123, 114))
    return image


def random_images(n, size, seed):
    """uint8 images: half noise over a random per-channel range (so AutoContrast and Equalize have work), half that
    noise smoothed (so Sharpness and Equalize see many equal levels)."""
    g = torch.Generator().manual_seed(seed)
    low, high = torch.randint(0, 120, (n, 3, 1, 1), generator=g), torch.randint(130, 256, (n, 3, 1, 1), generator=g)
    noise = torch.rand(n, 3, *size, generator=g)
    smooth = torch.nn.functional.avg_pool2d(noise, 5, 1, 2)
    texture = torch.where(torch.arange(n).view(-1, 1, 1, 1) % 2 == 0, noise, smooth)
    return (low + (high - low) * texture).round().to(torch.uint8)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", OPS)
def test_each_op_gives_pils_levels(name, size):
    images = random_images(12, size, seed=op_index(name))
    low, high = RANGES[name]
    magnitude = low + (high - low) * torch.rand(12, generator=torch.Generator().manual_seed(1)).double()
    out = apply_ops(images.float(), torch.full((12,), op_index(name)), magnitude)
    expected = torch.stack([levels(pil_op(pil(image), name, float(m))) for image, m in zip(images, magnitude)])
    changed = (expected != images.float()).flatten(1).any(1)
    assert changed.any() or name == "Identity"  # the op did something PIL's way, not just passed the images on
    assert torch.equal(out, expected), f"{name}: {(out != expected).sum().item()} levels differ from PIL's"


@pytest.mark.parametrize("name", ["Posterize", "Solarize", "Rotate", "ShearX", "TranslateY", "Contrast"])
def test_an_op_at_its_range_ends(name):
    images = random_images(2, (32, 32), seed=7)
    for m in RANGES[name]:
        out = apply_ops(images.float(), torch.full((2,), op_index(name)), torch.full((2,), m, dtype=torch.float64))
        if name == "Posterize" and m == 8.0:  # int(8) = 8 bits: PIL's identity
            assert torch.equal(out, images.float())
        expected = torch.stack([levels(pil_op(pil(image), name, m)) for image in images])
        assert torch.equal(out, expected), (name, m)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cutout_fills_pils_rectangle_with_the_fixmatch_colour(size):
    h, w = size
    images = random_images(40, size, seed=3)
    fraction = torch.linspace(0, 0.5, 40, dtype=torch.float64)  # 0: no square, as Cutout(img, 0) returns img
    states = range(40)
    # the two draws each RandomState's uniform(w), uniform(h) scale: low + (high - low) * random_sample()
    draws = torch.from_numpy(np.array([np.random.RandomState(s).random_sample(2) for s in states]))
    out = cutout(images.float(), fraction, draws[:, 0], draws[:, 1], FILL)
    expected = torch.stack([levels(pil_cutout(pil(image), float(f), s))
                            for image, f, s in zip(images, fraction, states)])
    assert torch.equal(out, expected)
    filled = (out != images.float()).any(1)
    assert not filled[0].any() and filled[1:].flatten(1).any(1).all()
    colour = out.permute(0, 2, 3, 1)[filled]
    assert (colour == torch.tensor([125.0, 123.0, 114.0])).all()


def test_cutouts_centre_lies_in_one_to_the_side_as_numpys_uniform_of_the_size_gives_it():
    images = torch.zeros(2, 3, 32, 32)
    extremes = torch.tensor([0.0, 1 - 1e-9], dtype=torch.float64)
    out = cutout(images, torch.full((2,), 0.05, dtype=torch.float64), extremes, extremes, FILL)
    filled = (out != 0).any(1)  # side 1.6: the square covers int(x0)..int(x0 + 1.6)
    rows, cols = torch.nonzero(filled[0], as_tuple=True)
    assert (rows.max(), cols.max()) == (31, 31)  # u = 0: centre at W = 32, clipped at the last pixel
    rows, cols = torch.nonzero(filled[1], as_tuple=True)
    assert (rows.min(), cols.min()) == (0, 0)  # u -> 1: centre at 1, the square from pixel 0


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_whole_randaugment_chain_gives_pils_image(size):
    images = random_images(48, size, seed=11)
    strong = RandAugment(2, 0.5)
    drawn = strong.draw(48, torch.Generator().manual_seed(5))
    out = strong.apply(images.float() / 255, drawn)
    for i, image in enumerate(images):
        expected = pil(image)
        for op, m in zip(drawn["op"][:, i], drawn["magnitude"][:, i]):
            expected = pil_op(expected, OPS[op], float(m))
        side = float(drawn["fraction"][i]) * size[1]
        x0 = int(max(0, size[1] + (1 - size[1]) * float(drawn["draw_x"][i]) - side / 2))
        y0 = int(max(0, size[0] + (1 - size[0]) * float(drawn["draw_y"][i]) - side / 2))
        expected = expected.copy()
        ImageDraw.Draw(expected).rectangle((x0, y0, min(size[1], x0 + side), min(size[0], y0 + side)), (125, 123, 114))
        assert torch.equal(out[i], levels(expected) / 255), [OPS[o] for o in drawn["op"][:, i]]


# ---------------------------------------------------------------- randomness, per sample

def test_each_sample_draws_its_own_ops_and_magnitudes_in_their_ranges():
    drawn = RandAugment(2, 0.5).draw(4096, torch.Generator().manual_seed(0))
    op, magnitude = drawn["op"], drawn["magnitude"]
    assert op.shape == magnitude.shape == (2, 4096)
    assert set(op.flatten().tolist()) == set(range(len(OPS)))  # all 14, with replacement (the two may repeat)
    assert (op[0] == op[1]).any() and (op[0] != op[1]).any()
    for k, name in enumerate(OPS):
        low, high = RANGES[name]
        m = magnitude[op == k]
        assert (m >= low).all() and (m < high).all() and m.max() - m.min() > 0.9 * (high - low)
    assert 0 <= drawn["fraction"].min() and drawn["fraction"].max() < 0.5


def test_two_samples_of_one_batch_get_different_ops():
    image = random_images(1, (32, 32), seed=2).float() / 255
    batch = image.expand(16, -1, -1, -1).contiguous()
    torch.manual_seed(0)
    drawn = RandAugment(2, 0.5).draw(16)
    out = RandAugment(2, 0.5).apply(batch, drawn)
    assert len({tuple(pair) for pair in drawn["op"].t().tolist()}) > 8
    assert len({tuple(o.flatten().tolist()) for o in out}) == 16  # 16 copies of one image, 16 different views


def test_the_same_rng_state_gives_the_same_batch_and_another_a_different_one():
    images = random_images(32, (32, 32), seed=4).float() / 255
    strong = RandAugment(2, 0.5)
    torch.manual_seed(123)
    first = strong(images)
    state = torch.get_rng_state()
    torch.manual_seed(123)
    again = strong(images)
    assert torch.equal(first, again)
    assert torch.equal(torch.get_rng_state(), state)  # it draws from the global generator, which a resume restores
    assert not torch.equal(strong(images), first)
    g = torch.Generator().manual_seed(9)
    assert torch.equal(strong(images, g), strong(images, torch.Generator().manual_seed(9)))


def test_the_output_stays_on_the_8_bit_grid_in_0_1_with_the_inputs_dtype_and_shape():
    for dtype in (torch.float32, torch.float64):
        images = (random_images(8, (20, 27), seed=5).to(dtype) / 255)
        out = RandAugment(2, 0.5)(images, torch.Generator().manual_seed(0))
        assert out.dtype == dtype and out.shape == images.shape
        assert out.min() >= 0 and out.max() <= 1
        assert torch.equal(out, (out * 255).round() / 255)


def test_the_ops_are_the_three_kinds_and_the_ranges_name_each_once():
    assert sorted(augment.LOOKUP + augment.BLEND + augment.AFFINE) == sorted(OPS) and len(OPS) == 14
    assert list(RANGES) == list(OPS)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="no operation 'Invert'"):
        op_index("Invert")
    with pytest.raises(ValueError, match="expected B x 3 x H x W"):
        RandAugment(2, 0.5)(torch.rand(3, 32, 32))
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match=rf"num_ops={bad} must be a whole number"):
            RandAugment(bad, 0.5)


def test_the_ranges_and_the_fill_move_with_the_module_and_stay_out_of_its_state():
    strong = RandAugment(2, 0.5)
    assert strong.fill.tolist() == [125.0, 123.0, 114.0] and list(strong.state_dict()) == []
    assert strong.low.tolist() == [RANGES[name][0] for name in OPS]
    assert strong.high.tolist() == [RANGES[name][1] for name in OPS]
