"""Tests for data.py: readers, validation errors, the synthetic set, minival split, transforms,
Mixup/CutMix and the loaders. Every fixture is a few tiny images written into tmp_path."""
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from data import DataError  # noqa: E402

torch.set_num_threads(1)


def write_image(path, size=(8, 6), value=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), value, np.uint8)
    pixels[0, 0] = (255 - value, value, 7)
    Image.fromarray(pixels).save(path, fmt)
    return path


def make_folder(root, classes=("cat", "dog"), per_class=3, size=(8, 6)):
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            for i in range(per_class):
                suffix = ".png" if i % 2 == 0 else ".jpg"
                write_image(root / split / name / f"{i}{suffix}", size, value=40 * label + i)
    return root


def write_pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    # protocol 2 and numpy's pre-2.0 module name, as in the real files (written by Python 2)
    path.write_bytes(pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def make_cifar10(folder, per_batch=2):
    write_pickle(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)],
                                           b"num_cases_per_batch": per_batch})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(name[-1]) % 10 if name[-1].isdigit() else 9] * per_batch
        pixels = np.arange(per_batch * 3072, dtype=np.int64).reshape(per_batch, 3072) % 251
        write_pickle(folder / name, {b"data": pixels.astype(np.uint8), b"labels": labels,
                                     b"batch_label": b"x", b"filenames": [b"f.png"] * per_batch})
    return folder


def make_cifar100(folder):
    write_pickle(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                   b"coarse_label_names": [f"k{i}".encode() for i in range(20)]})
    for name, labels in (("train", [5, 99, 0]), ("test", [42])):
        pixels = np.zeros((len(labels), 3072), np.uint8)
        pixels[:, 1024:2048] = 200  # the green plane
        write_pickle(folder / name, {b"data": pixels, b"fine_labels": labels, b"coarse_labels": [0] * len(labels)})
    return folder


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return data.ensure_synthetic(tmp_path_factory.mktemp("syn") / "set", seed=3, n_train=40, n_val=20)

# ----------------------------------------------------------------------------- readers


def test_image_folder_is_read_in_memory_with_sorted_classes(tmp_path):
    dataset = data.load_dataset(make_folder(tmp_path, classes=("dog", "cat")))
    assert dataset.kind == "folder" and dataset.class_names == ["cat", "dog"]
    assert dataset.train.pixels.shape == (6, 3, 6, 8) and dataset.train.pixels.dtype == torch.uint8
    assert dataset.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert dataset.train.pixels[0, :, 0, 0].tolist() == [215, 40, 7]  # cat (written 2nd), RGB, lossless
    assert len(dataset.val) == 6


def test_image_folder_without_verify_streams_files(tmp_path):
    dataset = data.load_dataset(make_folder(tmp_path, size=(5, 9)), verify=False)
    assert dataset.train.pixels is None and len(dataset.train.paths) == 6
    image = dataset.train.load(3)
    assert image.shape == (3, 9, 5) and image.dtype == torch.uint8


def test_cifar10_is_detected_directly_and_from_its_parent(tmp_path):
    folder = make_cifar10(tmp_path / "cifar-10-batches-py")
    for path in (folder, tmp_path):
        dataset = data.load_dataset(path)
        assert dataset.kind == "cifar10" and dataset.class_names[:2] == ["c0", "c1"]
        assert dataset.train.pixels.shape == (10, 3, 32, 32) and dataset.val.pixels.shape == (2, 3, 32, 32)
        assert dataset.train.labels.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
        assert dataset.val.labels.tolist() == [9, 9]
    assert dataset.train.pixels[0, 1, 0, 0] == 1024 % 251  # plane 1 (green) starts at byte 1024


