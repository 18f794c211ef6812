"""Prepare everything a device needs before it can forget: an int8 base model, its samples, a
similar-label table and a manifest.

    python tools/train_base.py --out DIR [--dataset digits|mnist1d|mnist5k | --data FILE.npz | --images DIR]
        [--model M.tflite] [--owners 20] [--validation 0.1] [--arch A] [--epochs E] [--seed 0]

1. loads the data: a built-in dataset (``edge_qmul.datasets``), an .npz with ``x``, ``y`` and optional
   ``owners`` (``x_test``/``y_test``, ``class_names`` also read), or an image folder
   ``root/<class>/<owner>/*.png`` or ``root/<class>/*.png`` (the store's conventions: class folders
   sorted by name give labels 0..K-1; grayscale or RGB, resized bilinearly, pixels / 255);
2. gives every sample an owner: its own, or simulated users ``user0..userN-1`` (random, seeded, every
   user at least one sample), and holds out a random validation slice (the samples the device's
   stopping rule compares with);
3. trains an int8 model in the engine on the training samples (the dataset's recipe; ``mlp`` for flat
   features, ``digits_cnn`` for images, ``mnist1d_cnn`` for (1, W, C) signals), or imports an int8
   .tflite (``--model``), checked against the data;
4. writes to DIR: model.tflite, samples_train.npz, samples_validation.npz (float features, ``y``,
   ``owners``, ``class_names``: what ``edge-qmul-host push-samples`` sends and ``Store.import_npz``
   reads), table.json (the similar-label table) and manifest.json (what was done, sha256 of every
   file), then prints the ``edge-qmul-host`` commands that push them to a device.

Everything is checked and computed before anything is written; the files are written into a temp
directory next to DIR and moved in, manifest.json last. A bad input is one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_qmul import ModelError, Model, __version__, datasets, load_tflite, metrics, models, save_tflite  # noqa: E402
from edge_qmul.evaluation.canary import (Canary, CanaryError, make_canary, model_predict, plant, rate,  # noqa: E402
                                         trigger_hits)
from edge_qmul.fsutil import atomic_write, fsync_dir, sha256_file  # noqa: E402
from edge_qmul.quant import quantize  # noqa: E402
from edge_qmul.train import TRAINING_RECIPES, fit_recipe  # noqa: E402
from edge_qmul.unlearn.similar_labels import SimilarLabelTable, build_table  # noqa: E402

PROG = "train_base"
# Hyperparameters for the user's own data: the digits recipe (small images or feature vectors).
USER_RECIPE = {key: value for key, value in TRAINING_RECIPES["digits"].items() if key != "arch"}
CONV_ARCHS = ("digits_cnn", "mnist_cnn", "mnist1d_cnn", "mobilenet_tiny", "resnet_tiny")
CALIBRATION_SAMPLES = 256
TABLE_K = 3
FILES = ("model.tflite", "samples_train.npz", "samples_validation.npz", "table.json")
CANARIES = "canaries.json"  # host only: which owner carries which trigger, and in which samples


class PrepareError(ValueError):
    """A problem with the user's input, stated in one line naming what and where."""


