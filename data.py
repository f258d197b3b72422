"""Data: the built-in synthetic set, readers for image folders and CIFAR pickles, up-front
validation, the minival split, augmentation in plain torch, the evaluation transform of the
released AutoFormers, Mixup/CutMix, and the loaders.

Every source becomes a `DataSet`: class names, a train and a val `ImageList`, each one uint8
tensor (N, 3, H, W) decoded once (CIFAR, the built-in set, small folders of equal-size images)
or files decoded each epoch by the loader's workers (ImageNet-sized sets). The sampler hands
out each draw's augmentation seed, so runs reproduce whatever the number of workers. Use:
    dataset = load_dataset(args.data or ensure_synthetic("data/synthetic"))  # DataError if bad
    loaders = build_loaders(dataset, image_size=32, batch_size=128, seed=0)
    loaders.train.sampler.set_epoch(epoch)  # before each epoch, then mix_batch on each batch
"""
import json
import math
import os
import pickle
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image


class DataError(ValueError):
    """Bad input data; the message names the file or folder and what was expected there."""


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IN_MEMORY_BYTES = 1 << 30  # decode a split once when its uint8 pixels fit in this
NORMALISATION = {  # (mean, std) per channel, for pixels scaled to [0, 1]
    "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "synthetic": ((0.303, 0.296, 0.294), (0.187, 0.172, 0.176)),  # measured on the 10k train set
}

# ----------------------------------------------------------------------------- built-in set

SYNTHETIC_MARKER = "synthetic.json"  # written last: a folder without it is not a finished set
SYNTHETIC_CLASSES = ("red_left_of_blue", "blue_left_of_red", "red_above_blue", "blue_above_red",
                     "2_same_colour", "2_diff_colour", "3_in_a_line", "3_in_a_triangle",
                     "4_squares", "5_squares")
SIZE, SIDE, MARGIN, NOISE = 32, 5, 5, 6.0  # image, square and plus-sign size, key-square margin
RED, BLUE = (220, 40, 40), (40, 70, 230)
OTHER_COLOURS = ((40, 200, 60), (235, 220, 50), (235, 235, 235), (50, 210, 220), (215, 60, 215),
                 (245, 140, 30))


def _random_boxes(rng, count, boxes, margin, gap=2):
    """`count` squares (top, left, side) that keep `gap` px from each other and from `boxes`."""
    placed, tries = [], 0
    while len(placed) < count:
        tries += 1
        if tries % 200 == 0:  # greedy placement boxed itself in: start over
            placed = []
        y, x = (int(v) for v in rng.integers(margin, SIZE - margin - SIDE + 1, 2))
        if all(y >= by + bs + gap or by >= y + SIDE + gap or x >= bx + bs + gap or bx >= x + SIDE + gap
               for by, bx, bs in boxes + placed):
            placed.append((y, x, SIDE))
    return placed


def _centre(box):
    return np.array([box[0] + box[2] / 2, box[1] + box[2] / 2])


def _key_squares(name, rng):
    """The squares that decide the class, as [((top, left, side), colour), ...]."""
    def others(k, replace=True):
        return [OTHER_COLOURS[i] for i in rng.choice(len(OTHER_COLOURS), k, replace=replace)]

    if name in SYNTHETIC_CLASSES[:4]:
        horizontal, sign = "left" in name, 1 if name.startswith("red") else -1
        while True:
            red, blue = _random_boxes(rng, 2, [], MARGIN)
            dy, dx = _centre(blue) - _centre(red)
            along, across = (dx, dy) if horizontal else (dy, dx)
            if sign * along >= abs(across) + 6:  # the direction is unambiguous by a margin
                break
        return [(red, RED), (blue, BLUE)]
    if name == "3_in_a_line":
        while True:
            dy, dx = ((0, 1), (1, 0), (1, 1), (1, -1))[rng.integers(4)]
            step = int(rng.integers(SIDE + 2, 9))
            top, left = rng.integers(MARGIN, SIZE - MARGIN - SIDE + 1, 2)
            boxes = [(int(top + k * step * dy), int(left + k * step * dx), SIDE) for k in range(3)]
            if all(MARGIN <= v <= SIZE - MARGIN - SIDE for box in boxes for v in box[:2]):
                return list(zip(boxes, others(3)))
    count = int(name[0])
    while True:
        boxes = _random_boxes(rng, count, [], MARGIN)
        if name != "3_in_a_triangle":
            break
        a, b, c = (_centre(box) for box in boxes)
        twice_area = abs((b - a)[0] * (c - a)[1] - (b - a)[1] * (c - a)[0])
        longest = max(np.linalg.norm(b - a), np.linalg.norm(c - a), np.linalg.norm(c - b))
        if twice_area / longest >= 6:  # triangle height >= 6 px: clearly not a line
            break
    colours = {"2_same_colour": others(1) * 2, "2_diff_colour": others(2, replace=False)}
    return list(zip(boxes, colours.get(name) or others(count)))


