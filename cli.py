"""What the scripts share besides the model: one flag per config field, --resume's checks, atomic
file writes, reading a subnet, opening a supernet checkpoint (ours or an official one), recognising
the data set a checkpoint was trained on, and the evaluation data with its progress line.

Plumbing, not part of the algorithm: train.py, search.py and autoformer.py import it so that each
of them can stay about its one idea.
"""
import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch

import data
from supernet import PUBLISHED, SPACES, CheckpointError, Subnet, Supernet, load_weights, sharing_of, space_of

# ----------------------------------------------------------------------------- command lines


def config_parser(config_class, description):
    """A command line with one flag per field of a config dataclass: --batch-size for batch_size, of
    the field's type and default, with the help and the choices of its metadata; booleans are
    switches."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # --epoch 3 is a mistake, not --epochs 3
    for f in dataclasses.fields(config_class):
        flag, text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type is bool:
            p.add_argument(flag, action="store_true", help=text)
        else:
            p.add_argument(flag, type=f.type, default=f.default, choices=f.metadata.get("choices"),
                           help=text + (" (default: %(default)s)" if f.default != "" else ""))
    return p


def parse_config(config_class, argv, description):
    """(config, the names of the flags typed on the command line), from config_parser's command line.
    A flag typed with its default value counts as typed, so that --resume can tell `--epochs 20` from
    no --epochs at all."""
    parser = config_parser(config_class, description)
    unset = object()  # argparse fills in a default only where the namespace has no value yet
    fields = {f.name: f.default for f in dataclasses.fields(config_class)}
    args = vars(parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(fields, unset))))
    typed = frozenset(name for name, value in args.items() if value is not unset)
    return config_class(**{name: fields[name] if value is unset else value for name, value in args.items()}), typed


def refuse_changed_settings(given, recorded, typed, path):
    """--resume continues a run with its recorded settings: a typed flag (`typed`: field names) whose
    value differs from the run's is an error, not silently dropped."""
    def shown(config, name):
        value = getattr(config, name)
        return "''" if value == "" else value

    changed = [f"--{f.name.replace('_', '-')} {shown(given, f.name)} (the run has {shown(recorded, f.name)})"
               for f in dataclasses.fields(given) if f.name in typed
               and getattr(given, f.name) != getattr(recorded, f.name)]
    if changed:
        raise ValueError(f"{path}: --resume continues the run with its recorded settings, but {', '.join(changed)}: "
                         "drop the flag, or start afresh in another --out")


# ----------------------------------------------------------------------------- files


