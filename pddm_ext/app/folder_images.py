"""The ``folder:PATH`` datasets: an image folder with one subfolder per class (CUB-200-2011, CARS196,
Stanford Online Products laid out that way), every file checked once at load (:func:`check_image`),
images read from disk on demand (:class:`FolderImages`), and the rule that turns any Pillow image
into 8-bit RGB (:func:`to_rgb`, which the EfficientNet-Lite0 input rule reuses).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .datasets import DatasetError, ZeroShotSplit, zero_shot_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited onto: white
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _integer_bits(img):
    """Bits per sample of a Pillow integer image: 16 for the ``I;16`` modes; for ``I`` (Pillow's
    32-bit signed container), the depth the file records (TIFF's BitsPerSample; PNG and PGM/PPM
    store at most 16), else 32."""
    if img.mode.startswith("I;16"):
        return 16
    bits = getattr(img, "tag_v2", {}).get(258) if img.format == "TIFF" else None
    if isinstance(bits, (tuple, list)):
        bits = bits[0] if bits else None
    if isinstance(bits, int) and 1 <= bits <= 32:
        return bits
    return 16 if img.format in ("PNG", "PPM") else 32


def to_rgb(img):
    """A Pillow image of any mode as an 8-bit ``RGB`` image, by this rule:

    - 8-bit modes (``L``, ``P``, ``RGB``, ``1``, ``CMYK``, ``YCbCr``, ...): Pillow's ``convert("RGB")``
      (``1`` becomes 0/255, a palette is looked up, CMYK is converted without a colour profile);
    - integer images of more than 8 bits (``I;16*``, ``I``) are scaled by their bit depth:
      0 is black, 2**bits - 1 white (``I`` is signed 32-bit in Pillow: its largest value is
      2**31 - 1 when the file does not record a smaller depth; negative values are black);
    - float images (``F``) are read in the range [0, 1]: 0 black, 1 white, values outside clipped,
      NaN black (:func:`conversion_note` says when a file's values leave that range);
    - an alpha channel (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``) or a transparent
      colour (``info["transparency"]``, e.g. a palette image's transparent index) is composited onto
      a white background (``BACKGROUND``), never dropped.

    Grey results are replicated to the three channels.
    """
    from PIL import Image

    if img.mode in HIGH_DEPTH_MODES:
        values = np.asarray(img).astype(np.float64)
        if img.mode == "F":
            scaled = np.clip(np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
        else:
            top = min(2 ** _integer_bits(img) - 1, 2**31 - 1)
            scaled = np.clip(values, 0, top) / top
        grey = np.round(scaled * 255).astype(np.uint8)
        key = img.info.get("transparency")
        if isinstance(key, (int, float)) and img.mode != "F":  # a transparent grey value (PNG tRNS)
            grey[values == key] = round(sum(BACKGROUND) / 3)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, BACKGROUND + (255,)), rgba).convert("RGB")
    return img.convert("RGB")


def conversion_note(img):
    """What :func:`to_rgb` loses from this image (float values outside [0, 1] or NaN, negative
    integers), as a short phrase, or None when it loses nothing beyond the 8-bit rounding."""
    if img.mode == "F":
        values = np.asarray(img)
        if not np.isfinite(values).all():
            return "float pixels that are NaN or infinite"
        if values.size and (values.min() < 0 or values.max() > 1):
            return f"float pixels outside [0, 1] (from {values.min():.4g} to {values.max():.4g}), clipped"
    elif img.mode == "I" and img.getextrema()[0] < 0:
        return "negative integer pixels, drawn black"
    return None


def check_image(path):
    """Decodes the image file at ``path`` as training would and returns (problem, note): ``problem``
    a one-phrase reason the file cannot be used (or None), ``note`` what :func:`conversion_note`
    reports (or None). JPEG files are decoded at 1/8 scale (Pillow's ``draft``: every byte of the
    file is still read, so truncated or corrupt data is found, at a fraction of the cost)."""
    from PIL import Image

    try:
        with Image.open(path) as f:
            f.verify()  # the header, and for PNG every chunk's checksum
        with Image.open(path) as f:
            if f.format == "JPEG":
                f.draft("RGB", (max(1, f.width // 8), max(1, f.height // 8)))
            f.load()
            note = conversion_note(f)
            to_rgb(f)
    except Exception as exc:  # noqa: BLE001 (Pillow raises OSError, ValueError, SyntaxError, ... for bad files)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return reason.replace(str(path), "").replace("''", "").strip(" :") or type(exc).__name__, None
    return None, note


class FolderImages(torch.utils.data.Dataset):
    """Images read from disk on demand, converted to RGB by :func:`to_rgb`, as ``size`` x ``size``
    float32 tensors (3, size, size) normalised with the ImageNet mean and std. ``train=True`` applies the usual augmentation (random resized crop,
    scale 0.16-1, aspect 3/4-4/3, horizontal flip; drawn from torch's global RNG so seeded runs
    repeat); otherwise the centre crop that resizing the short side to size * 8/7 would leave, resampled
    from the original (:meth:`centre_box`)."""

    def __init__(self, paths, labels, *, size, train):
        self.paths, self.labels, self.size, self.train = list(paths), labels, size, train

    def __len__(self):
        return len(self.paths)

    def _random_crop(self, img):
        w, h = img.size
        for _ in range(10):
            area = w * h * float(torch.empty(()).uniform_(0.16, 1.0))
            log_ratio = float(torch.empty(()).uniform_(np.log(3 / 4), np.log(4 / 3)))
            cw = int(round((area * np.exp(log_ratio)) ** 0.5))
            ch = int(round((area / np.exp(log_ratio)) ** 0.5))
            if 0 < cw <= w and 0 < ch <= h:
                x0 = int(torch.randint(0, w - cw + 1, ()))
                y0 = int(torch.randint(0, h - ch + 1, ()))
                return img.crop((x0, y0, x0 + cw, y0 + ch))
        side = min(w, h)
        return img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))

    def centre_box(self, w, h):
        """The region of a w x h image that evaluation keeps, in its own pixels: the centre square that
        ``size`` x ``size`` covers once the short side is resized to ``size * 8/7``. Resampling only
        that region (PIL's ``resize(box=...)``) costs ``size``² pixels whatever the aspect ratio, where
        resizing the whole image first would allocate ``size * 8/7 * aspect`` rows (gigabytes for a
        20000 x 1 strip)."""
        side = min(w, h) * self.size / (self.size * 8 / 7)
        x0, y0 = (w - side) / 2, (h - side) / 2
        return (x0, y0, x0 + side, y0 + side)

    def __getitem__(self, index):
        from PIL import Image

        with Image.open(self.paths[index]) as f:
            img = to_rgb(f)
        if self.train:
            img = self._random_crop(img).resize((self.size, self.size), Image.BILINEAR)
            if bool(torch.rand(()) < 0.5):
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img = img.resize((self.size, self.size), Image.BILINEAR, box=self.centre_box(*img.size))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std, self.labels[index]


def load_folder(path, *, size=224):
    """An image folder with one subfolder per class (CUB-200-2011, CARS196, Stanford Online Products
    laid out that way). Classes are the subfolder names in sorted order; the first half trains.
    Hidden entries (names starting with ".") are skipped: no class, no image.

    Files with an image extension (``IMAGE_EXTENSIONS``, any case) are images; every one is decoded
    once here (:func:`check_image`, on up to 8 threads), so a file that is not a readable image (a text file named
    ``.jpg``, a truncated download) stops the load with a DatasetError naming it, before any
    training. Images are converted to RGB by :func:`to_rgb`'s rule; a file that rule clips (float
    values outside [0, 1]) is named in a UserWarning."""
    root = os.path.expanduser(path)
    if not os.path.isdir(root):
        raise DatasetError(f"dataset folder:{path}: no such directory")
    # hidden entries (.ipynb_checkpoints, .git, ._* resource forks) are no classes and no images
    class_names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    paths, labels = [], []
    for c, name in enumerate(class_names):
        class_root = os.path.join(root, name)
        for dirpath, _, files in sorted(os.walk(class_root)):
            if any(part.startswith(".") for part in os.path.relpath(dirpath, class_root).split(os.sep) if part != "."):
                continue
            for fname in sorted(files):
                if fname.lower().endswith(IMAGE_EXTENSIONS) and not fname.startswith("."):
                    paths.append(os.path.join(dirpath, fname))
                    labels.append(c)
    bad, notes = [], []
    # Pillow releases the GIL while it decodes: threads check several files at once
    from concurrent.futures import ThreadPoolExecutor

    from .options import CORES

    with ThreadPoolExecutor(max_workers=max(1, min(8, CORES))) as pool:
        checked = list(pool.map(check_image, paths))
    for p, (problem, note) in zip(paths, checked):
        if problem:
            bad.append((p, problem))
        elif note:
            notes.append((p, note))
    if bad:
        first, why = bad[0]
        raise DatasetError(f"dataset folder:{path}: {len(bad)} file(s) with an image extension cannot be read as "
                           f"images, first {os.path.relpath(first, root)} ({why}); remove or replace them")
    if notes:
        import warnings

        first, what = notes[0]
        warnings.warn(f"dataset folder:{path}: {len(notes)} image(s) lose values in the conversion to RGB, "
                      f"first {os.path.relpath(first, root)}: {what}", UserWarning, stacklevel=2)
    present = sorted(set(labels))
    if len(present) < 2:
        raise DatasetError(f"dataset folder:{path}: needs at least 2 class subfolders with images, found {len(present)}")
    names = [class_names[c] for c in present]
    remap = {c: i for i, c in enumerate(present)}
    labels = torch.tensor([remap[c] for c in labels], dtype=torch.int64)
    train, test = zero_shot_split(labels)
    pick = lambda mask: [p for p, m in zip(paths, mask.tolist()) if m]  # noqa: E731
    n_train = len(torch.unique(labels[train]))
    info = dict(name=f"folder:{path}", num_images=len(labels), num_classes=len(names),
                train_classes=names[:n_train], test_classes=names[n_train:],
                input_norm=[list(IMAGENET_MEAN), list(IMAGENET_STD)])
    return ZeroShotSplit(FolderImages(pick(train), labels[train], size=size, train=True),
                         FolderImages(pick(test), labels[test], size=size, train=False),
                         labels[train], labels[test], (3, size, size), info)
