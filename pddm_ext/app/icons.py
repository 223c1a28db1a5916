"""The ``icons`` dataset: freedesktop icon names drawn by many icon themes (class = icon name,
instance = style family), a colour, multi-style retrieval set in the spirit of ``glyphs``.

The rule, in order:

1. Themes are the folders of the icon root (default ``/usr/share/icons``; ``make icons`` installs the
   Debian packages of ``icons/debian-packages.txt``). :data:`ICON_FAMILIES` maps each known theme to
   its style family, or to None to leave it out (fallback and cursor themes); a theme it does not list
   is a family of its own. Colour variants of one design (Breeze and Breeze Dark, the GNOME-Colors
   variants, Papirus and its dark and light versions) are one family.
2. A file is ``<theme>/.../<name>.png|.svg|.svgz`` in a folder whose path names its nominal size
   (``48x48``, ``48``) or ``scalable``; hi-dpi folders (``@2x``) and symbolic (monochrome) icons are
   left out. Per (name, theme) the file nearest the dataset's ``size`` is taken: a raster of exactly
   that size, else a vector (nominal size nearest above, then below, then ``scalable``), else the
   smallest larger raster, else the largest smaller one; ties by path.
3. One sample per (name, family): the first theme of the family, in :data:`ICON_FAMILIES` order
   (then sorted), that draws the name.
4. Rasterised to ``size`` x ``size`` RGBA: SVG with resvg (the ``resvg-py`` wheel, no system library)
   at ``size`` px wide, rasters read by Pillow; anything not ``size`` x ``size`` is scaled (Lanczos)
   to fit and centred. Alpha is composited onto white (:data:`BACKGROUND`).
5. De-duplicated by content: an image (its RGB bytes) is kept once. Under several names it belongs
   to the name that more families draw, then to the name whose file is not a symlink to another
   name's, then to the first in sorted order; within that name, to the first family. So symlinked
   aliases (``inode-directory`` -> ``folder``) and themes copying another's art add nothing.
6. Names with fewer than ``min_samples`` distinct samples are skipped. Classes are the remaining
   names in sorted order; the first half trains, the rest is only retrieved.

The rendered set is cached (``$XDG_CACHE_HOME/pddm-ext/icons``, default ``~/.cache``) under a hash
of the chosen files' paths and contents, the size, the background and ``min_samples``; ``info``
records the themes with their families and that hash.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys

import numpy as np

DEFAULT_ICON_ROOT = "/usr/share/icons"
BACKGROUND = (255, 255, 255)
ICON_EXTENSIONS = (".png", ".svg", ".svgz")

# Theme folder -> style family (None: not used). Order matters within a family: the first theme
# that draws a name gives that family's sample.
ICON_FAMILIES = {
    "Adwaita": "adwaita",
    "breeze": "breeze", "breeze-dark": "breeze",
    # deepin-icon-theme's themes, counted as one family
    "bloom": "deepin", "bloom-dark": "deepin", "bloom-classic": "deepin", "bloom-classic-dark": "deepin",
    "Sea": "deepin", "Vintage": "deepin", "deepin": "deepin",
    "elementary": "elementary",
    "elementary-xfce": "elementary-xfce", "elementary-xfce-dark": "elementary-xfce",
    "elementary-xfce-darker": "elementary-xfce", "elementary-xfce-darkest": "elementary-xfce",
    "Moka": "moka", "Faba": "moka",  # Moka draws applications, Faba (its base) the rest
    "Faenza": "faenza", "Faenza-Dark": "faenza", "Faenza-Darker": "faenza", "Faenza-Darkest": "faenza",
    "Faenza-Ambiance": "faenza", "Faenza-Radiance": "faenza",
    "gnome": "gnome",
    # GNOME-Colors: a common set and colour variants of it
    "gnome-colors-common": "gnome-colors", "gnome-brave": "gnome-colors", "gnome-dust": "gnome-colors",
    "gnome-human": "gnome-colors", "gnome-illustrious": "gnome-colors", "gnome-noble": "gnome-colors",
    "gnome-wine": "gnome-colors", "gnome-wise": "gnome-colors",
    "gartoon": "gartoon",
    "Nuovo": "nuovo",
    "Suede": "suede",
    "yasis": "yasis",
    "nuoveXT2": "nuovext",
    "mate": "mate", "menta": "mate",
    "Numix": "numix", "Numix-Light": "numix", "Numix-Circle": "numix", "Numix-Circle-Light": "numix",
    "oxygen": "oxygen",
    "Paper": "paper", "Paper-Mono-Dark": None,
    "Papirus": "papirus", "Papirus-Dark": "papirus", "Papirus-Light": "papirus", "ePapirus": "papirus",
    "ePapirus-Dark": "papirus",
    "suru": "suru",
    "Tango": "tango",
    # fallback, legacy and cursor-only themes
    "hicolor": None, "default": None, "locolor": None, "HighContrast": None, "ContrastHigh": None,
    "DMZ-White": None, "DMZ-Black": None,
}

_SIZE_DIR = re.compile(r"^(\d+)(?:x(\d+))?$")


class IconError(ValueError):
    """An icon root that gives no usable dataset (one-line message)."""


def theme_families(root, families=None):
    """[(theme, family)] of the theme folders under ``root``: sorted by family (first appearance in
    ``families``, unknown themes after, by name), then by their order in ``families``."""
    families = ICON_FAMILIES if families is None else families
    order = list(families)
    themes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    out = [(t, families.get(t, t)) for t in themes]
    out = [(t, f) for t, f in out if f is not None]
    fam_rank = {}
    for t in order:
        if families[t] is not None:
            fam_rank.setdefault(families[t], len(fam_rank))
    return sorted(out, key=lambda tf: (fam_rank.get(tf[1], len(fam_rank)), tf[1],
                                       order.index(tf[0]) if tf[0] in families else 0, tf[0]))


def _nominal_size(rel_dirs):
    """The nominal size a theme's folder path names: an int, ``inf`` for ``scalable``, None when the
    path names no size or is a symbolic folder (a hi-dpi folder, ``16x16@2x`` or ``16@2x``, names no size)."""
    size = None
    for part in rel_dirs:
        if part == "symbolic":
            return None
        m = _SIZE_DIR.match(part)
        if m and (m.group(2) is None or m.group(1) == m.group(2)):
            size = int(m.group(1))
        elif part == "scalable":
            size = float("inf")
    return size


def theme_icons(theme_dir):
    """{name: [(nominal size, path)]} of the icon files of one theme (see the module docstring)."""
    icons = {}
    for dirpath, dirnames, files in os.walk(theme_dir, followlinks=False):
        dirnames.sort()
        rel = os.path.relpath(dirpath, theme_dir)
        size = _nominal_size([] if rel == "." else rel.split(os.sep))
        if size is None:
            continue
        for fname in sorted(files):
            stem, ext = os.path.splitext(fname)
            if ext.lower() not in ICON_EXTENSIONS or stem.endswith(("-symbolic", "-symbolic-rtl")):
                continue
            path = os.path.join(dirpath, fname)
            if os.path.isfile(path):  # a dangling symlink is no icon
                icons.setdefault(stem, []).append((size, path))
    return icons


def choose_file(candidates, size):
    """The (nominal size, path) of ``candidates`` nearest ``size`` by the module's rule."""

    def rank(c):
        n, path = c
        vector = not path.lower().endswith(".png")
        if not vector and n == size:
            return (0, 0, path)
        if vector:
            return (1, (0, n - size) if n >= size else (1, size - n), path)
        if n > size:
            return (2, n, path)
        return (3, -n, path)

    return min(candidates, key=rank)


