"""The `edge-qmul` command (device side): info, unlearn, store."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from .errors import ModelError


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _info(args: argparse.Namespace) -> int:
    from .tflite import load_tflite
    model = load_tflite(args.model)
    data = Path(args.model).read_bytes()
    print(f"model: {args.model}")
    print(f"sha256: {hashlib.sha256(data).hexdigest()}")
    print(f"size: {len(data)} bytes")
    print(model.summary())
    return 0


# --- progress ------------------------------------------------------------------------------------

class Progress:
    """A bar on a terminal (tqdm), a line every few seconds otherwise."""

    def __init__(self, stream=sys.stderr, every_s: float = 2.0) -> None:
        self.stream, self.every_s = stream, every_s
        self.bar = None
        self.last = 0.0
        self.t0 = time.perf_counter()
        if stream.isatty():
            try:
                from tqdm import tqdm
                self.tqdm = tqdm
            except ImportError:
                self.tqdm = None
        else:
            self.tqdm = None

    def __call__(self, info: dict) -> None:
        total = info.get("steps", 0) * info.get("epochs", 1)
        done = info.get("epoch", 0) * info.get("steps", 0) + info.get("step", 0)
        loss = info.get("loss", info.get("loss_f"))
        if self.tqdm is not None:
            if self.bar is None:
                self.bar = self.tqdm(total=total, desc=info.get("phase", ""), file=self.stream, leave=False)
            self.bar.n = done
            self.bar.set_postfix(epoch=info.get("epoch", 0) + 1, loss=f"{loss:.3f}" if loss is not None else "-")
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            elapsed = now - self.t0
            eta = elapsed / done * (total - done) if done else float("nan")
            print(f"[{info.get('phase', '')}] epoch {info.get('epoch', 0) + 1}/{info.get('epochs', 1)} "
                  f"step {done}/{total}" + (f" loss {loss:.3f}" if loss is not None else "")
                  + f" elapsed {elapsed:.1f}s eta {eta:.1f}s (at most; the stopping rule may end it sooner)",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- unlearn -------------------------------------------------------------------------------------

def _selector(args) -> dict:
    chosen = [k for k in ("owner", "ids", "label") if getattr(args, k) is not None]
    if len(chosen) != 1:
        raise CLIError("give exactly one of --owner, --ids FILE, --class K")
    if args.owner is not None:
        return {"owner": args.owner}
    if args.label is not None:
        return {"label": int(args.label)}
    path = Path(args.ids)
    if not path.is_file():
        raise CLIError(f"--ids {path}: no such file")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise CLIError(f"--ids {path}: lists no sample id (the forget set would be empty)")
    return {"ids": ids}


def _unlearn(args: argparse.Namespace) -> int:
    from . import metrics
    from .store import Store, StoreError, sha256_id
    from .tflite import load_tflite, save_tflite
    from .unlearn import make_config, unlearn
    from .unlearn.similar_labels import SimilarLabelTable, TableError, check_table

    model_path, out_path = Path(args.model), Path(args.out)
    if out_path.resolve() == model_path.resolve():
        raise CLIError("--out must differ from --model: the original model stays as it is")
    model = load_tflite(model_path)
    model_before = _sha256_file(model_path)
    selector = _selector(args)
    if not Path(args.store).is_file():
        raise CLIError(f"--store {args.store}: no such file")
    overrides = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("seed", args.seed)) if v is not None}
    table = None
    if args.table:
        try:
            table = SimilarLabelTable.load(args.table)
            check_table(table, metrics.model_sha256(model), metrics._num_classes(model),
                        allow_model_mismatch=args.allow_table_mismatch)
        except TableError as e:
            raise CLIError(str(e)) from None
        overrides["labels"] = "table"
    if "label" in selector and args.method not in ("retrain", "ft"):
        from .unlearn import CLASS_FORGETTING
        for key, value in CLASS_FORGETTING.items():
            overrides.setdefault(key, value)  # a forgotten class has no held-out accuracy to meet
    config = make_config(args.method, overrides)

    with Store(args.store) as store:
        # every check before the first write: bad input leaves the store byte for byte as it was
        q = model.tensors[model.core_inputs[0]].quant
        if store.input_shape is not None and tuple(store.input_shape) != tuple(model.tensors[model.core_inputs[0]].shape[1:]):
            raise CLIError(f"the store's samples are {list(store.input_shape)}, the model takes "
                           f"{list(model.tensors[model.core_inputs[0]].shape[1:])}")
        if store.quant is not None and store.quant != q:
            raise CLIError(f"the store's samples were quantized with {store.quant}, the model's input is {q}")
        forget_ids = store.select(**selector, role="train")
        all_forget_ids = store.select(**selector, role=None)
        if not forget_ids:
            raise CLIError(f"the selection {_describe(selector)} names no training sample: nothing to forget")
        if len(forget_ids) >= store.count(role="train"):
            raise CLIError(f"the selection {_describe(selector)} is the whole store: nothing would remain "
                           "to keep the model useful; retrain from scratch instead")
        forget_validation = set(all_forget_ids) - set(forget_ids)
        retain_ids = store.retain_sample(exclude_ids=forget_ids, max_n=args.retain_max, seed=config.seed)
        validation_ids = [i for i in store.retain_sample(role="validation") if i not in forget_validation]
        forget = store.load(forget_ids)
        retain = store.load(retain_ids)
        validation = store.load(validation_ids) if validation_ids else None
        if validation is None and "label" not in selector:
            print("edge-qmul: warning: the store has no validation slice; the stopping rule has no "
                  "reference and the methods run to their epoch cap", file=sys.stderr)

        request_id = store.create_request(selector, args.method, config.to_dict())
        store.set_status(request_id, "running")
        try:
            before = _metrics(model, forget, retain, validation)
            progress = Progress()
            t0 = time.perf_counter()
            result = unlearn(model, forget, retain, method=args.method, config=config, validation=validation,
                             table=table, progress=progress)
            wall = time.perf_counter() - t0
            progress.close()
            after = _metrics(result.model, forget, retain, validation)
            save_tflite(result.model, out_path)
            model_after = _sha256_file(out_path)
            litert_check = _litert_agrees(out_path, result.model, forget[0], retain[0][:256])
            summary = {"UA": after["UA"], "RA": after["RA"], "VA": after["VA"], "MIA": after["MIA"]}
            store.set_status(request_id, "done", {"model_after": model_after, **summary})
        except BaseException as e:
            store.set_status(request_id, "failed", {"error": f"{type(e).__name__}: {e}"})
            raise
        committed = None
        if args.commit:
            committed = store.commit_forget(request_id, all_forget_ids, model_after)

    certificate = {
        "request_id": request_id,
        "selector": {k: (v if k == "label" else None) for k, v in selector.items()},
        "forgotten_sample_id_hashes": sorted(sha256_id(i) for i in all_forget_ids),
        "n_forgotten": len(all_forget_ids),
        "method": args.method,
        "params": config.to_dict(),
        "model_before_sha256": model_before,
        "model_after_sha256": model_after,
        "metrics_before": before,
        "metrics_after": after,
        "wall_s": wall,
        "steps": result.steps,
        "stopped_by_rule": result.stopped_by_rule,
        "litert_agrees_with_engine": litert_check,
        "committed": committed is not None,
        "samples_deleted_at": committed["deleted_at"] if committed else None,
        "audit_hash": committed.get("audit_hash") if committed else None,
        "engine_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    if args.report:
        from .fsutil import atomic_write
        atomic_write(args.report, (json.dumps(certificate, indent=1, sort_keys=True) + "\n").encode())
    print(f"forgot {len(all_forget_ids)} samples with {args.method} in {wall:.2f} s ({result.steps} steps"
          f"{', stopped by the held-out rule' if result.stopped_by_rule else ''})")
    for key in ("UA", "RA", "VA", "MIA"):
        b, a = before[key], after[key]
        if a is not None:
            print(f"  {key}: {b:.2f} -> {a:.2f}")
    print(f"  model {model_before[:12]} -> {model_after[:12]} written to {out_path}")
    print("  samples deleted from the store" if committed else
          "  samples still in the store: run again with --commit to delete them")
    return 0


def _describe(selector: dict) -> str:
    if "owner" in selector:
        return f"owner {selector['owner']!r}"
    if "label" in selector:
        return f"class {selector['label']}"
    return f"{len(selector['ids'])} listed ids"


def _metrics(model, forget, retain, validation) -> dict:
    from . import metrics
    from .unlearn import accuracy
    out = {"UA": 100.0 - accuracy(model, forget), "RA": accuracy(model, retain),
           "VA": accuracy(model, validation) if validation is not None else None, "MIA": None}
    if validation is not None:
        try:
            out["MIA"] = metrics.mia_efficacy(model, retain, validation, forget)
        except ImportError:
            pass  # scikit-learn is a host dependency: the device reports accuracies only
    return out


def _litert_agrees(path: Path, model, *batches) -> bool | None:
    """Does LiteRT, running the written file, predict what the engine reported? None without LiteRT."""
    try:
        from . import litert
        data = path.read_bytes()
        for x in batches:
            if len(x) and not np.array_equal(litert.run(data, x).argmax(axis=1), model.forward(x).argmax(axis=1)):
                return False
        return True
    except ImportError:
        return None


# --- store ---------------------------------------------------------------------------------------

def _store(args: argparse.Namespace) -> int:
    from .store import Store
    from .tflite import load_tflite
    if args.store_command == "import":
        model = load_tflite(args.model)
        q = model.tensors[model.core_inputs[0]].quant
        shape = tuple(model.tensors[model.core_inputs[0]].shape[1:])
        with Store(args.store, create=True) as store:
            if args.npz:
                ids = store.import_npz(args.npz, q, owner=args.owner, role=args.role)
            elif args.images:
                h, w, c = shape if len(shape) == 3 else (*shape, 1)
                ids = store.import_image_folder(args.images, q, size=(h, w), channels=c, owner=args.owner,
                                                role=args.role)
            else:
                raise CLIError("store import needs --npz FILE or --images DIR")
            print(f"imported {len(ids)} samples into {args.store} ({store.count()} in all)")
        return 0
    if not Path(args.store).is_file():
        raise CLIError(f"{args.store}: no such file")
    with Store(args.store) as store:
        if args.store_command == "list":
            owners = [args.owner] if args.owner else store.owners()
            for owner in owners:
                ids = store.select(owner=owner, role=None)
                print(f"{owner}\t{len(ids)} samples")
        elif args.store_command == "stats":
            print(json.dumps(store.stats(), indent=1, sort_keys=True, default=str))
        elif args.store_command == "verify":
            print(json.dumps(store.verify(), indent=1, sort_keys=True, default=str))
            print("ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-qmul", description="On-device unlearning for int8 models.")
    p.add_argument("--version", action="version", version=f"edge-qmul {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a .tflite model's ops, shapes, parameters, bytes and MACs")
    info.add_argument("model", help="path to an int8 .tflite model")
    info.set_defaults(func=_info)

    from .unlearn import DEFAULT_METHOD, METHODS
    un = sub.add_parser("unlearn", help="forget samples of the store from a model")
    un.add_argument("--model", required=True, help="the int8 .tflite the device runs")
    un.add_argument("--store", required=True, help="the sample store (SQLite)")
    un.add_argument("--owner", help="forget every sample of this owner")
    un.add_argument("--ids", help="forget the sample ids listed in this file, one per line")
    un.add_argument("--class", dest="label", type=int, help="forget a whole class")
    un.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS),
                    help=f"default {DEFAULT_METHOD}: the best measured gap to retrain (benchmarks/README.md)")
    un.add_argument("--table", help="similar-label table (JSON) from the host")
    un.add_argument("--allow-table-mismatch", action="store_true",
                    help="accept a table made for another model (same class count)")
    un.add_argument("--epochs", type=int, help="epoch cap")
    un.add_argument("--lr", type=float, help="learning rate")
    un.add_argument("--seed", type=int)
    un.add_argument("--retain-max", type=int, help="at most this many retain samples (class-stratified)")
    un.add_argument("--out", required=True, help="where to write the new model")
    un.add_argument("--report", help="where to write the report / forget certificate (JSON)")
    un.add_argument("--commit", action="store_true",
                    help="delete the forgotten samples and record the new model as active")
    un.set_defaults(func=_unlearn)

    st = sub.add_parser("store", help="the sample store: import, list, stats, verify")
    st_sub = st.add_subparsers(dest="store_command", required=True)
    imp = st_sub.add_parser("import", help="import samples (quantized with the model's input parameters)")
    imp.add_argument("store")
    imp.add_argument("--model", required=True, help="the model whose input quantization to use")
    imp.add_argument("--npz", help="x / y (or x_train / y_train), optional owners")
    imp.add_argument("--images", help="image folder: one subfolder per class")
    imp.add_argument("--owner", help="owner of every imported sample")
    imp.add_argument("--role", default="train", choices=("train", "validation"))
    for name in ("list", "stats", "verify"):
        cmd = st_sub.add_parser(name)
        cmd.add_argument("store")
        if name == "list":
            cmd.add_argument("--owner")
    st.set_defaults(func=_store)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .store import StoreError
    from .unlearn.similar_labels import TableError
    try:
        return args.func(args)
    except (ModelError, StoreError, TableError, CLIError) as e:
        print(f"edge-qmul: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