def synthetic_image(label, rng):
    """One (32, 32, 3) uint8 image of class SYNTHETIC_CLASSES[label], drawn with `rng`.

    A background (random colour and colour ramp, Gaussian pixel noise of std NOISE) holds filled
    5 px "key" squares and 0-2 distractor plus signs of any colour, red and blue included.
    The key squares alone decide the class:
      red_left_of_blue, blue_left_of_red, red_above_blue, blue_above_red: a red and a blue
        square; the class is the direction from red to blue, which beats the other axis by 6 px.
      2_same_colour / 2_diff_colour: two squares of one colour / of two different colours.
      3_in_a_line: three equally spaced squares along a row, column or diagonal.
      3_in_a_triangle: three squares whose triangle is at least 6 px high.
      4_squares / 5_squares: four / five squares anywhere.
    Squares of classes 4-9 are neither red nor blue. No local cue decides: the model must tell
    squares from plus signs, bind colours to positions across the image, count, and test
    collinearity. Key squares stay 5 px inside the border, so translating by the 4 px pad-and-crop
    never cuts or duplicates them. The classes are NOT flip-invariant (a horizontal flip turns
    red_left_of_blue into blue_left_of_red), so the built-in set is trained without flips."""
    ramp = np.linspace(0, 1, SIZE)
    base, down, across = rng.uniform(20, 120, 3), rng.uniform(-40, 40, 3), rng.uniform(-40, 40, 3)
    image = base + ramp[:, None, None] * down + ramp[None, :, None] * across  # (32, 32, 3)
    squares = _key_squares(SYNTHETIC_CLASSES[label], rng)
    for (top, left, side), colour in squares:
        image[top:top + side, left:left + side] = np.array(colour) + rng.uniform(-20, 20, 3)
    palette = OTHER_COLOURS + (RED, BLUE)
    for top, left, _ in _random_boxes(rng, int(rng.integers(0, 3)), [b for b, _ in squares], 0, gap=1):
        colour = np.array(palette[rng.integers(len(palette))]) + rng.uniform(-20, 20, 3)
        image[top + 2, left:left + 5] = colour
        image[top:top + 5, left + 2] = colour
    image += rng.normal(0, NOISE, image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def ensure_synthetic(root, seed=0, n_train=10_000, n_val=2_000):
    """Write the built-in set as ROOT/{train,val}/<class>/*.png unless there; return ROOT. Image i
    of a split depends on (seed, split, i) only. It is written into a temporary sibling folder,
    marker last, then renamed into place: a crash never leaves a half set that looks finished."""
    root = Path(root)
    manifest = {"version": 1, "seed": seed, "n_train": n_train, "n_val": n_val,  # bump the version
                "classes": list(SYNTHETIC_CLASSES)}  # whenever synthetic_image changes
    marker = root / SYNTHETIC_MARKER
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found != manifest:
            raise DataError(f"{root}: holds a synthetic set made with {found}, not {manifest}; delete "
                            f"the folder and it is made again")
        return root
    if root.exists():
        raise DataError(f"{root}: exists but has no {SYNTHETIC_MARKER}: not a finished synthetic set")
    temporary = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        for split_id, (split, count) in enumerate((("train", n_train), ("val", n_val))):
            for name in SYNTHETIC_CLASSES:
                (temporary / split / name).mkdir(parents=True)
            for i in range(count):
                label = i % len(SYNTHETIC_CLASSES)
                image = synthetic_image(label, np.random.default_rng([seed, split_id, i]))
                Image.fromarray(image).save(temporary / split / SYNTHETIC_CLASSES[label] / f"{i:05d}.png")
        (temporary / SYNTHETIC_MARKER).write_text(json.dumps(manifest, indent=1))
        os.rename(temporary, root)
    except OSError:
        if not marker.is_file():  # else another process (say another rank) finished first
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return root

# ----------------------------------------------------------------------------- readers


@dataclass
class ImageList:
    """One split: labels plus either decoded pixels (N, 3, H, W) uint8 or image file paths."""
    labels: torch.Tensor  # (N,) int64
    pixels: torch.Tensor | None = None
    paths: list[Path] | None = None

    def __len__(self):
        return len(self.labels)

    def load(self, i):  # -> uint8 (3, H, W)
        if self.pixels is not None:
            return self.pixels[i]
        return torch.from_numpy(_decode(self.paths[i])).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


@dataclass
class DataSet:
    kind: str  # "synthetic", "folder", "cifar10" or "cifar100"
    class_names: list[str]
    train: ImageList
    val: ImageList


def load_dataset(path, verify=True):
    """Read and check the data set at `path`: a CIFAR-10/100 python folder (or one holding it),
    else an image folder PATH/{train,val}/<class>/*.png|jpg|... verify=False skips decoding every
    image up front (for ImageNet-sized sets); the structural checks still run."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: data folder does not exist")
    for folder in (path, path / "cifar-10-batches-py", path / "cifar-100-python"):
        if (folder / "batches.meta").is_file():
            return _read_cifar(folder, "cifar10")
        if (folder / "meta").is_file() and (folder / "train").is_file():
            return _read_cifar(folder, "cifar100")
    train_names, train = read_split(path / "train", verify)
    val_names, val = read_split(path / "val", verify)
    if val_names != train_names:
        only_train, only_val = sorted(set(train_names) - set(val_names)), sorted(set(val_names) - set(train_names))
        raise DataError(f"{path / 'val'}: classes differ from train: only in train {only_train}, "
                        f"only in val {only_val}")
    kind = "synthetic" if (path / SYNTHETIC_MARKER).is_file() else "folder"
    return DataSet(kind, train_names, train, val)


def read_split(folder, verify=False):
    """(class names, ImageList) of FOLDER/<class>/<images>: classes in the sorted order of their
    names, as torchvision's ImageFolder numbers them, and each class's files in sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder missing; expected {folder}/<class_name>/<images>")
    class_folders = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_folders:
        raise DataError(f"{folder}: no class folders, so no images; expected {folder}/<class_name>/<images>")
    paths, labels = [], []
    for label, class_folder in enumerate(class_folders):
        files = sorted(f for f in class_folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"{class_folder}: empty class folder; expected images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [label] * len(files)
    images = ImageList(torch.tensor(labels), paths=paths)
    if verify:
        with ThreadPoolExecutor(os.cpu_count()) as pool:  # Pillow decodes without the GIL
            sizes = list(pool.map(_decode, paths, [True] * len(paths)))
            width, height = sizes[0]
            if sizes.count(sizes[0]) == len(sizes) and len(sizes) * 3 * width * height <= IN_MEMORY_BYTES:
                pixels = np.stack(list(pool.map(_decode, paths)))  # (N, H, W, 3), to (N, 3, H, W) below
                images = ImageList(images.labels, torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())
    return [d.name for d in class_folders], images


def _decode(path, check_only=False):
    """The image as (H, W, 3) uint8; or, check_only, decode it all cheaply and return its size."""
    try:
        with Image.open(path) as image:
            if not check_only:
                return np.array(image.convert("RGB"))
            size = image.size
            image.draft("RGB", (1, 1))  # JPEG at 1/8 scale: still reads every byte, finds truncation
            image.load()
            return size
    except Exception as error:
        raise DataError(f"{path}: unreadable or corrupt image ({error})") from error


class _SafeUnpickler(pickle.Unpickler):
    """Refuses all a pickle may name but numpy arrays and plain containers: others could run code."""
    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # encode: Python 3's protocol 2 bytes
    ALLOWED |= {(m, n) for m in ("builtins", "__builtin__") for n in ("list", "dict", "tuple", "bytes", "str", "int")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(file):
    if not file.is_file():
        raise DataError(f"{file}: file missing; expected a CIFAR python pickle there")
    try:
        with open(file, "rb") as f:
            return _SafeUnpickler(f, encoding="bytes").load()
    except Exception as error:
        raise DataError(f"{file}: not a CIFAR python pickle ({error})") from error


def _read_cifar(folder, kind):
    meta, names_key, train_files, val_files, label_key = {
        "cifar10": ("batches.meta", b"label_names", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                    b"labels"),
        "cifar100": ("meta", b"fine_label_names", ["train"], ["test"], b"fine_labels")}[kind]
    names = _unpickle(folder / meta)[names_key]

    def read(files):
        pixels, labels = [], []
        for name in files:
            batch = _unpickle(folder / name)
            data, batch_labels = batch.get(b"data"), batch.get(label_key)
            if not isinstance(data, np.ndarray) or data.shape[1:] != (3072,) or len(data) != len(batch_labels or ()):
                raise DataError(f"{folder / name}: expected b'data' of shape (N, 3072) and N {label_key!r}")
            pixels.append(data.reshape(-1, 3, 32, 32))  # rows are R plane, G plane, B plane
            labels += batch_labels
        return ImageList(torch.tensor(labels), torch.from_numpy(np.concatenate(pixels)))

    return DataSet(kind, [n.decode() for n in names], read(train_files), read(val_files))

# ----------------------------------------------------------------------------- transforms


def _randint(high, generator):
    return int(torch.randint(high, (), generator=generator))


def _resize(image, height, width):
    if image.shape[1:] == (height, width):
        return image.float()
    return F.interpolate(image[None].float(), (height, width), mode="bilinear", antialias=True)[0]


def random_resized_crop(image, size, scale, ratio, generator):
    """Inception-style crop: a box of `scale` x the area and `ratio` aspect, resized to size."""
    _, height, width = image.shape
    area_draw, aspect_draw = torch.rand(2, generator=generator).tolist()
    area = height * width * (scale[0] + (scale[1] - scale[0]) * area_draw)
    aspect = ratio[0] * (ratio[1] / ratio[0]) ** aspect_draw  # log-uniform
    # a box sticking out is clipped to the image (torchvision redraws instead; nearly the same)
    w = min(max(round(math.sqrt(area * aspect)), 1), width)
    h = min(max(round(math.sqrt(area / aspect)), 1), height)
    top, left = _randint(height - h + 1, generator), _randint(width - w + 1, generator)
    return _resize(image[:, top:top + h, left:left + w], size, size)


def resize_centre_crop(image, size, resize):
    """torchvision's Resize(resize) then CenterCrop(size) of a uint8 (3, H, W) image, as DeiT and the
    released AutoFormers evaluate: the shorter side to `resize` and the longer to int(resize * long /
    short) with Pillow's bicubic filter (uint8 out), then the central size x size, its offsets
    rounded half to even as Python's round(). Returns a contiguous uint8 (3, size, size)."""
    _, height, width = image.shape
    pixels = image.permute(1, 2, 0).numpy()  # (H, W, 3)
    short, long = sorted((height, width))
    if short != resize:
        long = int(resize * long / short)
        height, width = (resize, long) if height <= width else (long, resize)
        pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC))
    top, left = round((height - size) / 2), round((width - size) / 2)
    crop = pixels[top:top + size, left:left + size].transpose(2, 0, 1)  # (3, size, size)
    return torch.from_numpy(np.ascontiguousarray(crop))


@dataclass
class Transform:
    """uint8 (3, H, W) -> normalised float (3, size, size). crop is "translate" (the built-in
    set), "random_resized" (real data) or "centre" (evaluation: see resize_centre_crop; `resize`
    0 means size); random draws use `generator`. mean_std None: the crop as it is, not normalised
    (a centre crop stays uint8: see Crops)."""
    size: int
    mean_std: tuple | None
    crop: str = "centre"
    resize: int = 0
    pad: int = 4
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    hflip: bool = False

    def __call__(self, image, generator=None):
        if self.crop == "translate":  # shift by up to pad px: reflect-pad, crop a random window
            padded = F.pad(_resize(image, self.size, self.size)[None], (self.pad,) * 4, mode="reflect")[0]
            top, left = _randint(2 * self.pad + 1, generator), _randint(2 * self.pad + 1, generator)
            image = padded[:, top:top + self.size, left:left + self.size]
        elif self.crop == "random_resized":
            image = random_resized_crop(image, self.size, self.scale, self.ratio, generator)
        else:
            image = resize_centre_crop(image, self.size, self.resize or self.size)
        if self.hflip and torch.rand((), generator=generator) < 0.5:
            image = image.flip(-1)
        if self.mean_std is None:
            return image
        return normalise(image, self.mean_std)


def normalise(images, mean_std):
    """Pixels (..., 3, H, W) in 0..255, uint8 or float, to float scaled to [0, 1] and normalised per channel."""
    mean, std = (torch.tensor(v, device=images.device).view(3, 1, 1) for v in mean_std)  # (3,) -> (3, 1, 1)
    return (images / 255 - mean) / std


def normalise_batches(batches, mean_std, device=None, dtype=torch.float32):
    """uint8 (images, labels) batches, moved to `device` (default: where they are) and normalised
    there a whole batch at a time, in `dtype`. Evaluation crops stay uint8 until here: a quarter
    of float32's bytes between the loader's processes and to the GPU, and one large operation per
    batch instead of one small one per image in the main process (bench.py --only loader)."""
    for images, labels in batches:
        yield normalise(images.to(device, non_blocking=True), mean_std).to(dtype), labels


def evaluation_transform(kind, size, normalised=True):
    """The evaluation transform of a data set kind: image folders, whatever their size, as DeiT and the
    released AutoFormers (ImageNet): the shorter side to int(256 / 224 * size), then the central
    size x size; CIFAR and the built-in set as they are. normalised=False: the uint8 crop (see Crops)."""
    resize = int(256 / 224 * size) if kind == "folder" else size
    return Transform(size, NORMALISATION[kind] if normalised else None, resize=resize)


@dataclass
class Crops:
    """An evaluation split decoded and cropped once, kept as uint8: a quarter of float32's memory
    (the 100,000 images of the official search's fitness set take 15 GB at 224 px). The crop of
    the protocol is uint8 before normalisation, so nothing is lost; `batches` normalises as it
    reads, with the same arithmetic as Transform."""
    pixels: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64
    mean_std: tuple

    def __len__(self):
        return len(self.labels)

    def to(self, device):
        return Crops(self.pixels.to(device), self.labels.to(device), self.mean_std)

    def batches(self, batch_size, dtype=torch.float32):
        """(images (B, 3, S, S) normalised, in `dtype`, labels (B,)) batches, in order."""
        return normalise_batches(zip(self.pixels.split(batch_size), self.labels.split(batch_size)), self.mean_std,
                                 dtype=dtype)


def mix_batch(images, targets, num_classes, mixup_alpha, cutmix_alpha, label_smoothing, generator):
    """DeiT's Mixup/CutMix and label smoothing: returns (images, soft targets, rows sum to 1).
    One mix per batch, sample i with sample B-1-i; with both alphas > 0 a coin picks which."""
    off = label_smoothing / num_classes
    soft = torch.full((len(targets), num_classes), off, device=targets.device)
    soft.scatter_(1, targets[:, None], 1 - label_smoothing + off)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, soft
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand((), generator=generator) < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    # torch's Beta sampler takes no generator; a numpy one seeded from it keeps runs reproducible
    lam = float(np.random.default_rng(_randint(2**62, generator)).beta(alpha, alpha))
    partner = images.flip(0)
    if use_cutmix:
        height, width = images.shape[-2:]
        cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        centre_y, centre_x = _randint(height, generator), _randint(width, generator)
        top, bottom = max(centre_y - cut_h // 2, 0), min(centre_y + cut_h // 2, height)
        left, right = max(centre_x - cut_w // 2, 0), min(centre_x + cut_w // 2, width)
        images = images.clone()
        images[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (height * width)  # the box clipped at the border
    else:
        images = images * lam + partner * (1 - lam)
    return images, soft * lam + soft.flip(0) * (1 - lam)

# ----------------------------------------------------------------------------- loaders


def split_minival(num_items, fraction, seed, labels=None):
    """Split range(num_items) into sorted (train_indices, minival_indices) lists, deterministic
    in `seed`. Given `labels`, every class gives the same fraction (at least one if it has two)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(num_items, dtype=torch.long) if labels is None else torch.as_tensor(labels)
    minival = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        count = round(fraction * len(members)) or int(fraction > 0 and len(members) > 1)
        minival += members[torch.randperm(len(members), generator=generator)[:count]].tolist()
    taken = set(minival)
    return [i for i in range(num_items) if i not in taken], sorted(minival)


def draw_per_class(images, per_class, seed):
    """Sorted indices of `per_class` images of each class of an ImageList read by read_split, drawn
    as the official code drew its search's fitness set (lib/subImageNet.py): one random.Random(seed)
    for all, each class in turn in sorted order, random.sample of its files in sorted order."""
    rng, chosen, start = random.Random(seed), [], 0
    for count in torch.bincount(images.labels).tolist():  # read_split lists each class's files in one run
        if count < per_class:
            raise DataError(f"{images.paths[start].parent}: {count} images, fewer than the {per_class} per class "
                            "to draw")
        chosen += sorted(rng.sample(range(start, start + count), per_class))
        start += count
    return chosen


class ShardedSampler(torch.utils.data.Sampler):
    """(position, augmentation seed) pairs for this rank, from (seed, epoch) only. Training order
    is shuffled and wrapped so ranks get equal shares; evaluation lists each item exactly once."""

    def __init__(self, num_items, train, seed, rank, world_size):
        self.num_items, self.train, self.seed, self.rank, self.world_size = num_items, train, seed, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        """Iterate `epoch`, leaving out this rank's first `skip` items (a run resumed mid-epoch)."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        mixed_seed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]  # decorrelates epochs
        generator = torch.Generator().manual_seed(int(mixed_seed))
        order = torch.randperm(self.num_items, generator=generator) if self.train else torch.arange(self.num_items)
        draw_seeds = torch.randint(2**62, (self.num_items,), generator=generator)
        if self.train:
            order = order.repeat(2)[:len(self) * self.world_size]  # (ceil(N / world) * world,)
        positions = order[self.rank::self.world_size][self.skip:]
        return iter(zip(positions.tolist(), draw_seeds[positions].tolist()))

    def __len__(self):
        if self.train:
            return math.ceil(self.num_items / self.world_size)
        return len(range(self.rank, self.num_items, self.world_size))


class _Subset(torch.utils.data.Dataset):
    def __init__(self, images, indices, transform):
        self.images, self.indices, self.transform = images, indices, transform

    def __getitem__(self, position_and_seed):
        position, draw_seed = position_and_seed
        index = self.indices[position]
        image = self.transform(self.images.load(index), torch.Generator().manual_seed(draw_seed))
        return image, self.images.labels[index]


@dataclass
class Loaders:
    train: torch.utils.data.DataLoader  # call train.sampler.set_epoch(epoch) before each epoch
    minival: torch.utils.data.DataLoader  # held-out train images: search ranks subnets on these
    val: torch.utils.data.DataLoader  # the final report only
    minival_indices: list[int]  # into dataset.train; record them in the checkpoint


def build_loaders(dataset, image_size, batch_size, *, seed=0, minival_fraction=0.05,
                  minival_indices=None, num_workers=0, eval_batch_size=None, hflip=True,
                  scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), rank=None, world_size=None):
    """Train / minival / val loaders of (images (B, 3, S, S) float, labels (B,) int64).
    Minival is split_minival(len(train), minival_fraction, seed, labels) unless minival_indices
    (say, from a checkpoint) is given. rank / world_size default to torch.distributed's.
    Evaluation shards are disjoint and may differ by one item: sum counts across ranks. The
    built-in set trains with translation only (it is not flip-invariant), real data with
    random-resized crops and `hflip`; evaluation is evaluation_transform's."""
    if rank is None:
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if minival_indices is None:
        _, minival_indices = split_minival(len(dataset.train), minival_fraction, seed, dataset.train.labels)
    minival_set = set(minival_indices)
    train_indices = [i for i in range(len(dataset.train)) if i not in minival_set]
    mean_std = NORMALISATION[dataset.kind]
    evaluate = evaluation_transform(dataset.kind, image_size)
    augment = Transform(image_size, mean_std, "random_resized", scale=scale, ratio=ratio, hflip=hflip)
    if dataset.kind == "synthetic":
        augment = Transform(image_size, mean_std, "translate")

    def loader(images, indices, transform, train):
        return make_loader(images, indices, transform, batch_size if train else eval_batch_size or batch_size,
                           num_workers, train, seed, rank, world_size)

    return Loaders(loader(dataset.train, train_indices, augment, True),
                   loader(dataset.train, minival_indices, evaluate, False),
                   loader(dataset.val, list(range(len(dataset.val))), evaluate, False), minival_indices)


def make_loader(images, indices, transform, batch_size, num_workers=0, train=False, seed=0, rank=0, world_size=1):
    """A DataLoader of (transform(image), label) batches of images[indices] (None: all of them),
    decoded in `num_workers` processes: shuffled and wrapped for training (see ShardedSampler),
    in order for evaluation."""
    indices = range(len(images)) if indices is None else indices
    sampler = ShardedSampler(len(indices), train, seed, rank, world_size)
    return torch.utils.data.DataLoader(_Subset(images, indices, transform), batch_size, sampler=sampler,
                                       num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                       drop_last=train, persistent_workers=num_workers > 0)


def measure_throughput(loader, max_batches=50):
    """Images per second that `loader` delivers (the first batch, which starts workers, untimed)."""
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    count = sum(len(images) for _, (images, _) in zip(range(max_batches), batches))
    return count / (time.perf_counter() - start)
