"""fastmeta.data: episode sampling, class splits, Omniglot loading, synthetic tasks."""

import importlib.util
import io
import math
import os
import re
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import fastmeta
from fastmeta.data import (
    EpisodeSampler,
    SinusoidTasks,
    gaussian_clusters,
    load_omniglot,
    rotate_classes,
    split_classes,
)

OMNIGLOT = Path(
    os.environ.get("FASTMETA_OMNIGLOT")
    or Path(__file__).resolve().parents[2] / "shared/data/omniglot"
)
HELD_OUT = ["Japanese_(katakana)", "Sanskrit", "Tagalog"]


def labelled(counts: list[int], label=lambda c: 3 * c - 7):
    """x [S, 2] = (label, row) so every sampled example says where it came from;
    labels are arbitrary values (negative, with gaps), classes sized by counts."""
    y = torch.cat([torch.full((n,), label(c)) for c, n in enumerate(counts)])
    return torch.stack([y, torch.arange(len(y))], dim=1), y


def check_episodes(episodes, y, ways, shots, queries, tasks):
    """Labels 0..N-1 class-major; each label names one class, the same in support and
    query; no example twice in a task; every example really has its class."""
    support_x, support_y, query_x, query_y = episodes
    assert support_x.shape == (tasks, ways * shots, 2)
    assert query_x.shape == (tasks, ways * queries, 2)
    assert support_y.dtype == query_y.dtype == torch.int64
    assert torch.equal(support_y, torch.arange(ways).repeat_interleave(shots).expand(tasks, -1))
    assert torch.equal(query_y, torch.arange(ways).repeat_interleave(queries).expand(tasks, -1))
    support_class = support_x[..., 0].view(tasks, ways, shots)
    query_class = query_x[..., 0].view(tasks, ways, queries)
    task_classes = support_class[..., 0]  # [T, N]
    assert (support_class == task_classes[..., None]).all()
    assert (query_class == task_classes[..., None]).all()
    assert all(len(c.unique()) == ways for c in task_classes)
    rows = torch.cat((support_x[..., 1], query_x[..., 1]), dim=1)  # [T, N*(K+Q)]
    assert all(len(r.unique()) == r.numel() for r in rows)
    assert torch.equal(y[rows], torch.cat((support_x[..., 0], query_x[..., 0]), dim=1))
    return task_classes, rows


# --- EpisodeSampler --------------------------------------------------------------------


@pytest.mark.parametrize("ways,shots,queries,tasks", [(5, 1, 15, 32), (3, 4, 2, 1), (1, 1, 1, 2)])
def test_episode_labels_and_classes(ways, shots, queries, tasks):
    x, y = labelled([16, 20, 17, 30, 16, 25, 40])
    sampler = EpisodeSampler(x, y, ways=ways, shots=shots, queries=queries, tasks=tasks, seed=1)
    for _ in range(3):
        check_episodes(sampler.sample(), y, ways, shots, queries, tasks)


def test_image_shapes():
    x, y = torch.rand(60, 1, 28, 28), torch.arange(12).repeat_interleave(5)
    support_x, support_y, query_x, query_y = EpisodeSampler(
        x, y, ways=4, shots=2, queries=3, tasks=6, seed=0
    ).sample()
    assert support_x.shape == (6, 8, 1, 28, 28) and query_x.shape == (6, 12, 1, 28, 28)
    assert support_y.shape == (6, 8) and query_y.shape == (6, 12)


def test_uneven_classes_reach_every_class_and_example():
    counts = [2, 9, 3, 40, 5, 2, 7]
    x, y = labelled(counts)
    sampler = EpisodeSampler(x, y, ways=3, shots=1, queries=1, tasks=8, seed=0)
    assert sampler.counts.tolist() == counts
    seen_classes, seen_rows = [], []
    for _, episodes in zip(range(200), sampler):
        classes, rows = check_episodes(episodes, y, 3, 1, 1, 8)
        seen_classes.append(classes)
        seen_rows.append(rows)
    per_class = torch.cat(seen_classes).unique(return_counts=True)[1]
    assert len(per_class) == len(counts)
    expected = 200 * 8 * 3 / len(counts)  # classes drawn uniformly
    assert ((per_class - expected).abs() < 0.2 * expected).all(), per_class
    support_rows, query_rows = torch.cat(seen_rows).split(3, dim=1)
    assert torch.equal(support_rows.unique(), torch.arange(len(y)))  # every example is
    assert torch.equal(query_rows.unique(), torch.arange(len(y)))  # support and query


