"""FixMatch's strong augmentation, RandAugment(n) + Cutout, on a batch of images on their own device, per sample.

As MLKD's authors use it for their strong view (Jin-Ying/Multi-Level-Logit-Distillation mdistiller/dataset/cifar100.py,
`RandAugment(2, 10)`, from FixMatch): every image draws `num_ops` operations from OPS (with replacement), each with a
magnitude uniform in its range, then a Cutout square of side up to `cutout` x the width, filled with CUTOUT_FILL.

Each operation follows PIL's own arithmetic on 8-bit levels: the images are read as levels round(255 x), every
operation returns whole levels as PIL's uint8 images hold them (truncating or rounding where PIL does), and the result
is levels / 255, so a [0, 1] batch from the uint8 loader gives what PIL gives on the uint8 images (tests/test_augment.py
compares each operation with PIL). Samples are never split into groups of a data-dependent size: every sample goes
through the three kinds of operation (a lookup table, a blend with a degenerate image, an affine resampling) and keeps
its own op's result, so nothing waits for the host. Randomness comes from torch's generator on the images' device
(the global one, saved and restored with a run's state, unless a generator is passed).

Departures from PIL (none met in tests/test_augment.py's comparisons): Rotate rounds its matrix to 15 decimals as
torch.round(x * 1e15) / 1e15, not with Python's decimal round(); a scale-free affine map (translations) adds its offsets
in another order; PIL's float fallback for affine maps whose corners leave 16.16 fixed point (|coordinate| >= 32768)
is not reproduced; fused kernels (torch.compile) may round a blend once where PIL's float32 arithmetic rounds twice.
"""
from __future__ import annotations

import math

import torch
from torch import nn

OPS = ("AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize", "Rotate", "Sharpness",
       "ShearX", "ShearY", "Solarize", "TranslateX", "TranslateY")
RANGES = {"AutoContrast": (0.0, 1.0), "Brightness": (0.05, 0.95), "Color": (0.05, 0.95), "Contrast": (0.05, 0.95),
          "Equalize": (0.0, 1.0), "Identity": (0.0, 1.0), "Posterize": (4.0, 8.0), "Rotate": (-30.0, 30.0),
          "Sharpness": (0.05, 0.95), "ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3), "Solarize": (0.0, 256.0),
          "TranslateX": (-0.3, 0.3), "TranslateY": (-0.3, 0.3)}
"""Each op's magnitude range (cifar100.py augment_list(): FixMatch's, with the enhancements in [0.05, 0.95], so they
only ever weaken; translations as fractions of the side; AutoContrast, Equalize, Identity ignore theirs)."""
CUTOUT_FILL = (125, 123, 114)  # cifar100.py CutoutAbs: the fill colour (about the data's mean, in levels)

LOOKUP = ("AutoContrast", "Equalize", "Identity", "Posterize", "Solarize")
BLEND = ("Brightness", "Color", "Contrast", "Sharpness")
AFFINE = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
SMOOTH = (1.0 / 13.0, 5.0 / 13.0)  # ImageFilter.SMOOTH: [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, in float32 as PIL


def op_index(name: str) -> int:
    if name not in OPS:
        raise ValueError(f"augment: no operation {name!r}; the operations are {list(OPS)}")
    return OPS.index(name)


