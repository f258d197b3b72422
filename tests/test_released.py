"""The released supernets from the command line, without the real files: checkpoints in the official
format (the official key names, random weights, an argparse.Namespace under "args", torch.save, no
space recorded) and folders of JPEGs of odd sizes, run through `autoformer.py evaluate` and
`export`, `search.py` and `train.py --inherit`, each against a literal computation; the evaluation
transform against torchvision's, written out; the fitness set against the official draw; the
messages of a missing or wrong --space. A small space at 224 px with 100 classes keeps it quick; the
real tiny shapes are used where no image has to run through them."""
import argparse
import dataclasses
import json
import os
import random
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import autoformer
import data
import search
import train
from supernet import AUTOFORMER_T, SPACES, Subnet, Supernet, load_checkpoint, load_weights
from test_search import fails
from test_supernet import official_shapes

MINI = dataclasses.replace(SPACES["tiny"], embed_dims=(16, 24), mlp_ratios=(1.0, 2.0), num_heads=(1, 2),
                           depths=(1, 2), head_dim=8, patch_size=32, num_classes=100)  # 224 px, 7 x 7 patches
SUBNET = Subnet(24, [2.0, 1.0], [2, 1])
NAMES = sorted(f"n{(7919 * i) % 100_000:05d}" for i in range(100))  # ImageNet-like class folder names
SIZES = ((301, 257), (257, 301), (224, 224), (500, 375), (97, 131), (256, 300), (1000, 258), (256, 256))  # w, h
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's IMAGENET_DEFAULT_MEAN and _STD
QUICK = ["--population", "6", "--generations", "2", "--parents", "2", "--mutations", "2", "--crossovers", "2",
         "--params", ":1M", "--dtype", "fp32", "--workers", "0"]  # 18 of the 40 subnets of MINI


def save_official(path, space, seed):
    """A supernet file as the official code wrote them: its state dict under "model", the run's
    argparse.Namespace under "args", the epoch; no space, no data set."""
    torch.manual_seed(seed)
    args = argparse.Namespace(cfg="experiments/supernet/supernet-T.yaml", epochs=500, lr=5e-4, input_size=224)
    torch.save({"model": Supernet(space).state_dict(), "args": args, "epoch": 499}, path)
    return path


def write_jpeg(path, size, seed, mode="RGB"):
    """A JPEG of `size` (w, h): a smooth random colour field with pixel noise."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    pixels = np.clip(np.asarray(field, np.float32) + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).convert(mode).save(path, quality=90)
    return path


def literal(path, size=224):
    """DeiT's evaluation transform, as the released models were measured, written out: torchvision's
    Resize(int(256 / 224 * size), bicubic) (shorter side to it, longer to int(it * long / short),
    unchanged if already so), CenterCrop(size) (offsets int(round((H - size) / 2.0))), ToTensor,
    Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD). Returns (uint8 crop, normalised)."""
    image = Image.open(path).convert("RGB")  # torchvision's pil_loader
    width, height, short = *image.size, int((256 / 224) * size)
    new = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    if new != image.size:
        image = image.resize(new, Image.Resampling.BICUBIC)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    crop = np.asarray(image.crop((left, top, left + size, top + size)))  # (size, size, 3)
    pixels = crop.astype(np.float32) / 255
    normalised = (pixels - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return torch.from_numpy(crop.copy()).permute(2, 0, 1), torch.from_numpy(normalised).permute(2, 0, 1)  # (3, S, S)


def files_of(folder):
    """(paths, labels) of an image folder as torchvision's ImageFolder lists them: classes in sorted order."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    pairs = [(folder / c / name, label) for label, c in enumerate(classes) for name in sorted(os.listdir(folder / c))]
    return [p for p, _ in pairs], torch.tensor([label for _, label in pairs])


def literal_batch(paths):
    return torch.stack([literal(p)[1] for p in paths])  # (N, 3, 224, 224)