def render_icon(path, size):
    """(size, size, 3) uint8: the icon file rendered (SVG by resvg), fitted, centred and composited
    onto :data:`BACKGROUND`."""
    from PIL import Image

    if path.lower().endswith(".png"):
        with Image.open(path) as f:
            img = f.convert("RGBA")
    else:
        import resvg_py

        png = resvg_py.svg_to_bytes(svg_path=path, width=size, skip_system_fonts=True)
        img = Image.open(io.BytesIO(bytes(png))).convert("RGBA")
    if img.size != (size, size):
        scale = size / max(img.size)
        w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        img = img.resize((w, h), Image.LANCZOS)
        canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        canvas.paste(img, ((size - w) // 2, (size - h) // 2))
        img = canvas
    out = Image.alpha_composite(Image.new("RGBA", (size, size), BACKGROUND + (255,)), img)
    return np.asarray(out.convert("RGB"))


def _file_sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pddm-ext", "icons")


def build_icons(root=None, *, size=64, min_samples=8, families=None, cache=True):
    """The icon set of the module's rule. Returns (images (N, 3, size, size) uint8, labels (N,) int64,
    class names (sorted), info dict). Raises :class:`IconError` when ``root`` is missing, holds no
    theme, or no name has ``min_samples`` distinct samples; ImportError when resvg-py is missing and
    an SVG must be rendered."""
    root = os.path.expanduser(root or DEFAULT_ICON_ROOT)
    if not os.path.isdir(root):
        raise IconError(f"no icon theme folder {root} (run `make icons`)")
    themes = theme_families(root, families)
    # (name, family) -> chosen file of the family's first theme drawing the name
    chosen, family_order = {}, []
    for theme, family in themes:
        if family not in family_order:
            family_order.append(family)
        for name, cands in theme_icons(os.path.join(root, theme)).items():
            if (name, family) not in chosen:
                chosen[(name, family)] = (theme, choose_file(cands, size)[1])
    per_name = {}
    for name, family in chosen:
        per_name.setdefault(name, []).append(family)
    rank = {f: i for i, f in enumerate(family_order)}
    names = sorted(n for n, fams in per_name.items() if len(fams) >= min_samples)
    todo = [(n, f) for n in names for f in sorted(per_name[n], key=rank.get)]
    if not todo:
        raise IconError(f"no icon name under {root} is drawn by {min_samples} or more style families "
                        f"({len(family_order)} families found; run `make icons`)")
    h = hashlib.sha256(f"size {size} background {BACKGROUND} min_samples {min_samples}\n".encode())
    for n, f in todo:
        theme, path = chosen[(n, f)]
        h.update(f"{n} {f} {os.path.relpath(path, root)} {_file_sha(path)}\n".encode())
    key = h.hexdigest()
    cache_file = os.path.join(_cache_dir(), f"{key[:32]}.npz")
    if cache and os.path.exists(cache_file):
        with np.load(cache_file) as z:
            images, labels, class_names = z["images"], z["labels"], [str(c) for c in z["class_names"]]
            sources = [str(s) for s in z["sources"]]
    else:
        rendered = []  # (name, family, image, digest) in sorted name order, then family order
        print(f"icons: rendering {len(todo)} icons of {len(names)} names at {size} px into {_cache_dir()} "
              "(once; later runs read the cache)", file=sys.stderr, flush=True)
        for n, f in todo:
            theme, path = chosen[(n, f)]
            try:
                img = render_icon(path, size)
            except ImportError:
                raise
            except Exception:  # noqa: BLE001 (a broken file: Pillow and resvg raise various errors)
                continue
            rendered.append((n, f, img, hashlib.sha256(img.tobytes()).digest()))
        # an image drawn under several names belongs to one: the name more families draw, then the one
        # whose file is not a symlink to another name's, then the first in sorted order
        def claim(i):
            n, f = rendered[i][:2]
            path = chosen[(n, f)][1]
            real = os.path.splitext(os.path.basename(os.path.realpath(path)))[0] == n
            return (-len(per_name[n]), not real, i)

        owner = {}
        for i, (n, f, img, digest) in enumerate(rendered):
            if digest not in owner or claim(i) < claim(owner[digest]):
                owner[digest] = i
        kept = {}
        for i, (n, f, img, digest) in enumerate(rendered):
            if owner[digest] == i:
                kept.setdefault(n, []).append((img, f"{f}:{os.path.relpath(chosen[(n, f)][1], root)}"))
        class_names = [n for n in names if len(kept.get(n, ())) >= min_samples]
        if not class_names:
            raise IconError(f"no icon name under {root} has {min_samples} or more distinct samples after "
                            "de-duplication (run `make icons`)")
        images = np.stack([img for c in class_names for img, _ in kept[c]]).transpose(0, 3, 1, 2)
        labels = np.asarray([i for i, c in enumerate(class_names) for _ in kept[c]], dtype=np.int64)
        sources = [src for c in class_names for _, src in kept[c]]
        if cache:
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            tmp = cache_file + f".{os.getpid()}.tmp.npz"
            np.savez_compressed(tmp, images=images, labels=labels, class_names=np.asarray(class_names),
                                sources=np.asarray(sources))
            os.replace(tmp, cache_file)
    used = sorted({s.split(":", 1)[1].split(os.sep, 1)[0] for s in sources})
    info = dict(icon_root=root, icon_size=size, icon_background=list(BACKGROUND), icon_min_samples=min_samples,
                icon_themes={t: f for t, f in themes if t in used}, icon_hash=key)
    return images, labels, class_names, info