def test_cifar100_uses_fine_labels_and_channel_planes(tmp_path):
    make_cifar100(tmp_path / "cifar-100-python")
    dataset = data.load_dataset(tmp_path)
    assert dataset.kind == "cifar100" and len(dataset.class_names) == 100 and dataset.class_names[99] == "f99"
    assert dataset.train.labels.tolist() == [5, 99, 0] and dataset.val.labels.tolist() == [42]
    assert dataset.train.pixels[:, :, 5, 5].tolist() == [[0, 200, 0]] * 3


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    folder = make_cifar10(tmp_path / "cifar-10-batches-py")
    write_pickle(folder / "data_batch_3", {b"data": Path("x"), b"labels": []})  # names pathlib.PosixPath
    with pytest.raises(DataError, match="data_batch_3.*refusing to load pathlib"):
        data.load_dataset(folder)


def test_cifar_missing_batch_is_named(tmp_path):
    folder = make_cifar10(tmp_path / "cifar-10-batches-py")
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch: file missing"):
        data.load_dataset(tmp_path)

# ----------------------------------------------------------------------------- bad input


def break_nothing(root):
    return root / "nowhere", "nowhere: data folder does not exist"


def break_val_missing(root):
    make_folder(root)
    for file in (root / "val").rglob("*.*"):
        file.unlink()
    for folder in sorted((root / "val").iterdir()):
        folder.rmdir()
    (root / "val").rmdir()
    return root, "val: folder missing"


def break_no_class_folders(root):
    make_folder(root)
    for file in (root / "train").rglob("*.*"):
        file.rename(root / "train" / f"{file.parent.name}{file.name}")
    for folder in [d for d in (root / "train").iterdir() if d.is_dir()]:
        folder.rmdir()
    return root, "train: no class folders"


def break_empty_class(root):
    make_folder(root)
    (root / "train" / "emu").mkdir()
    (root / "train" / "emu" / "notes.txt").write_text("not an image")
    return root, "emu: empty class folder"


def break_class_sets(root):
    make_folder(root)
    (root / "val" / "dog").rename(root / "val" / "wolf")
    return root, r"val: classes differ from train: only in train \['dog'\], only in val \['wolf'\]"


def break_garbage_image(root):
    make_folder(root)
    (root / "val" / "dog" / "0.png").write_bytes(b"not a png at all")
    return root, "dog/0.png: unreadable or corrupt image"


def break_truncated_jpeg(root):
    make_folder(root, size=(64, 64))
    path = write_image(root / "train" / "cat" / "big.jpg", (64, 64), fmt="JPEG")
    path.write_bytes(path.read_bytes()[:400])  # the header parses, the pixels end early
    return root, "cat/big.jpg: unreadable or corrupt image"


@pytest.mark.parametrize("breaker", [break_nothing, break_val_missing, break_no_class_folders,
                                     break_empty_class, break_class_sets, break_garbage_image,
                                     break_truncated_jpeg])
def test_bad_input_raises_data_error_naming_the_place(tmp_path, breaker):
    path, message = breaker(tmp_path)
    with pytest.raises(DataError, match=message):
        data.load_dataset(path)

# ----------------------------------------------------------------------------- synthetic set


def test_synthetic_set_is_a_complete_image_folder(synthetic_root):
    assert (synthetic_root / data.SYNTHETIC_MARKER).is_file()
    dataset = data.load_dataset(synthetic_root)
    assert dataset.kind == "synthetic" and dataset.class_names == sorted(data.SYNTHETIC_CLASSES)
    assert dataset.train.pixels.shape == (40, 3, 32, 32) and len(dataset.val) == 20
    assert torch.bincount(dataset.train.labels).tolist() == [4] * 10
    assert list(synthetic_root.parent.glob(".*tmp*")) == []


def test_synthetic_key_squares_follow_their_class_definition():
    for label, name in enumerate(data.SYNTHETIC_CLASSES):
        for seed in range(20):
            squares = data._key_squares(name, np.random.default_rng([seed, label]))
            boxes, colours = [b for b, _ in squares], [c for _, c in squares]
            assert all(data.MARGIN <= v <= data.SIZE - data.MARGIN - side for *corner, side in boxes for v in corner)
            centres = [data._centre(box) for box in boxes]
            if label < 4:
                assert colours == [data.RED, data.BLUE]
                dy, dx = centres[1] - centres[0]
                along, across = (dx, dy) if "left" in name else (dy, dx)
                assert (along if name.startswith("red") else -along) >= abs(across) + 6
                continue
            assert data.RED not in colours and data.BLUE not in colours
            assert len(boxes) == int(name[0])
            if name.startswith("2_"):
                assert (colours[0] == colours[1]) == (name == "2_same_colour")
            if name.startswith("3_"):
                (ay, ax), (by, bx), (cy, cx) = centres
                twice_area = abs((by - ay) * (cx - ax) - (bx - ax) * (cy - ay))
                assert (twice_area < 1e-9) == (name == "3_in_a_line")