@torch.no_grad()
def scores(supernet, subnet, images, labels):
    """(top-1 %, top-5 %) of the supernet's subnet on `images`."""
    logits = supernet(images, subnet)  # (N, classes)
    found = logits.topk(5, dim=-1).indices == labels[:, None]  # (N, 5)
    return 100 * found[:, 0].float().mean().item(), 100 * found.any(-1).float().mean().item()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """An official-format supernet of MINI ("--space mini") and an ImageNet-like folder for it: 2 train
    images per class, and val images of which 60 lie in the class the subnet predicts for them (so the
    expected top-1 is far from chance, and wrong labels or a wrong transform show), plus one in each
    class that has none."""
    folder = tmp_path_factory.mktemp("released")
    official = save_official(folder / "supernet-mini.pth", MINI, seed=0)
    supernet = load_weights(Supernet(MINI), load_checkpoint(official)["model"], "test").eval()
    root = folder / "imagenet"
    for label, name in enumerate(NAMES):
        for i in range(2):
            size = SIZES[(label + i) % len(SIZES)]
            write_jpeg(root / "train" / name / f"{name}_{i}.JPEG", size, 1000 + 2 * label + i)
    staged = [write_jpeg(folder / "staged" / f"pool_{i}.JPEG", SIZES[i % len(SIZES)], i) for i in range(60)]
    with torch.no_grad():
        predicted = supernet(literal_batch(staged), SUBNET).argmax(-1).tolist()
    for path, label in zip(staged, predicted):
        (root / "val" / NAMES[label]).mkdir(parents=True, exist_ok=True)
        path.rename(root / "val" / NAMES[label] / path.name)
    for label, name in enumerate(NAMES):
        if not (root / "val" / name).is_dir():
            write_jpeg(root / "val" / name / "filler.JPEG", SIZES[label % len(SIZES)], 5000 + label,
                       "L" if label == 3 else "RGB")  # one greyscale: converted to RGB as ImageFolder does
    (folder / "subnet.json").write_text(SUBNET.to_json())
    return argparse.Namespace(official=official, supernet=supernet, root=root, subnet=folder / "subnet.json")


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """An official-format file of the real tiny space: the shapes of supernet-tiny.pth."""
    return save_official(tmp_path_factory.mktemp("tiny") / "supernet-tiny.pth", SPACES["tiny"], seed=1)


@pytest.fixture
def mini_space(monkeypatch):
    """MINI as one of the spaces, for --space mini."""
    monkeypatch.setitem(SPACES, "mini", MINI)


# ----------------------------------------------------------------------------- the protocol


def test_evaluation_transform_is_the_released_models_protocol(tmp_path):
    paths = [write_jpeg(tmp_path / "val" / f"c{i % 3}" / f"{i}.jpg", size, i, "L" if i == 4 else "RGB")
             for i, size in enumerate(SIZES)]
    _, images = data.read_split(tmp_path / "val")
    crop = data.evaluation_transform("folder", 224, normalised=False)
    transform = data.evaluation_transform("folder", 224)
    for i, path in enumerate(images.paths):
        expected_crop, expected = literal(path)
        assert torch.equal(crop(images.load(i)), expected_crop), (path, Image.open(path).size)
        assert torch.equal(transform(images.load(i)), expected), (path, Image.open(path).size)
    assert sorted(images.paths) == sorted(paths)
    # 384 px models resize to int(256 / 224 * 384) = 438, not to round(384 / 0.875) = 439
    crop_384 = data.evaluation_transform("folder", 384, normalised=False)
    assert torch.equal(crop_384(images.load(3)), literal(images.paths[3], 384)[0])


def test_classes_are_numbered_in_the_sorted_order_of_their_names(tmp_path):
    for name in ("b", "a", "B10", "B9", "A"):  # created in this order
        write_jpeg(tmp_path / name / "0.jpg", (32, 32), 0)
    names, images = data.read_split(tmp_path)
    assert names == ["A", "B10", "B9", "a", "b"] == sorted(names)  # code-point order, as ImageFolder
    assert images.labels.tolist() == [0, 1, 2, 3, 4] and [p.parent.name for p in images.paths] == names


def test_fitness_set_is_drawn_as_the_official_code_draws_it(released):
    _, train_split = data.read_split(released.root / "train")
    for seed, per_class in ((0, 1), (3, 2)):
        chosen = [str(train_split.paths[i].relative_to(released.root / "train"))
                  for i in data.draw_per_class(train_split, per_class, seed)]
        rng, official = random.Random(seed), []  # lib/subImageNet.py: random.seed(0), then per class in order
        for name in sorted(os.listdir(released.root / "train")):
            official += [f"{name}/{f}" for f in sorted(rng.sample(sorted(os.listdir(released.root / "train" / name)),
                                                                  per_class))]
        assert chosen == official
    assert data.draw_per_class(train_split, 1, 0) != data.draw_per_class(train_split, 1, 1)
    with pytest.raises(data.DataError, match=f"{released.root / 'train' / NAMES[0]}: 2 images, fewer than the 3"):
        data.draw_per_class(train_split, 3, 0)

# ----------------------------------------------------------------------------- the commands


