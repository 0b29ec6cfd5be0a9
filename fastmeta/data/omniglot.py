"""Omniglot (Lake, Salakhutdinov and Tenenbaum, 2015) read from the dataset's own zip
archives or unpacked folders, decoded once and cached as one tensor file."""

import hashlib
import io
import os
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from fastmeta.data.sampler import check_positive

SOURCES = ("images_background*", "images_evaluation*")
_IMAGES_IN_FOLDER = "*/*/*.png"  # <alphabet>/<character>/<image>.png
_DECODING = "v1-L-lanczos-ink"  # part of the cache key: change it when decoding changes


@dataclass(frozen=True, eq=False, repr=False)
class Omniglot:
    """images [S, 1, H, H] float32 in [0, 1] with ink = 1 (bright strokes on a 0
    background); labels [S] int64, the character of each image; alphabets[c] and
    characters[c] ("character01"): alphabet and name of character c. Characters are
    numbered in (alphabet, name) order, images in file-name order within each.
    Split by alphabet with alphabet_split, by character with
    split_classes(omniglot.num_characters, sizes, seed=...)."""

    images: Tensor
    labels: Tensor
    alphabets: tuple[str, ...]
    characters: tuple[str, ...]

    @property
    def num_characters(self) -> int:
        return len(self.characters)

    def __repr__(self) -> str:
        return (
            f"Omniglot({len(self.images)} images {list(self.images.shape[1:])}, "
            f"{self.num_characters} characters, {len(set(self.alphabets))} alphabets)"
        )

    def alphabet_split(self, held_out: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Character labels (kept [C1], held out [C2]): whole alphabets held out by name."""
        held_out = [held_out] if isinstance(held_out, str) else list(held_out)
        unknown = sorted(set(held_out) - set(self.alphabets))
        if unknown:
            raise ValueError(
                f"unknown alphabets {unknown}; this Omniglot has {sorted(set(self.alphabets))}"
            )
        held = torch.tensor([alphabet in held_out for alphabet in self.alphabets])
        characters = torch.arange(self.num_characters)
        return characters[~held], characters[held]

    def rotated(self) -> "Omniglot":
        """4x the characters: each one turned by 0, 90, 180, 270 degrees is a class of
        its own (character 4c + k is character c turned by k * 90, see rotate_classes)."""
        images, labels = rotate_classes(self.images, self.labels)
        return Omniglot(
            images,
            labels,
            tuple(a for a in self.alphabets for _ in range(4)),
            tuple(f"{c}_rot{90 * k}" for c in self.characters for k in range(4)),
        )


def rotate_classes(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Rotation augmentation as new classes: images [S, ..., H, H], labels [S] ->
    [4S, ..., H, H], [4S]. Image 4i + k is image i turned k * 90 degrees
    counter-clockwise, with label 4 * labels[i] + k."""
    if images.dim() < 2 or images.shape[-1] != images.shape[-2] or len(images) != len(labels):
        raise ValueError(
            f"rotate_classes needs square images [S, ..., H, H] and labels [S], "
            f"got images {list(images.shape)} and labels {list(labels.shape)}"
        )
    turned = torch.stack([images.rot90(k, dims=(-2, -1)) for k in range(4)], dim=1)
    labels = 4 * labels[:, None] + torch.arange(4, device=labels.device)
    return turned.flatten(0, 1), labels.flatten()


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "fastmeta"


def load_omniglot(
    root: str | Path, image_size: int = 28, cache_dir: str | Path | None = None
) -> Omniglot:
    """Omniglot from `root`, a directory holding any of images_background*.zip,
    images_evaluation*.zip, or unpacked folders of those names
    (<folder>/<alphabet>/<character>/<image>.png). A character found in several
    sources (e.g. Greek in both small background sets) is read once.

    Images are resized from 105x105 to image_size with Pillow's LANCZOS filter and
    inverted so that ink = 1: images [S, 1, image_size, image_size] float32 in [0, 1].
    The decoded set is cached in cache_dir (default $XDG_CACHE_HOME/fastmeta or
    ~/.cache/fastmeta, never root), keyed by the sources' absolute paths, sizes and
    modification times (each image's, for a folder) and image_size, and read from there
    next time without Pillow; an unreadable cache file is decoded again and replaced.
    Pillow is needed to decode. Archive entries outside <alphabet>/<character>/ (a ".."
    or an absolute path) are refused.
    """
    check_positive(image_size=image_size)
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"Omniglot directory {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"Omniglot directory {root} is a file, not a directory")
    sources = _sources(root)
    if not sources:
        raise FileNotFoundError(
            f"no Omniglot data in {root}: expected images_background*.zip, "
            f"images_evaluation*.zip or unpacked folders of those names"
        )
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache = cache_dir / f"omniglot-{image_size}px-{_cache_key(sources, image_size)}.pt"
    saved = _read_cache(cache) if cache.is_file() else None
    if saved is None:
        saved = _decode(sources, image_size)
        _save(saved, cache)
    return Omniglot(
        saved["ink"].float().div_(255),
        saved["labels"],
        tuple(saved["alphabets"]),
        tuple(saved["characters"]),
    )


def _sources(root: Path) -> list[Path]:
    """Zip archives, then unpacked folders that have no zip of the same name beside them."""
    zips = sorted({p for pattern in SOURCES for p in root.glob(pattern + ".zip") if p.is_file()})
    folders = sorted(
        {
            p
            for pattern in SOURCES
            for p in root.glob(pattern)
            if p.is_dir() and p.with_name(p.name + ".zip") not in zips
        }
    )
    return zips + folders


def _fingerprint(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _cache_key(sources: list[Path], image_size: int) -> str:
    """Which sources, where, and as they are now: two directories with same-named,
    same-sized archives do not share a cache entry, and a changed file makes a new one."""
    prints = [
        (
            str(s.resolve()),
            _fingerprint(s)
            if s.is_file()
            else sorted(
                (str(p.relative_to(s)), *_fingerprint(p)) for p in s.glob(_IMAGES_IN_FOLDER)
            ),
        )
        for s in sources
    ]
    return hashlib.sha1(repr((_DECODING, image_size, prints)).encode()).hexdigest()[:16]


_CACHED = {"ink", "labels", "alphabets", "characters"}


def _read_cache(cache: Path) -> dict | None:
    """The cached set, or None (with a warning) if the file cannot be read as one."""
    try:
        saved = torch.load(cache, weights_only=True)
        if isinstance(saved, dict) and _CACHED <= set(saved):
            return saved
        problem = "not a cached Omniglot set"
    except Exception as error:  # truncated, corrupted, foreign: decode again
        problem = str(error)
    warnings.warn(f"Omniglot cache {cache} is unreadable ({problem}): decoding again", stacklevel=3)
    return None


PngFile = tuple[str, str, Callable[[], bytes]]  # file name, where (for messages), reader


def _listing(source: Path, stack: ExitStack) -> Iterator[tuple[str, str, PngFile]]:
    """(alphabet, character, image) for every PNG of a zip archive or folder."""
    if source.is_dir():
        for path in source.glob(_IMAGES_IN_FOLDER):
            yield path.parts[-3], path.parts[-2], (path.name, str(path), path.read_bytes)
        return
    try:
        archive = stack.enter_context(zipfile.ZipFile(source))
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{source} is not a readable zip archive: {error}") from None
    for info in archive.infolist():
        parts = info.filename.split("/")
        if ".." in parts or info.filename.startswith("/"):
            raise ValueError(f"{source}: entry {info.filename!r} points outside the archive")
        if len(parts) >= 3 and parts[-1].endswith(".png"):
            yield (
                parts[-3],
                parts[-2],
                (parts[-1], f"{source}:{info.filename}", partial(archive.read, info)),
            )


def _decode(sources: list[Path], size: int) -> dict:
    with ExitStack() as stack:
        characters: dict[tuple[str, str], list[PngFile]] = {}
        for source in sources:
            found: dict[tuple[str, str], list[PngFile]] = {}
            for alphabet, character, image in _listing(source, stack):
                found.setdefault((alphabet, character), []).append(image)
            for key, images in found.items():
                characters.setdefault(key, images)  # first source wins: duplicates read once
        if not characters:
            raise ValueError(
                f"no <alphabet>/<character>/<image>.png files in {[str(s) for s in sources]}"
            )
        pil = _pillow()
        keys = sorted(characters)
        images = [
            image for key in keys for image in sorted(characters[key], key=lambda image: image[0])
        ]
        pixels = bytearray(len(images) * size * size)
        for i, (_, where, read) in enumerate(images):
            try:
                with pil.open(io.BytesIO(read())) as png:
                    small = png.convert("L").resize((size, size), pil.Resampling.LANCZOS)
            except (OSError, zipfile.BadZipFile, zlib.error) as error:
                raise ValueError(f"cannot decode {where}: {error}") from None
            pixels[i * size * size : (i + 1) * size * size] = small.tobytes()
    counts = torch.tensor([len(characters[key]) for key in keys])
    return {
        "ink": 255 - torch.frombuffer(pixels, dtype=torch.uint8).view(-1, 1, size, size),
        "labels": torch.arange(len(keys)).repeat_interleave(counts),
        "alphabets": [alphabet for alphabet, _ in keys],
        "characters": [character for _, character in keys],
    }


def _save(saved: dict, cache: Path) -> None:
    """Writes atomically; an unwritable cache only costs decoding again next time."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial_file = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        torch.save(saved, partial_file)
        os.replace(partial_file, cache)
    except OSError as error:
        warnings.warn(f"Omniglot not cached: cannot write {cache}: {error}", stacklevel=3)


def _pillow():
    try:
        from PIL import Image as pil
    except ImportError:
        raise ImportError("decoding Omniglot needs Pillow: pip install pillow") from None
    return pil