def test_reproducible_from_seed():
    x, y = labelled([5] * 20)

    def batches(seed):
        sampler = EpisodeSampler(x, y, ways=5, shots=2, queries=3, tasks=4, seed=seed)
        return [b for _, b in zip(range(3), sampler)]

    first = batches(7)
    assert all(torch.equal(a, b) for ab, cd in zip(first, batches(7)) for a, b in zip(ab, cd))
    assert not torch.equal(first[0].support_x, batches(8)[0].support_x)
    assert not torch.equal(first[0].support_x, first[1].support_x)  # successive batches differ
    torch.manual_seed(0)
    unseeded = EpisodeSampler(x, y, ways=5, shots=2, queries=3, tasks=4).sample()
    torch.manual_seed(0)
    assert torch.equal(
        unseeded.query_x, EpisodeSampler(x, y, ways=5, shots=2, queries=3, tasks=4).sample().query_x
    )


class PairDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i].tolist(), int(self.y[i])


@pytest.mark.parametrize("make", [TensorDataset, PairDataset])
def test_dataset_input_matches_tensors(make):
    x, y = labelled([6, 7, 8, 9])
    args = dict(ways=3, shots=2, queries=2, tasks=5, seed=4)
    expected = EpisodeSampler(x, y, **args).sample()
    got = EpisodeSampler(make(x, y), **args).sample()
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_class_subset_samples_only_those_classes():
    x, y = labelled([4] * 30)
    train, val = split_classes(y.unique(), (20, 10), seed=0)
    for classes in (train, val):
        sampler = EpisodeSampler(
            x, y, ways=5, shots=1, queries=3, tasks=16, classes=classes, seed=0
        )
        assert torch.equal(sampler.classes, classes)
        sampled = torch.cat(
            [check_episodes(sampler.sample(), y, 5, 1, 3, 16)[0].flatten() for _ in range(10)]
        )
        assert torch.isin(sampled, classes).all()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_batches_on_target_device(device):
    x, y = labelled([5] * 8)
    episodes = EpisodeSampler(
        x, y, ways=2, shots=2, queries=3, tasks=3, seed=0, device=device
    ).sample()
    assert all(t.device.type == device for t in episodes)
    if device == "cuda":  # data on the GPU: indices drawn and gathered there
        on_gpu = EpisodeSampler(x.cuda(), y.cuda(), ways=2, shots=2, queries=3, tasks=3, seed=0)
        check_episodes([t.cpu() for t in on_gpu.sample()], y, 2, 2, 3, 3)


def test_episodes_feed_protonet():
    x, y = gaussian_clusters(20, 10, 16, noise=0.05, seed=0)
    episodes = EpisodeSampler(x, y, ways=5, shots=2, queries=4, tasks=8, seed=0).sample()
    loss, accuracy = fastmeta.ProtoNet(torch.nn.Identity()).loss(*episodes)
    assert torch.isfinite(loss) and accuracy > 0.95


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(ways=9), r"ways=9 exceeds the 8 classes"),
        (
            dict(shots=4, queries=2),
            r"shots \+ queries = 6 .* classes \[-4, 8, 11, 14\] have only \[5, 5, 5, 5\]",
        ),
        (dict(ways=0), r"ways must be an integer >= 1, got 0"),
        (dict(shots=0), r"shots must be an integer >= 1, got 0"),
        (dict(queries=0), r"queries must be an integer >= 1, got 0"),
        (dict(tasks=-1), r"tasks must be an integer >= 1, got -1"),
        (dict(y=torch.zeros(7, dtype=torch.int64)), r"same length, got x \[44, 2\] and y \[7\]"),
        (dict(y=torch.zeros(44)), r"integer labels, got shape \[44\] dtype torch.float32"),
        (dict(classes=[-7, 100]), r"classes not present in y: \[100\]"),
    ],
)
def test_bad_input(args, match):
    x, y = labelled([6, 5, 6, 6, 6, 5, 5, 5])
    kwargs = dict(x=x, y=y, ways=3, shots=2, queries=2) | args
    with pytest.raises(ValueError, match=match):
        EpisodeSampler(kwargs.pop("x"), kwargs.pop("y"), **kwargs)