def test_synthetic_set_is_deterministic_in_its_seed(tmp_path, synthetic_root):
    def contents(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.png"))}

    same = data.ensure_synthetic(tmp_path / "a", seed=3, n_train=40, n_val=20)
    other = data.ensure_synthetic(tmp_path / "b", seed=4, n_train=40, n_val=20)
    assert contents(same) == contents(synthetic_root)
    assert contents(other).keys() == contents(same).keys() and contents(other) != contents(same)


def test_synthetic_generation_is_atomic(tmp_path, monkeypatch):
    root, draw, calls = tmp_path / "set", data.synthetic_image, []

    def crash_after_five(label, rng):
        calls.append(label)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return draw(label, rng)

    monkeypatch.setattr(data, "synthetic_image", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        data.ensure_synthetic(root, n_train=20, n_val=10)
    assert list(tmp_path.iterdir()) == []  # neither the set nor its temporary folder
    monkeypatch.setattr(data, "synthetic_image", draw)
    data.ensure_synthetic(root, n_train=20, n_val=10)
    assert len(list(root.rglob("*.png"))) == 30


def test_folder_without_marker_is_not_taken_as_a_finished_set(tmp_path, synthetic_root):
    make_folder(tmp_path / "half")
    with pytest.raises(DataError, match=f"half: exists but has no {data.SYNTHETIC_MARKER}"):
        data.ensure_synthetic(tmp_path / "half")
    with pytest.raises(DataError, match="holds a synthetic set made with"):
        data.ensure_synthetic(synthetic_root, seed=3, n_train=41, n_val=20)
    marker = synthetic_root / data.SYNTHETIC_MARKER
    made = json.loads(marker.read_text())
    try:  # a set of another version of the generator: its images are not this version's
        marker.write_text(json.dumps(dict(made, version=made["version"] - 1)))
        with pytest.raises(DataError, match="delete the folder and it is made again"):
            data.ensure_synthetic(synthetic_root, seed=3, n_train=40, n_val=20)
    finally:
        marker.write_text(json.dumps(made, indent=1))

# ----------------------------------------------------------------------------- minival split


def test_minival_split_is_deterministic_disjoint_complete_and_stratified():
    labels = torch.arange(1000) % 4
    train, minival = data.split_minival(1000, 0.1, seed=7, labels=labels)
    assert (train, minival) == data.split_minival(1000, 0.1, seed=7, labels=labels)
    assert minival != data.split_minival(1000, 0.1, seed=8, labels=labels)[1]
    assert set(train).isdisjoint(minival) and sorted(train + minival) == list(range(1000))
    assert torch.bincount(labels[minival]).tolist() == [25] * 4
    assert all(isinstance(i, int) for i in minival)
    assert len(data.split_minival(200, 0.05, seed=0)[1]) == 10

# ----------------------------------------------------------------------------- transforms


def random_image(height, width, seed=0):
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("crop", ["translate", "random_resized", "centre"])
def test_transform_shape_dtype_and_reproducibility(crop):
    transform = data.Transform(24, ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), crop=crop, hflip=True)
    image = random_image(40, 30)

    def run(seed):
        return transform(image, torch.Generator().manual_seed(seed))

    out = run(1)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert torch.equal(out, run(1))
    assert crop == "centre" or any(not torch.equal(out, run(seed)) for seed in range(2, 6))


def test_centre_crop_and_normalisation_values():
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    image[:, 2:6, 2:6] = 255
    out = data.Transform(4, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), resize=8)(image)
    assert torch.allclose(out, torch.ones(3, 4, 4))  # keeps the bright centre; (1 - 0.5) / 0.5
    same_size = data.Transform(8, ((0.0,) * 3, (1.0,) * 3))(image)
    assert torch.allclose(same_size * 255, image.float())  # 32 px eval of 32 px images: no-op


