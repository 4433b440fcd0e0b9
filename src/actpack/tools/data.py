"""Fashion-MNIST from the IDX files on disk (no download, no torchvision).

The Debian package ``dataset-fashion-mnist`` installs the four gzip'd IDX
files in :data:`DEFAULT_DIR`; any directory holding them (gzip'd or not) works
as well.  Images come back as normalised ``float32`` tensors ``(N, 1, 28, 28)``
and labels as ``int64`` ``(N,)``.

Example::

    from actpack.tools.data import load_fashion_mnist
    train_x, train_y, test_x, test_y = load_fashion_mnist()
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

__all__ = [
    "CLASSES",
    "DEFAULT_DIR",
    "DatasetMissingError",
    "FILES",
    "INSTALL_HINT",
    "find_data_dir",
    "load_fashion_mnist",
    "read_idx",
]

#: Where ``apt-get install dataset-fashion-mnist`` puts the files.
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable that overrides :data:`DEFAULT_DIR`.
ENV_VAR = "ACTPACK_FASHION_MNIST"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
#: Mean and standard deviation of the training pixels (scaled to [0, 1]).
MEAN, STD = 0.2860, 0.3530
INSTALL_HINT = (
    "install it with `apt-get update && apt-get install -y dataset-fashion-mnist` "
    f"(files go to {DEFAULT_DIR}), or pass --data DIR pointing to a directory that holds "
    + ", ".join(f"{name}.gz" for name in FILES.values())
)

PathLike = Union[str, os.PathLike]


class DatasetMissingError(FileNotFoundError):
    """The Fashion-MNIST files are not where they were looked for."""


def _file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def find_data_dir(path: PathLike | None = None) -> Path:
    """The directory holding all four files: ``path``, ``$ACTPACK_FASHION_MNIST``
    or :data:`DEFAULT_DIR`.  Raises :class:`DatasetMissingError` otherwise."""
    if path is None:
        path = os.environ.get(ENV_VAR) or DEFAULT_DIR
    directory = Path(path).expanduser()
    missing = [stem for stem in FILES.values() if _file(directory, stem) is None]
    if missing:
        what = "directory does not exist" if not directory.is_dir() else f"missing {missing}"
        raise DatasetMissingError(
            f"Fashion-MNIST not found in {directory} ({what}); {INSTALL_HINT}."
        )
    return directory


def read_idx(path: PathLike) -> Tensor:
    """Read one IDX file (optionally gzip'd) of unsigned bytes into a uint8 tensor."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    numel = 1
    for n in shape:
        numel *= n
    if len(data) - header != numel:
        raise ValueError(f"{path}: expected {numel} bytes of data, found {len(data) - header}")
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header, count=numel)
    return flat.reshape(shape)


def _images(raw: Tensor) -> Tensor:
    return ((raw.to(torch.float32) / 255.0 - MEAN) / STD).unsqueeze(1).contiguous()


def load_fashion_mnist(
    path: PathLike | None = None, *, subset: int | None = None, test_subset: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_images, train_labels, test_images, test_labels)`` of Fashion-MNIST.

    Images are ``float32 (N, 1, 28, 28)`` normalised with the training mean and
    std; labels ``int64 (N,)``.  ``subset=n`` keeps the first ``n`` training
    and the first ``max(1, n // 5)`` test samples (for quick runs);
    ``test_subset=m`` keeps the first ``m`` test samples instead.
    """
    directory = find_data_dir(path)
    raw = {key: read_idx(_file(directory, stem)) for key, stem in FILES.items()}
    train_x, test_x = _images(raw["train_images"]), _images(raw["test_images"])
    train_y, test_y = raw["train_labels"].long(), raw["test_labels"].long()
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"{directory}: image and label counts differ")
    if subset is not None:
        if subset < 1:
            raise ValueError(f"subset must be positive, got {subset}")
        train_x, train_y = train_x[:subset], train_y[:subset]
    if test_subset is None and subset is not None:
        test_subset = max(1, subset // 5)
    if test_subset is not None:
        if test_subset < 1:
            raise ValueError(f"test_subset must be positive, got {test_subset}")
        test_x, test_y = test_x[:test_subset], test_y[:test_subset]
    return train_x, train_y, test_x, test_y