def write_atomic(path, contents):
    """Write a file so that a crash at any moment leaves the old file or the new one, never a torn
    one: into a temporary file beside it, flushed to disk, then renamed over it. `contents` is text,
    or a function that writes into the binary file it is given (`lambda f: torch.save(obj, f)`).
    Creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # two processes writing one file: each its own
    try:
        with open(tmp, "wb") as f:
            if isinstance(contents, str):
                f.write(contents.encode())
            else:
                contents(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left where writing failed

# ----------------------------------------------------------------------------- subnets and checkpoints


def read_subnet(text):
    """(space name or None, Subnet) from a published name (autoformer-t/s/b) or a Subnet JSON file."""
    if text.lower() in PUBLISHED:
        return PUBLISHED[text.lower()]
    if not Path(text).is_file():
        raise ValueError(f"--subnet {text}: neither a file nor one of {', '.join(PUBLISHED)}")
    try:
        return None, Subnet.from_json(Path(text).read_text())
    except (TypeError, ValueError) as e:
        raise ValueError(f"{text}: {e}; expected a subnet, e.g. "
                         '{"embed_dim": 64, "mlp_ratios": [2.0, 4.0], "num_heads": [2, 2]}') from None


def is_official(checkpoint):
    """An official AutoFormer file (supernet-tiny.pth, ...) records no space, ours always do."""
    return "space" not in checkpoint


def checkpoint_space(checkpoint, path, space_name=""):
    """The search space of a supernet checkpoint that load_checkpoint read: ours records it; an
    official one records none, and `space_name` (--space) names it."""
    if not is_official(checkpoint):
        return space_of(checkpoint, path)
    if not space_name:
        raise CheckpointError(f"{path}: records no search space (an official checkpoint?): name it with --space "
                              f"{'|'.join(name for name, _ in PUBLISHED.values())}")
    if space_name not in SPACES:
        raise ValueError(f"--space {space_name}: choose one of {', '.join(SPACES)}")
    return SPACES[space_name]


def open_supernet(checkpoint, path, space_name="", drop_path=0.0):
    """The Supernet of a checkpoint that load_checkpoint read, its weights loaded, in the space of
    checkpoint_space and the sharing it records (official files: entangled). Weights that do not fit
    it are refused naming the first key and shape that differ, and for an official checkpoint the
    space whose shapes they have, if any."""
    space = checkpoint_space(checkpoint, path, space_name)
    if is_official(checkpoint):
        fits = spaces_of_shapes(checkpoint["model"])
        if space_name not in fits:
            hint = f"not a supernet of --space {space_name}"
            hint += f"; its shapes are those of --space {' or '.join(fits)}" if fits else ""
            with torch.device("meta"):  # raises, naming the first key and shape that differ; nothing allocated
                load_weights(Supernet(space), checkpoint["model"], path, hint)
    return load_weights(Supernet(space, drop_path, sharing_of(checkpoint, path)), checkpoint["model"], path)


def refuse_official_flags(checkpoint, path, flags):
    """Flags that only an official checkpoint needs ({"--space": value, ...}) are an error with ours,
    which records its space and its data, rather than silently ignored."""
    given = [flag for flag, value in flags.items() if value]
    if given and not is_official(checkpoint):
        raise ValueError(f"{path} records its space and data set (train.py wrote it): {', '.join(given)} "
                         f"{'is' if len(given) == 1 else 'are'} for official checkpoints only")


def spaces_of_shapes(state_dict):
    """The names of the spaces whose entangled supernet, the official files' kind, has exactly these
    keys and shapes."""
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        return [name for name, space in SPACES.items() if shapes == {
            key: tuple(value.shape) for key, value in Supernet(space, sharing="entangled").state_dict().items()}]


# ----------------------------------------------------------------------------- data sets


def dataset_record(dataset):
    """What a train.py checkpoint records of its data set (besides its folder and held-out split),
    for check_trained_on to recognise it by."""
    return {"class_names": dataset.class_names, "train_images": len(dataset.train)}


def check_trained_on(dataset, folder, checkpoint, path):
    """Raise DataError unless `dataset`, read from `folder`, is the one checkpoint `path` was trained
    on: its held-out split is a list of train image indices and its labels are positions in the
    class list, so another data set would be read silently wrong. A checkpoint without that record
    is checked by its model's class count and its largest held-out index."""
    record, names, train = checkpoint["data"], dataset.class_names, len(dataset.train)
    classes, held_out = space_of(checkpoint, path).num_classes, record["minival"]["indices"]
    recorded_names = record.get("class_names", names)
    if len(names) != classes:
        mismatch = f"{len(names)} classes, but the model of {path} has {classes}"
    elif recorded_names != names:
        i = next(i for i, (a, b) in enumerate(zip(recorded_names, names)) if a != b)
        mismatch = f"class {i} is {names[i]!r}, but {path} was trained with {recorded_names[i]!r} there"
    elif record.get("train_images", train) != train:
        mismatch = f"{train} train images, but {path} was trained on {record['train_images']}"
    elif max(held_out, default=-1) >= train:
        mismatch = f"{train} train images, but {path} records held-out train image index {max(held_out)}"
    else:
        return
    raise data.DataError(f"{folder}: {mismatch}: not the data set it was trained on")


