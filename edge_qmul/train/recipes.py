"""Training runs: shuffled minibatch epochs (``fit``), and the recipes that train the built-in
architectures from scratch on the built-in datasets (used by tests, tools, benchmarks and the
evaluation)."""
from __future__ import annotations

import numpy as np

from .. import datasets, metrics, models
from ..errors import ModelError
from ..graph import Model
from ..quant import quantize
from .trainer import Trainer


def fit(trainer: Trainer, x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int = 32, seed: int = 0,
        progress=None) -> list[float]:
    """Shuffled minibatch SGD for ``epochs``; returns the mean loss of each epoch.

    ``progress(epoch, step, steps_per_epoch, loss)`` is called after every step (a bar, a log line).
    """
    if epochs < 1 or batch_size < 1:
        raise ModelError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y) or len(x) == 0:
        raise ModelError(f"{len(x)} inputs but {len(y)} labels")
    rng = np.random.default_rng(seed)
    steps = -(-len(x) // batch_size)
    history = []
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        losses = []
        for s in range(steps):
            idx = order[s * batch_size:(s + 1) * batch_size]
            losses.append(trainer.step(x[idx], y[idx]))
            if progress is not None:
                progress(epoch, s, steps, losses[-1])
        history.append(float(np.mean(losses)))
    return history


# Recipes for training the built-in architectures from scratch (used by tests, tools, benchmarks).
TRAINING_RECIPES = {
    "digits": {"arch": "digits_cnn", "epochs": 20, "lr": 0.05, "momentum": 0.9, "batch_size": 32},
    "mnist1d": {"arch": "mnist1d_cnn", "epochs": 30, "lr": 0.05, "momentum": 0.9, "batch_size": 32},
    "mnist5k": {"arch": "mnist_cnn", "epochs": 15, "lr": 0.05, "momentum": 0.9, "batch_size": 32},
}


def fit_recipe(model: Model, recipe: dict, x_int8: np.ndarray, y: np.ndarray, seed: int,
               progress=None) -> Trainer:
    """Train ``model`` on (``x_int8``, ``y``) with a recipe's epochs, batch, lr and momentum under a
    cosine schedule (``TRAINING_RECIPES``); returns the Trainer."""
    steps = recipe["epochs"] * -(-len(x_int8) // recipe["batch_size"])
    trainer = Trainer(model, lr=recipe["lr"], momentum=recipe["momentum"], schedule="cosine", total_steps=steps)
    fit(trainer, x_int8, y, recipe["epochs"], recipe["batch_size"], seed=seed, progress=progress)
    return trainer


def train_from_scratch(dataset: str, seed: int = 0, progress=None, **overrides) -> tuple[Model, float]:
    """Build the dataset's architecture, calibrate it on 256 training samples, train it with the
    recipe (cosine schedule) and return (model, test accuracy as a fraction). Host-side: loads a
    built-in dataset."""
    if dataset not in TRAINING_RECIPES:
        raise ModelError(f"no training recipe for {dataset!r}; known: {', '.join(TRAINING_RECIPES)}")
    recipe = {**TRAINING_RECIPES[dataset], **overrides}
    ds = datasets.load(dataset, seed=seed)
    rng = np.random.default_rng(seed)
    calib = ds.x_train[rng.choice(len(ds.x_train), min(256, len(ds.x_train)), replace=False)]
    model = models.build(recipe["arch"], ds.input_shape, ds.num_classes, seed=seed, calib_x=calib)
    q = model.tensors[model.core_inputs[0]].quant
    x_train, x_test = quantize(ds.x_train, q), quantize(ds.x_test, q)
    fit_recipe(model, recipe, x_train, ds.y_train, seed, progress)
    return model, metrics.accuracy(model, x_test, ds.y_test) / 100.0