@dataclass
class Data:
    """Samples as float32 features with int64 labels; owners and a test split when the source has them."""

    x: np.ndarray
    y: np.ndarray
    class_names: list[str]
    source: dict
    input_range: tuple[float, float]
    owners: np.ndarray | None = None
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    recipe: dict = field(default_factory=lambda: dict(USER_RECIPE))

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample (no batch axis)."""
        return tuple(int(s) for s in self.x.shape[1:])


# --- loading data ------------------------------------------------------------------------------------

def load_builtin(name: str, seed: int) -> Data:
    """A built-in dataset (no owners; its own test split) with its training recipe."""
    if name not in datasets.NAMES:
        raise PrepareError(f"--dataset {name!r}: unknown; built-in datasets are {', '.join(datasets.NAMES)} "
                           "(or give your own with --data FILE.npz or --images DIR)")
    ds = datasets.load(name, seed=seed)
    return Data(ds.x_train, ds.y_train, list(ds.class_names),
                {"kind": "dataset", "name": name, "description": ds.description},
                tuple(ds.input_range), x_test=ds.x_test, y_test=ds.y_test, recipe=dict(TRAINING_RECIPES[name]))


def check_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    """``y`` as int64 class labels for ``n`` samples, or a PrepareError naming the problem."""
    if y.ndim != 1:
        raise PrepareError(f"{where} must be a 1-D vector of labels, got shape {y.shape}")
    if len(y) != n:
        raise PrepareError(f"{where} has {len(y)} labels but there are {n} samples")
    integral = np.issubdtype(y.dtype, np.integer) and y.dtype != np.bool_
    if not integral and np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (np.mod(np.nan_to_num(y), 1) != 0)
        if bad.any():
            raise PrepareError(f"{where} must hold integer class labels, got {y.dtype} "
                               f"(e.g. {y[np.flatnonzero(bad)[0]]!r})")
    elif not integral:
        raise PrepareError(f"{where} must hold integer class labels, got {y.dtype}")
    y = y.astype(np.int64)
    if n and y.min() < 0:
        raise PrepareError(f"{where} holds a negative label ({int(y.min())}); labels are 0..K-1")
    return y


def check_features(x: np.ndarray, where: str) -> np.ndarray:
    """``x`` as float32 (N, ...) features, or a PrepareError naming the problem."""
    if not np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_:
        raise PrepareError(f"{where} must hold numbers, got {x.dtype}")
    if x.ndim < 2:
        raise PrepareError(f"{where} must be (N, features...) with a batch axis first, got shape {x.shape}")
    if len(x) == 0:
        raise PrepareError(f"{where} holds no samples")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise PrepareError(f"{where} holds NaN or inf")
    return x


def load_npz(path: Path) -> Data:
    """Samples from an .npz: x, y; optional owners, x_test + y_test, class_names."""
    if not path.is_file():
        raise PrepareError(f"--data {path}: no such file")
    try:
        f = datasets.open_npz(path)
    except ValueError as e:
        raise PrepareError(f"--data {e}") from None
    with f:
        missing = [k for k in ("x", "y") if k not in f.files]
        if missing:
            raise PrepareError(f"--data {path}: missing key(s) {', '.join(missing)}; samples need x (features) "
                               f"and y (labels), optionally owners (found: {', '.join(f.files) or 'no keys'})")
        try:
            arrays = {k: f[k] for k in f.files}
        except ValueError as e:  # object arrays need pickle, which we refuse
            raise PrepareError(f"--data {path}: cannot read arrays ({e})") from None
    x = check_features(arrays["x"], f"--data {path}: x")
    y = check_labels(arrays["y"], len(x), f"--data {path}: y")
    owners = None
    if "owners" in arrays:
        owners = np.asarray(arrays["owners"]).astype(str)
        if owners.shape != (len(x),):
            raise PrepareError(f"--data {path}: owners has shape {owners.shape}, expected ({len(x)},)")
        if (owners == "").any():
            raise PrepareError(f"--data {path}: owners holds an empty name (sample {np.flatnonzero(owners == '')[0]})")
    x_test = y_test = None
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise PrepareError(f"--data {path}: a test split needs both x_test and y_test")
    if "x_test" in arrays:
        x_test = check_features(arrays["x_test"], f"--data {path}: x_test")
        y_test = check_labels(arrays["y_test"], len(x_test), f"--data {path}: y_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise PrepareError(f"--data {path}: x_test samples are {x_test.shape[1:]}, x samples {x.shape[1:]}")
    top = int(max(y.max(), y_test.max() if y_test is not None else 0)) + 1
    names = [str(c) for c in range(top)]
    if "class_names" in arrays:
        names = [str(c) for c in np.asarray(arrays["class_names"]).reshape(-1).tolist()]
        if len(names) < top:
            raise PrepareError(f"--data {path}: {len(names)} class_names for labels up to {top - 1}")
    lo, hi = float(x.min()), float(x.max())
    return Data(x, y, names, {"kind": "npz", "path": str(path)}, (lo, hi if hi > lo else lo + 1.0),
                owners=owners, x_test=x_test, y_test=y_test)


def image_owners(root: Path, found: list[tuple[Path, int, tuple[str, ...]]]) -> np.ndarray | None:
    """The owner folder of each image of ``root/<class>/<owner>/<image>``, or None when every image
    sits directly in its class folder; a PrepareError for deeper or mixed layouts."""
    for p, _, parts in found:
        if len(parts) > 2:
            raise PrepareError(f"--images {p}: nested too deep; images go in {root}/<class>/<owner>/ "
                               f"or {root}/<class>/")
    if len({len(parts) for _, _, parts in found}) > 1:
        raise PrepareError(f"--images {root}: some images sit in owner folders and some directly in a class "
                           "folder; use one layout for all")
    return None if len(found[0][2]) == 1 else np.array([parts[0] for _, _, parts in found])


def load_images(root: Path, size: tuple[int, int], channels: int) -> Data:
    """An image folder as (N, H, W, C) float32 in [0, 1], read by the loader behind ``Store.import_image_folder``."""
    if not root.is_dir():
        raise PrepareError(f"--images {root}: no such directory")
    if channels not in (1, 3):
        raise PrepareError(f"--channels {channels}: must be 1 (grayscale) or 3 (RGB)")
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise PrepareError(f"--image-size {h} {w}: must be positive")
    try:
        classes, found = datasets.find_images(root)
        owners = image_owners(root, found)
        x = datasets.read_pixels([p for p, _, _ in found], (h, w), channels)
    except datasets.SampleError as e:
        raise PrepareError(f"--images {e}") from None
    except ImportError:
        raise PrepareError("--images needs Pillow: pip install pillow") from None
    return Data(x / np.float32(255.0), np.array([label for _, label, _ in found], np.int64), classes,
                {"kind": "images", "path": str(root), "image_size": [h, w], "channels": channels},
                (0.0, 1.0), owners=owners)


# --- owners and the validation slice ----------------------------------------------------------------

def simulated_owners(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``user0..user{count-1}`` spread over ``n`` samples at random, each user at least one sample."""
    if n < count:
        raise PrepareError(f"--owners {count}: only {n} samples, fewer than the owners to simulate; "
                           "lower --owners")
    return np.array([f"user{i}" for i in rng.permutation(np.arange(n) % count)])


