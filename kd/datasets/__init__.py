"""Data sources, one file each (as kd/losses/ is): each returns (train_images, train_labels, test_images,
test_labels), images as uint8 NCHW of any size, labels int64; `conf/data/<name>.yaml` names its source's function
as `data.source._target_`."""
from __future__ import annotations

import torch

Arrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

OFFLINE_CHOICES = "data=imagefolder data.root=<folder with train/ and test/> or data=synthetic"


class DataError(ValueError):
    """Raised before training for a data configuration that cannot work."""
