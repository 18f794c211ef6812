"""Fixed-point training of an int8 Model: integer backward, STE, master weights, integer SGD.

Every multiply-accumulate is integer (kernels/*: int32 products of int16 errors and int8 values).
Floats appear only where DESIGN.md §3 allows them: scale bookkeeping (each error and gradient carries
one float scale), the loss head over B x classes (``edge_qmul.losses``), and scalar reductions
(gradient norms).

- ``gradients``: integer gradients with one scale each, and their combination in integers;
- ``trainer``: the Trainer (backward walk, updates, schedule); ``sgd``: its compiled update loops;
- ``memory``: the bytes a step holds (``Trainer.memory_report``);
- ``recipes``: ``fit`` and the from-scratch recipes of the built-in architectures.
"""
from ..losses import HEADS, loss_head
from .gradients import Gradients, ParamGrad, combine
from .memory import BLOCK_BYTES, BLOCKS_PER_BATCH, input_gradient_block, memory_report
from .recipes import TRAINING_RECIPES, fit, fit_recipe, train_from_scratch
from .trainer import Q15, Trainer

__all__ = ["BLOCK_BYTES", "BLOCKS_PER_BATCH", "Gradients", "HEADS", "ParamGrad", "Q15", "TRAINING_RECIPES",
           "Trainer", "combine", "fit", "fit_recipe", "input_gradient_block", "loss_head", "memory_report",
           "train_from_scratch"]
