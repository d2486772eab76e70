"""One image at a time through camkd's decode path, for tests (imported as ``from decode_helpers import ...``).

camkd itself makes views a batch at a time (``camkd/data/folder.py``'s workers); these wrap the same functions
(:func:`~camkd.data.decode.train_view_into`, :func:`~camkd.data.decode.eval_view_into`, :func:`rrc_boxes`,
:func:`~camkd.data.decode.pixel_hashes`) for one file, so a test can compare a loader's batch with its files.
"""

from collections.abc import Sequence

import numpy as np
import torch

from camkd.data.decode import Source, eval_view_into, open_image, pixel_hashes, train_view_into
from camkd.data.rrc import RATIO, SCALE, rrc_boxes


def _new(size: int) -> np.ndarray:
    return np.empty((3, size, size), dtype=np.uint8)


def load_view(source: Source, box: Sequence[int], flip: int, size: int) -> torch.Tensor:
    """The training view: uint8 [3, size, size] of ``box`` (top, left, height, width) of the image, resized, flipped if ``flip``."""
    with open_image(source) as img:
        return torch.from_numpy(train_view_into(img, box, flip, size, _new(size)))


def load_train_view(source: Source, *, seed: int, view: int, index: int, size: int,
                    scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO) -> tuple[torch.Tensor, np.ndarray, int]:
    """Sample ``index``'s view ``view``: its box and flip come from :func:`rrc_boxes` on the image's size (read from its header).

    Returns (uint8 [3, size, size], box int32 [4] as (top, left, height, width), flip), as the loader's workers make
    it a batch at a time.
    """
    with open_image(source) as img:
        width, height = img.size
        boxes, flips = rrc_boxes(seed, view, np.array([index]), height, width, scale=scale, ratio=ratio)
        return torch.from_numpy(train_view_into(img, boxes[0], int(flips[0]), size, _new(size))), boxes[0], int(flips[0])


def load_eval(source: Source, size: int, crop_fraction: float = 0.875) -> torch.Tensor:
    """The evaluation view: uint8 [3, size, size], torchvision's ``Resize(round(size / crop_fraction))`` + ``CenterCrop(size)``."""
    with open_image(source) as img:
        return torch.from_numpy(eval_view_into(img, size, _new(size), crop_fraction))


def pixel_hash(view: torch.Tensor | np.ndarray) -> int:
    """CRC-32 of one uint8 view [3, H, W] (its bytes in C order): :func:`pixel_hashes` of a batch of one."""
    return int(pixel_hashes(view[None])[0])