def test_bad_dataset_items():
    with pytest.raises(ValueError, match=r"items must be \(x, y\) pairs, got tuple at index 0"):
        EpisodeSampler(TensorDataset(torch.rand(4, 2)), ways=1, shots=1, queries=1)


# --- split_classes ---------------------------------------------------------------------


def test_split_classes_disjoint_and_seeded():
    classes = torch.arange(100) * 2 + 1
    train, val, test = split_classes(classes, (0.7, 0.15, 0.15), seed=0)
    assert (len(train), len(val), len(test)) == (70, 15, 15)
    assert torch.equal(torch.cat((train, val, test)).sort().values, classes)
    assert all(
        torch.equal(a, b)
        for a, b in zip(split_classes(classes, (0.7, 0.15, 0.15), seed=0), (train, val, test))
    )
    assert not torch.equal(split_classes(classes, (0.7, 0.15, 0.15), seed=1)[0], train)
    a, b = split_classes(10, (3, 4), seed=2)
    assert (len(a), len(b)) == (3, 4) and not torch.isin(a, b).any()


def test_split_classes_by_group():
    groups = ["greek"] * 5 + ["latin"] * 7 + ["korean"] * 3 + ["tagalog"] * 4
    for seed in range(5):
        first, second = split_classes(len(groups), (3, 1), groups=groups, seed=seed)
        assert torch.equal(torch.cat((first, second)).sort().values, torch.arange(len(groups)))
        held = {groups[i] for i in second.tolist()}
        assert len(held) == 1 and {groups[i] for i in first.tolist()}.isdisjoint(held)


def test_split_classes_bad_input():
    with pytest.raises(ValueError, match=r"ask for 11 classes, only 10 exist"):
        split_classes(10, (6, 5))
    with pytest.raises(ValueError, match="distinct"):
        split_classes([1, 2, 2], (1, 1))
    with pytest.raises(ValueError, match="one key per class: 2 keys for 3 classes"):
        split_classes(3, (1, 1), groups=["a", "b"])


# --- synthetic tasks -------------------------------------------------------------------


def test_sinusoid_tasks():
    def tasks(seed):
        return SinusoidTasks(shots=5, queries=7, tasks=64, seed=seed)

    support_x, support_y, query_x, query_y = tasks(0).sample()
    assert support_x.shape == support_y.shape == (64, 5, 1)
    assert query_x.shape == query_y.shape == (64, 7, 1)
    x, y = torch.cat((support_x, query_x), 1).double(), torch.cat((support_y, query_y), 1).double()
    assert x.min() >= -5 and x.max() <= 5
    # A sin(x - p) = a sin x + b cos x with a = A cos p, b = -A sin p, one (a, b) per task.
    basis = torch.cat((torch.sin(x), torch.cos(x)), dim=2)  # [T, K+Q, 2]
    ab = torch.linalg.lstsq(basis, y).solution  # [T, 2, 1]
    assert (basis @ ab - y).abs().max() < 1e-4
    amplitude, phase = ab[:, 0, 0].hypot(ab[:, 1, 0]), torch.atan2(-ab[:, 1, 0], ab[:, 0, 0])
    assert amplitude.min() >= 0.1 - 1e-4 and amplitude.max() <= 5 + 1e-4
    assert phase.min() >= -1e-4 and phase.max() <= math.pi + 1e-4
    assert torch.equal(tasks(0).sample().query_y, query_y)
    assert not torch.equal(tasks(1).sample().query_y, query_y)


def test_gaussian_clusters():
    x, y = gaussian_clusters(6, 50, 8, noise=0.1, seed=3)
    assert x.shape == (300, 8) and x.dtype == torch.float32
    assert torch.equal(y, torch.arange(6).repeat_interleave(50))
    spread = x.view(6, 50, 8) - x.view(6, 50, 8).mean(1, keepdim=True)
    assert abs(float(spread.std()) - 0.1) < 0.01
    assert torch.equal(gaussian_clusters(6, 50, 8, noise=0.1, seed=3)[0], x)
    assert not torch.equal(gaussian_clusters(6, 50, 8, noise=0.1, seed=4)[0], x)


# --- Omniglot: small archives made here (Pillow only) ----------------------------------