def test_translate_shifts_content_by_at_most_pad():
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    image[:, 7, 7] = 255
    shift = data.Transform(16, ((0.0,) * 3, (1 / 255,) * 3), "translate", pad=3)  # output in 0..255
    for seed in range(10):
        out = shift(image, torch.Generator().manual_seed(seed))
        y, x = divmod(int(out[0].argmax()), 16)
        assert abs(y - 7) <= 3 and abs(x - 7) <= 3 and torch.isclose(out[0].max(), torch.tensor(255.0))

# ----------------------------------------------------------------------------- mixup / cutmix


def test_label_smoothing_without_mixing():
    images = torch.randn(4, 3, 8, 8)
    out, soft = data.mix_batch(images, torch.tensor([0, 1, 2, 3]), 5, 0.0, 0.0, 0.1, torch.Generator())
    assert out is images
    assert torch.allclose(soft.sum(1), torch.ones(4)) and torch.isclose(soft[2, 2], torch.tensor(0.92))


def test_mixup_mixes_each_image_with_its_mirror():
    images, targets = torch.randn(6, 3, 8, 8), torch.arange(6)
    out, soft = data.mix_batch(images, targets, 6, 0.8, 0.0, 0.0, torch.Generator().manual_seed(0))
    lam = soft[0, 0]
    assert torch.allclose(soft.sum(1), torch.ones(6)) and torch.isclose(soft[0, 5], 1 - lam)
    assert torch.allclose(out, lam * images + (1 - lam) * images.flip(0), atol=1e-6)


def test_cutmix_pastes_a_box_whose_area_matches_the_targets():
    images, targets = torch.randn(4, 3, 16, 16), torch.arange(4)
    for seed in range(5):
        out, soft = data.mix_batch(images, targets, 4, 0.0, 1.0, 0.0, torch.Generator().manual_seed(seed))
        from_partner = (out == images.flip(0)) & (out != images)
        assert torch.equal(from_partner | (out == images), torch.ones_like(out, dtype=torch.bool))
        assert torch.allclose(soft.sum(1), torch.ones(4))
        assert torch.isclose(from_partner[0, 0].float().mean(), soft[0, 3], atol=1e-6)

# ----------------------------------------------------------------------------- loaders


def test_loaders_split_shapes_and_reproducibility(synthetic_root):
    dataset = data.load_dataset(synthetic_root)
    loaders = data.build_loaders(dataset, 32, 8, seed=1, minival_fraction=0.25)
    assert len(loaders.minival_indices) == 10 and len(loaders.train) == 30 // 8 and len(loaders.val) == 3
    images, labels = next(iter(loaders.train))
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.int64
    with_workers = data.build_loaders(dataset, 32, 8, seed=1, minival_fraction=0.25, num_workers=2)
    assert torch.equal(next(iter(with_workers.train))[0], images)  # workers don't change the draws
    loaders.train.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loaders.train))[0], images)
    val_labels = torch.cat([labels for _, labels in loaders.val])
    assert torch.equal(val_labels, dataset.val.labels)


def test_sharding_gives_disjoint_evaluation_and_equal_training_shares():
    evaluation = [list(data.ShardedSampler(10, False, 0, rank, 3)) for rank in range(3)]
    assert sorted(p for shard in evaluation for p, _ in shard) == list(range(10))
    training = [[p for p, _ in data.ShardedSampler(10, True, 0, rank, 3)] for rank in range(3)]
    assert [len(shard) for shard in training] == [4, 4, 4]
    assert set(p for shard in training for p in shard) == set(range(10))
    resumed = data.ShardedSampler(10, True, 0, 1, 3)
    resumed.set_epoch(0, skip=3)  # a run resumed after 3 of this rank's items
    assert [p for p, _ in resumed] == training[1][3:]
