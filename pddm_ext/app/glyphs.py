"""The ``glyphs`` dataset: the characters 0-9A-Za-z rendered from every font file found (class =
character, instance = font), with the rules that tell which characters a font really draws
(:class:`GlyphRenderer`), and the font list's hash that identifies the set in results.
"""

from __future__ import annotations

import glob
import hashlib
import os

import numpy as np

from . import extra_hint
from .datasets import DatasetError, split_tensors

GLYPH_CHARACTERS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DEFAULT_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts")
FONT_EXTENSIONS = (".ttf", ".otf")


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
    return split_tensors(images, labels, "glyphs", list(GLYPH_CHARACTERS), font_files=used,
                          font_hash=font_list_hash(used))