def recorded_dataset(checkpoint, path, root=None):
    """The data set a train.py checkpoint records, its files listed (nothing decoded) and checked by
    check_trained_on. `root` overrides the recorded data folder."""
    record = checkpoint.get("data")
    if not isinstance(record, dict) or "minival" not in record:
        raise CheckpointError(f"{path}: records no data set and held-out split: not written by train.py?")
    folder = root or record["root"]
    if not root and not Path(folder).is_dir():
        raise data.DataError(f"{path} was trained on {folder}, which is gone: if the data set moved, name its "
                             "folder with --data")
    dataset = data.load_dataset(folder, verify=False)  # decode only what is used
    check_trained_on(dataset, folder, checkpoint, path)
    return dataset


def load_split(checkpoint, path, split, root=None):
    """The "minival" or "val" split of the data set a train.py checkpoint records, decoded once
    into one (images, labels) pair of tensors. `root` overrides the recorded data folder."""
    dataset, record = recorded_dataset(checkpoint, path, root), checkpoint["data"]
    loaders = data.build_loaders(dataset, record["img_size"], 500, minival_indices=record["minival"]["indices"],
                                 rank=0, world_size=1)
    images, labels = zip(*getattr(loaders, split))
    return torch.cat(images), torch.cat(labels)


# ----------------------------------------------------------------------------- evaluation data


def official_split(root, split, space, path):
    """(class names, ImageList) of the image folder ROOT/split (split "" : ROOT itself) for an official
    checkpoint, which records no data set: ImageNet's layout, one folder per class, as many classes
    as the model has, numbered in the sorted order of their names (the released models' labels)."""
    if not root:
        raise data.DataError(f"{path}: an official checkpoint records no data set: name ImageNet's folder "
                             "(train/, val/, a folder per class in each) with --data")
    folder = Path(root) / split
    names, images = data.read_split(folder)
    if len(names) != space.num_classes:
        raise data.DataError(f"{folder}: {len(names)} classes, but the model of {path} has {space.num_classes}")
    return names, images


def val_batches(checkpoint, path, space, root, batch_size, workers, device):
    """The val split that a supernet checkpoint is evaluated on, in order, as (images, labels)
    batches on `device`, with a progress line: the data set a train.py checkpoint records (`root`:
    its folder, if it moved), or ImageNet's val folder under `root` for an official checkpoint.
    `workers` processes decode and crop (uint8), normalise_batches does the rest on the device."""
    if is_official(checkpoint):
        images, kind = official_split(root, "val", space, path)[1], "folder"
    else:
        dataset = recorded_dataset(checkpoint, path, root)
        images, kind = dataset.val, dataset.kind
    crop = data.evaluation_transform(kind, space.img_size, normalised=False)
    workers = workers if images.pixels is None else 0  # decoded already: a worker's start costs more than the crop
    loader = data.make_loader(images, None, crop, batch_size, workers)
    return data.normalise_batches(progress(loader, len(images), "val"), data.NORMALISATION[kind], device)


def decode_crops(images, indices, size, batch_size, workers):
    """data.Crops of images[indices] through the evaluation transform of image folders, decoded
    once in `workers` processes, into one preallocated uint8 tensor."""
    loader = data.make_loader(images, indices, data.evaluation_transform("folder", size, normalised=False),
                              batch_size, workers)
    pixels, labels, done = torch.empty(len(indices), 3, size, size, dtype=torch.uint8), [], 0
    for batch, batch_labels in progress(loader, len(indices), "decoding"):
        pixels[done:done + len(batch)] = batch  # (B, 3, S, S) uint8
        labels.append(batch_labels)
        done += len(batch)
    return data.Crops(pixels, torch.cat(labels), data.NORMALISATION["folder"])


def progress(batches, total, what, every=10.0):
    """Yield the (images, labels) batches; print a line at most every `every` seconds and after the
    last: images done of `total`, images/s (what consumes the batches included), elapsed, ETA."""
    start = last = time.perf_counter()
    done = 0
    for batch in batches:
        yield batch
        done += len(batch[1])
        now = time.perf_counter()
        if now - last >= every or done == total:
            rate = done / (now - start)
            print(f"{what}: {done}/{total} images  {rate:.1f} images/s  elapsed {clock(now - start)}  "
                  f"eta {clock((total - done) / rate)}", flush=True)
            last = now


def clock(seconds):
    """m:ss, or h:mm:ss from an hour on."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