def validation_mask(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A random mask of round(fraction * n) samples (at least one, never all) to hold out."""
    k = max(1, int(round(fraction * n)))
    if k >= n:
        raise PrepareError(f"--validation {fraction}: {n} sample(s) are too few to hold out a validation slice")
    mask = np.zeros(n, bool)
    mask[rng.choice(n, k, replace=False)] = True
    return mask


def _natural(name: str) -> list:
    """Sort key that puts user2 before user10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def owner_counts(owners: np.ndarray, val: np.ndarray) -> dict[str, dict[str, int]]:
    """{owner: {"train": n, "validation": n}}, owners in natural order."""
    return {o: {"train": int(np.sum((owners == o) & ~val)), "validation": int(np.sum((owners == o) & val))}
            for o in sorted(set(owners.tolist()), key=_natural)}


# --- canaries ------------------------------------------------------------------------------------

def plant_canaries(d: Data, who: np.ndarray, val: np.ndarray, owners: tuple[str, ...], fraction: float,
                   size: int, seed: int, num_classes: int) -> tuple[Data, list[Canary]]:
    """The data with a trigger planted in ``fraction`` of each named owner's training samples
    (validation samples stay clean), and the records; ``marked`` indexes samples_train.npz. Targets
    are drawn from the model's ``num_classes``."""
    if not owners:
        return d, []
    if len(set(owners)) != len(owners):
        raise PrepareError(f"--canary: an owner is named twice ({', '.join(owners)})")
    train = np.flatnonzero(~val)
    x, y = d.x[train], d.y[train]
    planted = []
    for owner in owners:
        if not np.any(who[train] == owner):
            known = sorted(set(who.tolist()), key=_natural)
            raise PrepareError(f"--canary {owner}: no training samples of that owner (owners: "
                               f"{', '.join(known[:8])}{', ...' if len(known) > 8 else ''})")
        try:
            c = make_canary(owner, seed, d.shape, num_classes, *d.input_range, size=size, fraction=fraction)
            x, y, c = plant(x, y, who[train], c)
        except CanaryError as e:
            raise PrepareError(f"--canary {owner}: {e}") from None
        planted.append(c)
    xs, ys = d.x.copy(), d.y.copy()
    xs[train], ys[train] = x, y
    return replace(d, x=xs, y=ys), planted


def canary_rate(model: Model, d: Data, who: np.ndarray, val: np.ndarray, c: Canary) -> dict:
    """The trigger's success rate on the test split (or on other owners' validation samples)."""
    if d.x_test is not None:
        x, y, inputs = d.x_test, d.y_test, "test inputs"
    else:
        other = val & (who != c.owner)
        x, y, inputs = d.x[other], d.y[other], "other owners' validation samples"
    return {**rate(*trigger_hits(model_predict(model, c), x, y, c)), "inputs": inputs}


# --- the model -----------------------------------------------------------------------------------

def choose_arch(data: Data, arch: str | None) -> str:
    """The architecture to train: ``arch``, the dataset's recipe, or one that fits the sample shape."""
    if arch is not None:
        if arch not in models.ARCHITECTURES:
            raise PrepareError(f"--arch {arch!r}: unknown; known: {', '.join(models.ARCHITECTURES)}")
        if arch in CONV_ARCHS and len(data.shape) != 3:
            raise PrepareError(f"--arch {arch}: needs samples shaped (H, W, C); these are {data.shape} "
                               "(use --arch mlp)")
        return arch
    if "arch" in data.recipe:
        return data.recipe["arch"]
    if len(data.shape) == 3:
        return "mnist1d_cnn" if data.shape[0] == 1 else "digits_cnn"
    return "mlp"


def train_model(data: Data, train: np.ndarray, arch: str, epochs: int, seed: int,
                say: Callable[[str], None]) -> tuple[Model, dict]:
    """Build ``arch``, calibrate it on training samples, train it in the engine; (model, recipe used)."""
    recipe = {**data.recipe, "arch": arch, "epochs": int(epochs or data.recipe["epochs"])}
    rng = np.random.default_rng(seed)
    x, y = data.x[train], data.y[train]
    calib = x[rng.choice(len(x), min(CALIBRATION_SAMPLES, len(x)), replace=False)]
    model = models.build(arch, data.shape, len(data.class_names), seed=seed, calib_x=calib,
                         input_range=data.input_range)
    x8 = quantize(x, model.tensors[model.core_inputs[0]].quant)

    def progress(epoch: int, step: int, steps_per_epoch: int, loss: float) -> None:
        if step == steps_per_epoch - 1 and (epoch + 1) % max(1, recipe["epochs"] // 4) == 0:
            say(f"   epoch {epoch + 1}/{recipe['epochs']}, loss {loss:.3f}")
    fit_recipe(model, recipe, x8, y, seed, progress)
    return model, recipe


def import_model(path: Path, data: Data) -> Model:
    """An int8 .tflite that fits the data (input shape, class count), or a PrepareError saying why not."""
    if not path.is_file():
        raise PrepareError(f"--model {path}: no such file")
    try:
        model = load_tflite(path)
    except ModelError as e:
        hint = "; export it with full-integer (int8) quantization" if "not int8" in str(e) else ""
        raise PrepareError(f"--model {e}{hint}") from None
    shape = tuple(int(s) for s in model.tensors[model.core_inputs[0]].shape[1:])
    if shape != data.shape:
        hint = " (set --image-size H W and --channels C to match)" if data.source["kind"] == "images" else ""
        raise PrepareError(f"--model {path}: takes samples shaped {shape}, the data's are {data.shape}{hint}")
    top = int(max(data.y.max(), data.y_test.max() if data.y_test is not None else 0))
    if top >= model.num_classes:
        raise PrepareError(f"--model {path}: has {model.num_classes} classes, the data has label {top}")
    return model


# --- writing ---------------------------------------------------------------------------------------

def push_commands(out: Path) -> list[str]:
    """The host commands that send the prepared files to a device (model first: samples are
    quantized with its input)."""
    host = "edge-qmul-host --device DEVICE --key-file KEY"
    return [f"{host} push-model {out / 'model.tflite'}",
            f"{host} push-table {out / 'table.json'}",
            f"{host} push-samples {out / 'samples_train.npz'}",
            f"{host} push-samples {out / 'samples_validation.npz'} --role validation"]


def write_outputs(out: Path, model: Model, table: SimilarLabelTable, samples: dict[str, dict[str, np.ndarray]],
                  manifest: dict, started: float, canaries: list[Canary] = ()) -> dict:
    """Write every file into a temp directory beside ``out``, record their sha256 in the manifest,
    then move them into ``out`` (manifest.json last, after the old one is removed). With
    ``canaries``, canaries.json too: the records and the sha256 of the model they were trained into."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_tflite(model, tmp / "model.tflite")
        table.save(tmp / "table.json")
        for role, arrays in samples.items():
            atomic_write(tmp / f"samples_{role}.npz", lambda f, a=arrays: np.savez(f, **a))
        files = FILES + ((CANARIES,) if canaries else ())
        if canaries:
            record = {"model_sha256": sha256_file(tmp / "model.tflite"), "samples": "samples_train.npz",
                      "canaries": [json.loads(c.to_json()) for c in canaries]}
            atomic_write(tmp / CANARIES, (json.dumps(record, indent=1) + "\n").encode())
        manifest["files"] = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                             for name in files}
        manifest["wall_s"] = round(time.perf_counter() - started, 3)
        atomic_write(tmp / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
        out.mkdir(exist_ok=True)
        (out / "manifest.json").unlink(missing_ok=True)  # a directory without it is incomplete
        (out / CANARIES).unlink(missing_ok=True)  # never a stale record beside new samples
        for name in (*files, "manifest.json"):
            os.replace(tmp / name, out / name)
        fsync_dir(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


# --- the whole job ---------------------------------------------------------------------------------

def check_arguments(out: Path, sources: dict, model: Path | None, owners: int, validation: float,
                    arch: str | None, epochs: int | None) -> None:
    """Refuse bad arguments before any work."""
    given = [k for k, v in sources.items() if v is not None]
    if len(given) > 1:
        raise PrepareError(f"give one data source, not {' and '.join('--' + k for k in given)}")
    if model is not None and (arch is not None or epochs is not None):
        raise PrepareError("--arch and --epochs choose how to train; they do not apply to an imported --model")
    if model is not None and not Path(model).is_file():
        raise PrepareError(f"--model {model}: no such file")
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out}: exists and is not a directory")
    if not (0.0 < validation <= 0.5):  # also refuses NaN
        raise PrepareError(f"--validation {validation}: must be a fraction in (0, 0.5]")
    if owners < 1:
        raise PrepareError(f"--owners {owners}: must be at least 1")
    if epochs is not None and epochs < 1:
        raise PrepareError(f"--epochs {epochs}: must be at least 1")


def load_data(dataset: str | None, data: Path | None, images: Path | None, seed: int,
              image_size: tuple[int, int], channels: int) -> Data:
    """The samples from whichever source was given (the digits dataset when none was)."""
    if data is not None:
        return load_npz(Path(data))
    if images is not None:
        return load_images(Path(images), image_size, channels)
    return load_builtin(dataset or "digits", seed)


def prepare(out: Path, dataset: str | None = None, data: Path | None = None, images: Path | None = None,
            model: Path | None = None, owners: int = 20, validation: float = 0.1, arch: str | None = None,
            epochs: int | None = None, seed: int = 0, image_size=(8, 8), channels=1,
            say: Callable[[str], None] = print, canary: tuple[str, ...] = (), canary_fraction: float = 0.5,
            canary_size: int = 3) -> dict:
    """Train (or import) an int8 base model and write what a device needs into ``out``; returns the
    manifest. Raises PrepareError (one line) for bad input, before anything is written."""
    started = time.perf_counter()
    out = Path(out)
    check_arguments(out, {"dataset": dataset, "data": data, "images": images}, model, owners, validation,
                    arch, epochs)
    d = load_data(dataset, data, images, seed, image_size, channels)
    say(f"data: {len(d.y)} samples shaped {d.shape}, {len(d.class_names)} classes ({d.source['kind']})")

    base = import_model(Path(model), d) if model is not None else None
    rng = np.random.default_rng(seed)
    simulated = d.owners is None
    who = simulated_owners(len(d.y), owners, rng) if simulated else d.owners
    val = validation_mask(len(d.y), validation, rng)
    d, planted = plant_canaries(d, who, val, canary, canary_fraction, canary_size, seed,
                                base.num_classes if base is not None else len(d.class_names))
    for c in planted:
        say(f"canary for {c.owner}: a {canary_size} x {canary_size} trigger, label {c.target}, in {len(c.marked)} "
            f"of their {int(np.sum((who == c.owner) & ~val))} training samples")

    if base is None:
        chosen = choose_arch(d, arch)
        say(f"training {chosen} in the engine on {int((~val).sum())} samples")
        base, recipe = train_model(d, ~val, chosen, epochs, seed, say)
        model_info = {"source": "trained", "arch": chosen, "recipe": recipe}
    else:
        model_info = {"source": "imported", "path": str(model), "sha256_in": sha256_file(Path(model))}
    names = d.class_names + [str(c) for c in range(len(d.class_names), base.num_classes)]
    q = base.tensors[base.core_inputs[0]].quant
    x8 = quantize(d.x, q)
    scores = {"validation": metrics.accuracy(base, x8[val], d.y[val])}
    if d.x_test is not None:
        scores["test"] = metrics.accuracy(base, quantize(d.x_test, q), d.y_test)
    say("accuracy: " + ", ".join(f"{k} {v:.1f}%" for k, v in scores.items()))
    canary_rates = {c.owner: canary_rate(base, d, who, val, c) for c in planted}
    for owner, r in canary_rates.items():
        say(f"canary for {owner}: the trigger gives its label on {100 * r['rate']:.1f}% of {r['trials']} "
            f"{r['inputs']} (95% interval {100 * r['lo']:.1f}-{100 * r['hi']:.1f}%)")

    description = f"{d.source.get('name') or d.source['path']}: training slice, {int((~val).sum())} samples"
    table = build_table(base, x8[~val], d.y[~val], k=min(TABLE_K, base.num_classes - 1),
                        class_names=names, data=description)
    samples = {role: {"x": d.x[m], "y": d.y[m], "owners": who[m], "class_names": np.array(names)}
               for role, m in (("train", ~val), ("validation", val))}
    model_info.update(input_shape=list(d.shape), num_classes=base.num_classes,
                      input_quant={"scale": float(q.scale[0]), "zero_point": int(q.zero_point[0])})
    manifest = {
        "tool": "tools/train_base.py", "edge_qmul_version": __version__, "seed": seed,
        "data": {**d.source, "class_names": names},
        "model": model_info,
        "samples": {"train": int((~val).sum()), "validation": int(val.sum()),
                    "test": 0 if d.y_test is None else len(d.y_test), "validation_fraction": validation},
        "owners": {"simulated": simulated, "count": len(set(who.tolist())), "samples": owner_counts(who, val)},
        "accuracy_percent": scores,
        "table": {"k": table.k, "model_sha256": table.model_sha256},
        "push_commands": push_commands(out),
    }
    if planted:
        manifest["canaries"] = {"file": CANARIES, "fraction": canary_fraction, "size": canary_size,
                                "trigger_rate": canary_rates}
    write_outputs(out, base, table, samples, manifest, started, planted)
    say(f"wrote {out}/: {', '.join((*manifest['files'], 'manifest.json'))} in {manifest['wall_s']:.1f}s")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="train_base.py",
        description="Prepare what a device needs: train an int8 base model in the engine (or import one), "
                    "give samples owners, hold out a validation slice, and write model.tflite, "
                    "samples_train.npz, samples_validation.npz, table.json and manifest.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python tools/train_base.py --dataset digits --out base/\n"
               "  python tools/train_base.py --data my.npz --owners 50 --validation 0.2 --out base/\n"
               "  python tools/train_base.py --images photos/ --image-size 16 16 --model m.tflite --out base/\n"
               "\n"
               "--data FILE.npz: x (N, ...) float features, y (N,) integer labels; optional owners (N,),\n"
               "x_test + y_test, class_names. --images DIR: DIR/<class>/<owner>/*.png or DIR/<class>/*.png.\n"
               "Without owners, samples go to simulated users user0..user{N-1} (--owners N).")
    ap.add_argument("--out", type=Path, required=True, help="directory to write into (created if missing)")
    src = ap.add_argument_group("data (one of; default --dataset digits)")
    src.add_argument("--dataset", help=f"a built-in dataset: {', '.join(datasets.NAMES)}")
    src.add_argument("--data", type=Path, help="an .npz of samples (x, y, optional owners)")
    src.add_argument("--images", type=Path, help="an image folder DIR/<class>/[<owner>/]<image>")
    ap.add_argument("--image-size", type=int, nargs=2, default=(8, 8), metavar=("H", "W"),
                    help="with --images: resize to H x W (default 8 8)")
    ap.add_argument("--channels", type=int, default=1, help="with --images: 1 grayscale or 3 RGB (default 1)")
    ap.add_argument("--model", type=Path, help="import this int8 .tflite instead of training one")
    ap.add_argument("--owners", type=int, default=20, help="simulated users for data without owners (default 20)")
    ap.add_argument("--validation", type=float, default=0.1, help="fraction held out, in (0, 0.5] (default 0.1)")
    ap.add_argument("--arch", help=f"architecture to train: {', '.join(models.ARCHITECTURES)} "
                                   "(default: the dataset's, mlp for flat features, digits_cnn for images)")
    ap.add_argument("--epochs", type=int, help="training epochs (default: the recipe's, 20 for digits)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--canary", action="append", default=[], metavar="OWNER",
                    help="plant a seeded trigger in this owner's training samples, recorded in canaries.json "
                         "(host only), so that forgetting them can be verified (repeatable)")
    ap.add_argument("--canary-fraction", type=float, default=0.5,
                    help="fraction of the owner's training samples that carry it (default 0.5)")
    ap.add_argument("--canary-size", type=int, default=3, help="the trigger's side in pixels (default 3)")
    args = ap.parse_args(argv)
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.1f}s] {message}", flush=True)
    try:
        manifest = prepare(args.out, args.dataset, args.data, args.images, args.model, args.owners,
                           args.validation, args.arch, args.epochs, args.seed, tuple(args.image_size),
                           args.channels, say, tuple(args.canary), args.canary_fraction, args.canary_size)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {args.out} holds no partial files", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as e:  # PrepareError, ModelError, TableError, I/O
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print("push them to a device (DEVICE: tcp://HOST:PORT or serial:///dev/ttyUSB0; KEY: the device's key file):")
    for command in manifest["push_commands"]:
        print(f"  {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