def write_archive(path: Path, characters: dict[tuple[str, str], int], drawers: int = 3):
    """An Omniglot-layout zip: white 105x105 1-bit PNGs with a black square whose corner
    encodes (character index, drawer)."""
    pil = pytest.importorskip("PIL.Image")
    with zipfile.ZipFile(path, "w") as archive:
        for (alphabet, character), seed in characters.items():
            for drawer in range(drawers):
                image = pil.new("1", (105, 105), 1)
                corner = 4 * seed + 10 * drawer
                image.paste(0, (corner, corner, corner + 30, corner + 30))
                png = io.BytesIO()
                image.save(png, format="PNG")
                name = f"{path.stem}/{alphabet}/{character}/{seed:04d}_{drawer + 1:02d}.png"
                archive.writestr(name, png.getvalue())


def test_zip_folder_and_duplicates(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_archive(
        data / "images_background.zip",
        {("Latin", "character01"): 0, ("Latin", "character02"): 1, ("Greek", "character01"): 2},
    )
    write_archive(
        data / "images_evaluation.zip",
        {("Latin", "character02"): 1, ("Atlantean", "character01"): 3},
    )
    zipped = load_omniglot(data, image_size=14, cache_dir=tmp_path / "cache")
    assert zipped.alphabets == ("Atlantean", "Greek", "Latin", "Latin")
    assert zipped.characters == ("character01", "character01", "character01", "character02")
    assert zipped.images.shape == (12, 1, 14, 14)
    assert torch.equal(zipped.labels, torch.arange(4).repeat_interleave(3))
    ink = zipped.images[0, 0]  # black square at 12..42 of 105 px -> bright at 2..5 of 14
    assert ink[2:5, 2:5].min() > 0.9 and ink[8:, 8:].max() < 0.1

    unpacked = tmp_path / "unpacked"
    for archive in data.glob("*.zip"):
        zipfile.ZipFile(archive).extractall(unpacked)
    folders = load_omniglot(unpacked, image_size=14, cache_dir=tmp_path / "cache")
    assert torch.equal(folders.images, zipped.images) and folders.alphabets == zipped.alphabets


def test_unwritable_cache_warns(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_archive(data / "images_background.zip", {("Latin", "character01"): 0})
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="Omniglot not cached"):
        loaded = load_omniglot(data, cache_dir=blocker / "cache")
    assert loaded.images.shape == (3, 1, 28, 28)


def test_the_cache_tells_apart_same_named_archives_in_two_directories(tmp_path):
    """The key was the archives' names and sizes: a second directory got the first's images."""
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, character in ((first, "character01"), (second, "character02")):
        folder.mkdir()
        write_archive(folder / "images_background.zip", {("Latin", character): 0})
    sizes = {(d / "images_background.zip").stat().st_size for d in (first, second)}
    assert len(sizes) == 1  # same name, same size, other content
    cache = tmp_path / "cache"
    a, b = (load_omniglot(d, image_size=14, cache_dir=cache) for d in (first, second))
    assert a.characters == ("character01",) and b.characters == ("character02",)
    assert len(list(cache.glob("omniglot-14px-*.pt"))) == 2


def test_an_unreadable_cache_file_is_decoded_again(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_archive(data / "images_background.zip", {("Latin", "character01"): 0})
    first = load_omniglot(data, image_size=14, cache_dir=tmp_path / "cache")
    (cached,) = (tmp_path / "cache").glob("omniglot-14px-*.pt")
    for garbage in (b"truncated", None):
        if garbage is None:
            torch.save({"something": "else"}, cached)
        else:
            cached.write_bytes(garbage)
        with pytest.warns(UserWarning, match="Omniglot cache .* is unreadable"):
            again = load_omniglot(data, image_size=14, cache_dir=tmp_path / "cache")
        assert torch.equal(again.images, first.images)
    load_omniglot(data, image_size=14, cache_dir=tmp_path / "cache")  # rewritten: no warning


def test_an_archive_entry_outside_the_archive_is_refused(tmp_path):
    write_archive(tmp_path / "images_background.zip", {("Latin", "character01"): 0})
    with zipfile.ZipFile(tmp_path / "images_background.zip", "a") as archive:
        archive.writestr("../../x/y/z.png", b"")
    with pytest.raises(ValueError, match="entry '../../x/y/z.png' points outside the archive"):
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")


def test_omniglot_bad_input(tmp_path):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{nowhere} does not exist")):
        load_omniglot(nowhere, cache_dir=tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(NotADirectoryError, match=re.escape(f"{a_file} is a file, not a dir")):
        load_omniglot(a_file, cache_dir=tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"no Omniglot data in .*expected images_background\*.zip"
    ):
        load_omniglot(tmp_path, cache_dir=tmp_path)
    (tmp_path / "images_background.zip").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="images_background.zip is not a readable zip archive"):
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")


def test_omniglot_bad_png_and_missing_pillow(tmp_path, monkeypatch):
    with zipfile.ZipFile(tmp_path / "images_evaluation.zip", "w") as archive:
        archive.writestr("images_evaluation/Latin/character01/01_01.png", b"not a png")
    if importlib.util.find_spec("PIL"):
        with pytest.raises(
            ValueError,
            match=r"cannot decode .*images_evaluation.zip:"
            r"images_evaluation/Latin/character01/01_01.png",
        ):
            load_omniglot(tmp_path, cache_dir=tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="needs Pillow: pip install pillow"):
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")


def test_rotate_classes():
    images, labels = torch.rand(3, 1, 5, 5), torch.tensor([7, 2, 7])
    turned, turned_labels = rotate_classes(images, labels)
    assert turned.shape == (12, 1, 5, 5)
    assert torch.equal(turned_labels, torch.tensor([28, 29, 30, 31, 8, 9, 10, 11, 28, 29, 30, 31]))
    assert torch.equal(turned[5], images[1].rot90(1, dims=(-2, -1)))
    with pytest.raises(ValueError, match=r"square images"):
        rotate_classes(torch.rand(3, 1, 5, 4), labels)


# --- Omniglot: the shared small background archives ----------------------------------


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory):
    if not OMNIGLOT.is_dir():
        pytest.skip(f"no Omniglot archives at {OMNIGLOT} (set FASTMETA_OMNIGLOT)")
    pytest.importorskip("PIL", reason="Omniglot decoding needs Pillow")
    cache_dir = tmp_path_factory.mktemp("omniglot-cache")
    start = time.perf_counter()
    data = load_omniglot(OMNIGLOT, cache_dir=cache_dir)
    return data, cache_dir, time.perf_counter() - start


def test_omniglot_union(omniglot):
    data, _, _ = omniglot
    assert data.num_characters == 242 and len(set(data.alphabets)) == 8
    assert data.images.shape == (4840, 1, 28, 28) and data.images.dtype == torch.float32
    assert torch.equal(data.labels.bincount(), torch.full((242,), 20))
    assert data.images.min() == 0 and data.images.max() <= 1
    assert data.images.mean() < 0.2  # ink = 1: mostly dark background


def test_omniglot_alphabet_split(omniglot):
    data, _, _ = omniglot
    kept, held = data.alphabet_split(HELD_OUT)
    assert not torch.isin(kept, held).any() and len(kept) + len(held) == 242
    assert {data.alphabets[c] for c in held.tolist()} == set(HELD_OUT)
    assert set(HELD_OUT).isdisjoint(data.alphabets[c] for c in kept.tolist())
    with pytest.raises(ValueError, match=r"unknown alphabets \['Klingon'\]"):
        data.alphabet_split(["Klingon"])


def test_omniglot_rotated(omniglot):
    data, _, _ = omniglot
    rotated = data.rotated()
    assert rotated.num_characters == 4 * 242 and rotated.images.shape == (4 * 4840, 1, 28, 28)
    assert len(rotated.labels.unique()) == 4 * 242
    kept, held = rotated.alphabet_split(HELD_OUT)
    assert torch.equal(torch.cat((kept, held)).sort().values, torch.arange(968))


def test_omniglot_cache(omniglot):
    data, cache_dir, first = omniglot
    assert len(list(cache_dir.glob("omniglot-28px-*.pt"))) == 1
    start = time.perf_counter()
    again = load_omniglot(OMNIGLOT, cache_dir=cache_dir)
    reload = time.perf_counter() - start
    assert torch.equal(again.images, data.images) and torch.equal(again.labels, data.labels)
    assert again.alphabets == data.alphabets and again.characters == data.characters
    assert reload < 0.5 * first, (reload, first)