def is_op(op: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    return torch.stack([op == op_index(name) for name in names]).any(0)


# ---------------------------------------------------------------- lookup tables: AutoContrast, Equalize, Posterize, ...

def apply_lookup(levels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Each sample's channel c through its own 256-entry table: out[b, c] = table[b, c, levels[b, c]]."""
    flat = levels.flatten(2).long()
    return table.to(levels.dtype).gather(2, flat).view_as(levels)


def autocontrast_table(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast (cutoff 0), per channel: int(i * 255 / (hi - lo) - lo * 255 / (hi - lo)) clipped to
    [0, 255], in float64 as PIL's Python; the identity where hi <= lo."""
    i = torch.arange(256, device=low.device, dtype=torch.float64)
    span = (high - low).double()
    scale = torch.full_like(span, 255.0) / span.clamp(min=1)  # a true division (255.0 / t multiplies by 1 / t)
    offset = -low.double() * scale
    stretched = (i * scale[..., None] + offset[..., None]).trunc().clamp(0, 255)
    return torch.where((span > 0)[..., None], stretched, i)


def equalize_table(histogram: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize, per channel (integer arithmetic as PIL's): step = (N - h[last level used]) // 255,
    table[i] = (step // 2 + sum_{j < i} h[j]) // step, clipped to 255 as Image.point does; the identity where one
    level or fewer is used or step is 0."""
    i = torch.arange(256, device=histogram.device)
    last = histogram.gather(-1, high.long()[..., None]).squeeze(-1)
    step = (histogram.sum(-1) - last) // 255
    below = histogram.cumsum(-1) - histogram
    table = ((step[..., None] // 2 + below) // step.clamp(min=1)[..., None]).clamp(max=255)
    used = (histogram > 0).sum(-1)
    return torch.where(((used > 1) & (step > 0))[..., None], table, i)


def histogram(levels: torch.Tensor) -> torch.Tensor:
    """Per sample and channel, the count of each of the 256 levels (B x C x 256), int64, by one scatter."""
    b, c = levels.shape[:2]
    index = levels.flatten(2).long() + 256 * torch.arange(b * c, device=levels.device).view(b, c, 1)
    counts = torch.zeros(b * c * 256, dtype=torch.long, device=levels.device)
    return counts.scatter_add_(0, index.flatten(), torch.ones_like(index.flatten())).view(b, c, 256)


def lookup_ops(levels: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """AutoContrast, Equalize, Identity, Posterize (keep int(m) bits), Solarize (invert the levels >= m): each
    sample's op as a table."""
    i = torch.arange(256, device=levels.device, dtype=torch.float64)
    low, high = levels.flatten(2).amin(2), levels.flatten(2).amax(2)
    quantum = 2.0 ** (8 - magnitude.double().trunc().clamp(1, 8))  # ImageOps.posterize: i & ~(2^(8 - bits) - 1)
    tables = {"AutoContrast": autocontrast_table(low, high),
              "Equalize": equalize_table(histogram(levels), high).double(),
              "Identity": i.expand(*levels.shape[:2], 256),
              "Posterize": ((i / quantum[:, None]).floor() * quantum[:, None])[:, None, :],
              "Solarize": torch.where(i < magnitude.double()[:, None], i, 255 - i)[:, None, :]}
    table = tables["Identity"]
    for name, candidate in tables.items():
        table = torch.where((op == op_index(name)).view(-1, 1, 1), candidate, table)
    return apply_lookup(levels, table)


# ---------------------------------------------------------------- blends: Brightness, Color, Contrast, Sharpness

def grayscale(levels: torch.Tensor) -> torch.Tensor:
    """PIL's convert("L"): (19595 R + 38470 G + 7471 B + 0x8000) >> 16, exact in float32 (every sum < 2^24)."""
    r, g, b = levels.unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536).floor()[:, None]


def smoothed(levels: torch.Tensor) -> torch.Tensor:
    """ImageFilter.SMOOTH as PIL's 3x3 filter computes it: float32 weights, the rows below, at and above the pixel
    summed in that order, rounded half up; the border rows and columns copied unfiltered."""
    edge, centre = (torch.full((), w, dtype=torch.float32, device=levels.device) for w in SMOOTH)  # no host copy
    h, w = levels.shape[-2:]
    if h < 3 or w < 3:
        return levels

    def row(dy: int, middle: torch.Tensor) -> torch.Tensor:
        rows = levels[..., 1 + dy:h - 1 + dy, :]
        return rows[..., :-2] * edge + rows[..., 1:-1] * middle + rows[..., 2:] * edge

    total = row(1, edge) + row(0, centre) + row(-1, edge)
    inner = (total + 0.5).floor().clamp(0, 255)
    out = levels.clone()
    out[..., 1:-1, 1:-1] = inner
    return out


def blend_ops(levels: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """ImageEnhance's enhance(f) = Image.blend(degenerate, image, f) = degenerate + f (image - degenerate) in float32,
    truncated and clipped to [0, 255]; the degenerate image: black (Brightness), the grey image (Color), its mean
    grey, int(mean + 0.5) (Contrast), the SMOOTH-filtered image (Sharpness)."""
    gray = grayscale(levels)
    mean = (gray.double().flatten(1).mean(1) + 0.5).floor().to(levels.dtype).view(-1, 1, 1, 1)
    pick = lambda name: (op == op_index(name)).view(-1, 1, 1, 1)  # noqa: E731
    degenerate = torch.where(pick("Brightness"), torch.zeros_like(levels),
                             torch.where(pick("Color"), gray, torch.where(pick("Contrast"), mean, smoothed(levels))))
    factor = magnitude.float().view(-1, 1, 1, 1)
    return (degenerate + factor * (levels - degenerate)).clamp(0, 255).trunc()


# ---------------------------------------------------------------- affine: Rotate, ShearX/Y, TranslateX/Y

def affine_matrices(op: torch.Tensor, magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Each sample's PIL AFFINE data (a, b, c, d, e, f), float64: output pixel (x, y) reads the input at
    (a x' + b y' + c, d x' + e y' + f), x' = x + 0.5, y' = y + 0.5. Rotate as Image.rotate(m) (counter-clockwise
    about the centre: angle = -radians(m mod 360), cos and sin rounded to 15 decimals); ShearX (1, m, 0, 0, 1, 0);
    ShearY (1, 0, 0, m, 1, 0); TranslateX (1, 0, m W, 0, 1, 0); TranslateY (1, 0, 0, 0, 1, m H)."""
    m = magnitude.double()
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    angle = -(torch.remainder(m, 360.0) * (math.pi / 180.0))
    cos, sin = (torch.round(f(angle) * 1e15) / 1e15 for f in (torch.cos, torch.sin))
    cx, cy = width / 2.0, height / 2.0
    rotate = torch.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy], 1)
    matrices = {"Rotate": rotate,
                "ShearX": torch.stack([one, m, zero, zero, one, zero], 1),
                "ShearY": torch.stack([one, zero, zero, m, one, zero], 1),
                "TranslateX": torch.stack([one, zero, m * width, zero, one, zero], 1),
                "TranslateY": torch.stack([one, zero, zero, zero, one, m * height], 1)}
    matrix = torch.stack([one, zero, zero, zero, one, zero], 1)
    for name, candidate in matrices.items():
        matrix = torch.where((op == op_index(name))[:, None], candidate, matrix)
    return matrix


def source_pixels(matrix: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The input pixel (column, row) each output pixel reads, B x H x W each, as PIL's nearest-neighbour affine
    transform finds it: for a pure scale or translation (b = d = 0) floor(a x' + c), floor(e y' + f) in float64; else
    in 16.16 fixed point, every coefficient rounded to a multiple of 1 / 65536 first (a0 = floor(65536 a + 1 / 2),
    ..., the offsets c + a / 2 + b / 2 and f + d / 2 + e / 2 likewise), then column = (c0 + a0 x + b0 y) >> 16."""
    device = matrix.device
    a = matrix.view(-1, 6, 1, 1).unbind(1)
    y = torch.arange(height, device=device, dtype=torch.float64).view(1, height, 1)
    x = torch.arange(width, device=device, dtype=torch.float64).view(1, 1, width)
    scale_x, scale_y = (a[0] * (x + 0.5) + a[2]).floor(), (a[4] * (y + 0.5) + a[5]).floor()
    fixed = lambda v: (v * 65536.0 + 0.5).floor().long()  # noqa: E731
    x0, y0 = fixed(a[2] + a[0] * 0.5 + a[1] * 0.5), fixed(a[5] + a[3] * 0.5 + a[4] * 0.5)
    xi, yi = x.long(), y.long()
    fixed_x = torch.div(x0 + fixed(a[0]) * xi + fixed(a[1]) * yi, 65536, rounding_mode="floor")
    fixed_y = torch.div(y0 + fixed(a[3]) * xi + fixed(a[4]) * yi, 65536, rounding_mode="floor")
    scaling = (a[1] == 0) & (a[3] == 0)
    return (torch.where(scaling, scale_x.long().expand_as(fixed_x), fixed_x),
            torch.where(scaling, scale_y.long().expand_as(fixed_y), fixed_y))


def affine_ops(levels: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """PIL's nearest-neighbour affine transform (Image.transform(size, AFFINE, data), Image.rotate), per sample:
    each output pixel copies the input pixel `source_pixels` finds; those outside the image give 0 (PIL's default
    fill). One gather (grid_sample's nearest rounds the normalised coordinates half to even, not PIL's way)."""
    b, c, h, w = levels.shape
    source_x, source_y = source_pixels(affine_matrices(op, magnitude, h, w), h, w)
    inside = (source_x >= 0) & (source_x < w) & (source_y >= 0) & (source_y < h)
    index = (source_y.clamp(0, h - 1) * w + source_x.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
    moved = levels.flatten(2).gather(2, index).view_as(levels)
    return torch.where(inside[:, None], moved, torch.zeros_like(moved))


# ---------------------------------------------------------------- the ops, Cutout, RandAugment

def apply_ops(levels: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Sample i of a B x 3 x H x W batch of levels (floats holding whole values 0..255) through operation OPS[op[i]]
    at magnitude[i], as the FixMatch op of that name does it with PIL (cifar100.py)."""
    kind_lookup, kind_blend = is_op(op, LOOKUP).view(-1, 1, 1, 1), is_op(op, BLEND).view(-1, 1, 1, 1)
    return torch.where(kind_lookup, lookup_ops(levels, op, magnitude),
                       torch.where(kind_blend, blend_ops(levels, op, magnitude), affine_ops(levels, op, magnitude)))


def cutout(levels: torch.Tensor, fraction: torch.Tensor, draw_x: torch.Tensor, draw_y: torch.Tensor,
           fill: torch.Tensor) -> torch.Tensor:
    """cifar100.py Cutout(img, v) / CutoutAbs, per sample: side s = v W (none when v <= 0); the square's centre
    x = np.random.uniform(W), which is uniform(low=W, high=1.0) = W + (1 - W) u, so in (1, W] (FixMatch's code, kept),
    likewise y with H; corner x0 = int(max(0, x - s / 2)), x1 = min(W, x0 + s); ImageDraw.rectangle fills the
    columns int(x0)..int(x1) and rows int(y0)..int(y1), both ends included, with `fill` (C levels, on the images'
    device). `draw_x`, `draw_y`: the two uniform [0, 1) draws."""
    b, c, h, w = levels.shape
    side = fraction.double() * w
    x0 = (w + (1 - w) * draw_x.double() - side / 2).clamp(min=0).trunc()
    y0 = (h + (1 - h) * draw_y.double() - side / 2).clamp(min=0).trunc()
    x1, y1 = (x0 + side).clamp(max=w).trunc(), (y0 + side).clamp(max=h).trunc()
    cols = torch.arange(w, device=levels.device, dtype=torch.float64)
    rows = torch.arange(h, device=levels.device, dtype=torch.float64)
    in_x = (cols >= x0[:, None]) & (cols <= x1[:, None])
    in_y = (rows >= y0[:, None]) & (rows <= y1[:, None])
    covered = (in_y[:, :, None] & in_x[:, None, :] & (side > 0).view(-1, 1, 1))[:, None]
    return torch.where(covered, fill.to(levels.dtype).view(1, c, 1, 1), levels)


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2 (RandomHorizontalFlip)."""
    flip = torch.rand(len(images), device=images.device, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


class RandAugment(nn.Module):
    """FixMatch's RandAugment(num_ops) followed by Cutout of side up to `cutout` x the width (cifar100.py
    RandAugment.__call__: random.choices(augment_list(), k=n), magnitude = low + (high - low) random(), then
    Cutout(img, random() * 0.5)), on B x 3 x H x W images in [0, 1] on the module's device, each sample drawing its
    own ops, magnitudes and square. The magnitude argument `m` of RandAugment(2, 10) is unused there, as here. The
    ranges and the fill colour are (non-persistent) buffers, so a step creates no tensor from host values."""

    def __init__(self, num_ops: int, cutout: float):
        super().__init__()
        if num_ops != int(num_ops) or num_ops < 0 or not 0 <= cutout <= 1:
            raise ValueError(f"RandAugment: num_ops={num_ops} must be a whole number >= 0 and cutout={cutout} lie "
                             f"in [0, 1]")
        self.num_ops, self.cutout = int(num_ops), cutout
        for k, name in enumerate(("low", "high")):
            self.register_buffer(name, torch.tensor([RANGES[op][k] for op in OPS], dtype=torch.float64),
                                 persistent=False)
        self.register_buffer("fill", torch.tensor(CUTOUT_FILL, dtype=torch.float32), persistent=False)

    def draw(self, batch: int, generator: torch.Generator | None = None) -> dict:
        """Every random choice for a batch: ops (num_ops x B), their magnitudes, Cutout's fraction and centre draws."""
        device = self.low.device
        rand = lambda *shape: torch.rand(*shape, device=device, generator=generator)  # noqa: E731
        op = torch.randint(len(OPS), (self.num_ops, batch), device=device, generator=generator)
        magnitude = self.low[op] + (self.high - self.low)[op] * rand(self.num_ops, batch).double()
        return {"op": op, "magnitude": magnitude, "fraction": rand(batch).double() * self.cutout,
                "draw_x": rand(batch), "draw_y": rand(batch)}

    def apply(self, images: torch.Tensor, drawn: dict) -> torch.Tensor:
        levels = (images.float() * 255).round().clamp(0, 255)
        for op, magnitude in zip(drawn["op"], drawn["magnitude"]):
            levels = apply_ops(levels, op, magnitude)
        levels = cutout(levels, drawn["fraction"], drawn["draw_x"], drawn["draw_y"], self.fill)
        return levels.to(images.dtype) / 255

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"RandAugment: expected B x 3 x H x W images, got shape {tuple(images.shape)}")
        return self.apply(images, self.draw(len(images), generator))