def test_evaluate_a_released_supernet(released, capsys, mini_space):
    paths, labels = files_of(released.root / "val")
    top1, top5 = scores(released.supernet, SUBNET, literal_batch(paths), labels)
    assert top1 >= 30  # most of the images lie in the class predicted for them
    expected = f"val top-1 {top1:.2f}% on {len(paths)} images, top-5 {top5:.2f}%"
    for workers in ("0", "2"):
        autoformer.main(["evaluate", "--checkpoint", str(released.official), "--space", "mini", "--subnet",
                         str(released.subnet), "--data", str(released.root), "--batch-size", "7", "--workers", workers])
        out = capsys.readouterr().out
        assert expected in out, out
        assert re.search(rf"val: {len(paths)}/{len(paths)} images  [\d.]+ images/s  elapsed \d+:\d\d  eta 0:00", out)


def test_search_a_released_supernet(released, tmp_path, capsys, mini_space):
    run = ["--checkpoint", str(released.official), "--space", "mini", "--data", str(released.root)] + QUICK
    search.main(run + ["--fitness-per-class", "1", "--out", str(tmp_path / "drawn")])
    out = capsys.readouterr().out
    assert "100 images of" in out and "1 per class drawn with seed 0 (images the supernet was trained on)" in out
    fitness = json.loads((tmp_path / "drawn" / "fitness.json").read_text())
    rng = random.Random(0)  # the official draw, with the search's --seed
    assert fitness["files"] == [f"{c}/{rng.sample(sorted(os.listdir(released.root / 'train' / c)), 1)[0]}"
                                for c in sorted(os.listdir(released.root / "train"))]
    images = literal_batch([released.root / "train" / f for f in fitness["files"]])
    labels = torch.tensor([NAMES.index(f.split("/")[0]) for f in fitness["files"]])
    rows = [json.loads(line) for line in (tmp_path / "drawn" / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 18
    for row in rows[::3]:
        assert row["top1"] == pytest.approx(scores(released.supernet, Subnet(**row["subnet"]), images, labels)[0])
    state = json.loads((tmp_path / "drawn" / "state.json").read_text())
    best = Subnet(**state["result"]["best"]["subnet"])
    paths, labels = files_of(released.root / "val")
    val = scores(released.supernet, best, literal_batch(paths), labels)[0]
    assert state["result"]["best"]["val_top1"] == pytest.approx(val)
    assert Subnet.from_json((tmp_path / "drawn" / "best.json").read_text()) == best

    # The drawn set copied into a folder, as the official code's subImageNet: the same search.
    for f in fitness["files"]:
        (tmp_path / "sub" / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(released.root / "train" / f, tmp_path / "sub" / f)
    search.main(run + ["--fitness-data", str(tmp_path / "sub"), "--out", str(tmp_path / "folder")])
    for name in ("candidates.jsonl", "best.json", "pareto.json"):
        assert (tmp_path / "folder" / name).read_text() == (tmp_path / "drawn" / name).read_text()
    assert json.loads((tmp_path / "folder" / "fitness.json").read_text())["files"] == fitness["files"]

    # A train folder that changed since draws other images: --resume refuses to mix the two sets.
    extra = write_jpeg(released.root / "train" / NAMES[0] / "a_new.JPEG", (240, 240), 7)
    try:
        fails(search.main, run + ["--fitness-per-class", "1", "--out", str(tmp_path / "drawn"), "--resume"], capsys,
              "fitness.json: the search ranked on other images than those of")
    finally:
        extra.unlink()


def test_export_and_fine_tune_a_released_supernet(released, tmp_path, mini_space):
    autoformer.main(["export", "--checkpoint", str(released.official), "--space", "mini", "--subnet",
                     str(released.subnet), "--out", str(tmp_path / "model.pt")])
    model = autoformer.load_exported(tmp_path / "model.pt")
    images = torch.stack([literal(p)[1] for p in files_of(released.root / "val")[0][:3]])
    with torch.no_grad():
        torch.testing.assert_close(model(images), released.supernet(images, SUBNET), rtol=1e-5, atol=1e-5)
    assert model.space == MINI and model.subnet == SUBNET
    # lr 0: the weights stay the inherited ones
    train.main(["--subnet", str(released.subnet), "--inherit", str(released.official), "--space", "mini", "--data",
                str(released.root), "--out", str(tmp_path / "ft"), "--epochs", "1", "--max-steps", "1", "--batch-size",
                "8", "--lr", "0", "--min-lr", "0", "--minival", "0.1", "--workers", "0", "--dtype", "fp32"])
    tuned = load_checkpoint(tmp_path / "ft" / "ckpt.pt")["model"]
    assert all(torch.equal(tuned[k], v) for k, v in model.state_dict().items())


def test_the_paper_models_by_name_from_a_file_of_the_real_shapes(tiny_file, tmp_path, capsys):
    saved = load_checkpoint(tiny_file)
    assert isinstance(saved["args"], argparse.Namespace) and "space" not in saved
    assert {k: tuple(v.shape) for k, v in saved["model"].items()} == official_shapes(SPACES["tiny"])
    autoformer.main(["export", "--checkpoint", str(tiny_file), "--space", "tiny", "--subnet", "autoformer-t",
                     "--out", str(tmp_path / "autoformer-t.pt")])
    model = autoformer.load_exported(tmp_path / "autoformer-t.pt")
    supernet = load_weights(Supernet(SPACES["tiny"]), saved["model"], "test").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), supernet(x, AUTOFORMER_T), rtol=1e-4, atol=1e-5)
    autoformer.main(["info"])
    listing = capsys.readouterr().out
    for name, top1 in (("autoformer-t", "74.7"), ("autoformer-s", "81.7"), ("autoformer-b", "82.4")):
        assert re.search(rf"{name} .* {top1} %", listing), listing
    assert "5.868 M" in listing

# ----------------------------------------------------------------------------- bad input


def test_a_missing_or_wrong_space_is_named(tiny_file, tmp_path, capsys):
    evaluate = ["evaluate", "--checkpoint", str(tiny_file), "--subnet", "autoformer-t", "--data", str(tmp_path)]
    missing = f"{tiny_file}: records no search space (an official checkpoint?): name it with --space tiny|small|base"
    fails(autoformer.main, evaluate, capsys, missing)
    fails(search.main, ["--checkpoint", str(tiny_file), "--out", str(tmp_path / "s")], capsys, missing)
    fails(autoformer.main, evaluate + ["--space", "small"], capsys, f"{tiny_file}: cls_token has shape (1, 1, 256), "
          "this Supernet needs (1, 1, 448): not a supernet of --space small; its shapes are those of --space tiny")
    fails(autoformer.main, evaluate + ["--space", "base"], capsys, "cls_token has shape (1, 1, 256), this Supernet "
          "needs (1, 1, 640)")
    fails(autoformer.main, evaluate + ["--space", "huge"], capsys, "--space huge: choose one of tiny, small, base, cpu")
    fails(autoformer.main, evaluate[:-2] + ["--space", "tiny"], capsys,
          "an official checkpoint records no data set: name ImageNet's folder")
    for split in ("train", "val"):
        write_jpeg(tmp_path / "one" / split / "a" / "0.jpg", (32, 32), 0)
    fails(train.main, ["--subnet", "autoformer-t", "--inherit", str(tiny_file), "--data", str(tmp_path / "one"),
                       "--out", str(tmp_path / "t")],
          capsys, "needs (1, 1, 128): not a supernet of --space cpu; its shapes are those of --space tiny")


def test_flags_of_official_checkpoints_are_refused_with_ours_and_wrong_folders_named(released, tmp_path, capsys,
                                                                                       mini_space):
    ours = tmp_path / "ours.pt"
    torch.save({"model": released.supernet.state_dict(), "space": dataclasses.asdict(MINI)}, ours)
    fails(autoformer.main, ["evaluate", "--checkpoint", str(ours), "--space", "mini", "--subnet", str(released.subnet)],
          capsys, f"{ours} records its space and data set (train.py wrote it): --space is for official checkpoints")
    fails(search.main, ["--checkpoint", str(ours), "--fitness-data", str(tmp_path), "--fitness-per-class", "5"],
          capsys, "--fitness-data, --fitness-per-class are for official checkpoints only")
    for name in NAMES[:3]:
        write_jpeg(tmp_path / "three" / "val" / name / "0.jpg", (64, 64), 0)
    evaluate = ["evaluate", "--checkpoint", str(released.official), "--space", "mini", "--subnet", str(released.subnet),
                "--workers", "0"]
    fails(autoformer.main, evaluate + ["--data", str(tmp_path / "three")], capsys,
          f"{tmp_path / 'three' / 'val'}: 3 classes, but the model of {released.official} has 100")
    run = ["--checkpoint", str(released.official), "--space", "mini", "--data", str(released.root)] + QUICK
    fails(search.main, run + ["--fitness-per-class", "3", "--out", str(tmp_path / "s")], capsys,
          "2 images, fewer than the 3 per class to draw")
    fails(search.main, run + ["--fitness-per-class", "0", "--out", str(tmp_path / "s")], capsys,
          "--fitness-per-class 0: expected at least 1")
    renamed = tmp_path / "renamed"
    for i, name in enumerate(NAMES[:-1] + ["zebra"]):
        write_jpeg(renamed / name / "0.jpg", (64, 64), i)
    fails(search.main, run + ["--fitness-data", str(renamed), "--out", str(tmp_path / "s")], capsys,
          f"{renamed}: class 99 is 'zebra', but in {released.root / 'val'} it is {NAMES[99]!r}")
