"""Build a similar-label table on the host, for Q-MUL on the device.

    python tools/similar_labels.py --model M.tflite --data digits|mnist1d|npz:PATH|images:DIR \
        [--k 3] [--split train|test] --out table.json

The model (a .tflite, run through the engine) predicts on host data; the similarity of class c to
class c' is the mean probability the model gives c' on samples of class c. The table keeps the top-k
per class with normalized weights, the model's hash (the device refuses a table made for another
model) and a description of the data. It prints the most confused class pairs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_qmul import datasets, load_tflite  # noqa: E402
from edge_qmul.errors import ModelError  # noqa: E402
from edge_qmul.quant import quantize  # noqa: E402
from edge_qmul.unlearn.similar_labels import TableError, build_table, confused_pairs, similarity_matrix  # noqa: E402


def load_data(spec: str, model, split: str):
    """(int8 inputs, labels, class names, description) from a built-in dataset, an npz or images."""
    q = model.tensors[model.core_inputs[0]].quant
    if spec.startswith("images:"):
        shape = tuple(model.tensors[model.core_inputs[0]].shape[1:])
        batch = datasets.image_folder_samples(spec[7:], q, size=shape[:2],
                                              channels=shape[2] if len(shape) > 2 else 1, owner="host")
        return batch.x, np.asarray(batch.labels), batch.class_names, f"image folder {spec[7:]}"
    ds = datasets.load_npz(spec[4:]) if spec.startswith("npz:") else datasets.load(spec)
    x, y = (ds.x_train, ds.y_train) if split == "train" else (ds.x_test, ds.y_test)
    x8 = x if x.dtype == np.int8 else quantize(x, q)
    return x8, y, list(ds.class_names), f"{getattr(ds, 'description', spec)} ({split} split, {len(y)} samples)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Build a similar-label table for Q-MUL.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python tools/similar_labels.py --model base/model.tflite --data digits --out table.json\n"
               "  python tools/similar_labels.py --model m.tflite --data npz:mine.npz --k 3 --pairs 10 --out table.json")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="digits | mnist1d | npz:PATH | images:DIR")
    ap.add_argument("--split", default="train", choices=("train", "test"))
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=10, help="how many confused pairs to print")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        model = load_tflite(args.model)
        x, y, names, description = load_data(args.data, model, args.split)
        table = build_table(model, x, y, k=args.k, class_names=names, data=description)
        table.save(args.out)
        sim = similarity_matrix(model, x, y)
    except (ModelError, TableError, ValueError, OSError) as e:
        print(f"similar_labels: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {table.num_classes} classes, top-{table.k}, model {table.model_sha256[:12]}")
    print("most confused class pairs (mean probability of the second class on samples of the first):")
    for c, o, score in confused_pairs(sim, n=args.pairs):
        print(f"  {table.class_names[c]:>10} -> {table.class_names[o]:<10} {score:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
