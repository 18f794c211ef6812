"""The `edge-qmul` command (device side): info, unlearn, store; other packages add commands.

The device agent's commands (``serve``, ``keygen``) belong to ``firmware_bridge``, which registers
them under the entry-point group ``edge_qmul.commands``: the engine never imports the bridge, and
``edge-qmul serve`` works wherever the bridge is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

from . import __version__
from .arithmetic import ENV, arithmetic
from .errors import CLIError, ModelError
from .forget import commit, run_forget
from .fsutil import atomic_write, sha256_file
from .jobs import SelectorError, parse_selector
from .state import StateDir, StateError, import_samples
from .store import Store, StoreError
from .tflite import load_tflite, save_tflite
from .unlearn import DEFAULT_CLASS_METHOD, DEFAULT_METHOD, METHODS
from .unlearn.similar_labels import TableError

COMMAND_GROUP = "edge_qmul.commands"  # entry points: f(subparsers) adds sub-commands


def _info(args: argparse.Namespace) -> int:
    try:
        model = load_tflite(args.model)
    except ModelError as e:
        if not e.unsupported:
            raise
        # the whole distance at once: every op without a kernel, with its count and positions
        total = sum(len(v) for v in e.unsupported.values())
        print(f"{args.model}: not supported: {total} op(s) of {len(e.unsupported)} kind(s) have no kernel",
              file=sys.stderr)
        for kind, where in sorted(e.unsupported.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            shown = ", ".join(map(str, where[:12])) + (", ..." if len(where) > 12 else "")
            print(f"  {kind:<32} x{len(where):<4} at op index {shown}", file=sys.stderr)
        return 2
    print(f"model: {args.model}")
    print(f"sha256: {sha256_file(args.model)}")
    print(f"size: {Path(args.model).stat().st_size} bytes")
    print(f"arithmetic: LiteRT on {model.litert.platform}")
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
                from tqdm import tqdm  # optional (a host extra): without it, plain lines
                self.tqdm = tqdm
            except ImportError:
                self.tqdm = None
        else:
            self.tqdm = None

    def __call__(self, info: dict) -> None:
        total = info.get("steps", 0) * info.get("epochs", 1)
        done = info.get("epoch", 0) * info.get("steps", 0) + info.get("step", 0)
        if info.get("max_passes"):  # a work budget: count work (the epoch cap or the rule may end it sooner)
            total, done = info["max_passes"], info.get("sample_passes", 0)
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

def _overrides(args: argparse.Namespace) -> dict:
    return {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("seed", args.seed),
                              ("budget", args.budget)) if v is not None}


def _unlearn(args: argparse.Namespace) -> int:
    selector = parse_selector(args.owner, args.ids, args.label)
    progress = Progress()
    warn = lambda m: print(f"edge-qmul: {m}", file=sys.stderr)  # noqa: E731
    if args.state is not None:
        cert, out_path = _unlearn_state(args, selector, progress, warn)
    else:
        cert, out_path = _unlearn_files(args, selector, progress, warn)
    progress.close()
    if args.report:
        atomic_write(args.report, (json.dumps(cert, indent=1, sort_keys=True) + "\n").encode())
    print(f"forgot {cert['n_forgotten']} samples with {cert['method']} in {cert['wall_s']:.2f} s "
          f"({cert['steps']} steps{', stopped by the held-out rule' if cert['stopped_by_rule'] else ''})")
    for key in ("UA", "RA", "VA", "MIA"):
        b, a = cert["metrics_before"][key], cert["metrics_after"][key]
        if a is not None:
            print(f"  {key}: {b:.2f} -> {a:.2f}")
    print(f"  model {cert['model_before_sha256'][:12]} -> {cert['model_after_sha256'][:12]} written to {out_path}")
    print("  samples deleted from the store" if cert["committed"] else
          "  samples still in the store: run again with --commit to delete them")
    return 0


def _unlearn_state(args, selector: dict, progress, warn) -> tuple[dict, Path]:
    """A job in the device's state directory, run and committed exactly as the agent does."""
    for name in ("model", "store"):
        if getattr(args, name) is not None:
            raise CLIError(f"--{name} and --state exclude each other: the state directory holds both")
    if not Path(args.state).is_dir():
        raise CLIError(f"--state {args.state}: no such directory")
    with StateDir(args.state) as state:
        table = state.add("table", Path(args.table).read_bytes()) if args.table else None
        job = state.new_job(selector, args.method, _overrides(args), table, args.retain_max)
        state.run_job(job, progress, warn, allow_table_mismatch=args.allow_table_mismatch)
        cert = state.commit_job(job) if args.commit else job.certificate
        out_path = Path(cert["model_after_path"])
        if args.out:
            out_path = atomic_write(args.out, out_path.read_bytes())
    return cert, out_path


def _unlearn_files(args, selector: dict, progress, warn) -> tuple[dict, Path]:
    """A model file and a store file anywhere: the new model goes to --out."""
    for name in ("model", "store", "out"):
        if getattr(args, name) is None:
            raise CLIError(f"--{name} is required (or give --state DIR, a device's state directory)")
    model_path, out_path = Path(args.model), Path(args.out)
    if out_path.resolve() == model_path.resolve():
        raise CLIError("--out must differ from --model: the original model stays as it is")
    if not Path(args.store).is_file():
        raise CLIError(f"--store {args.store}: no such file")
    if not model_path.is_file():
        raise CLIError(f"--model {model_path}: no such file")
    with Store(args.store) as store:
        run = run_forget(model_path, store, selector, args.method, _overrides(args), args.table,
                         args.allow_table_mismatch, args.retain_max,
                         save_model=lambda m: save_tflite(m, out_path), progress=progress, warn=warn)
        cert = commit(store, run.certificate, run.forget_ids) if args.commit else run.certificate
    return cert, out_path


# --- store ---------------------------------------------------------------------------------------

def _store(args: argparse.Namespace) -> int:
    if args.store_command == "import":
        if not (args.npz or args.images):
            raise CLIError("store import needs --npz FILE or --images DIR")
        model = load_tflite(args.model)
        with Store(args.store, create=True) as store:
            ids = import_samples(store, model, npz=args.npz, images=args.images, owner=args.owner,
                                 role=args.role)
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


def add_command(sub, name: str, help: str, example: str | list[str]) -> argparse.ArgumentParser:
    """A sub-command whose ``--help`` ends with one or more examples."""
    examples = [example] if isinstance(example, str) else example
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="example" + ("s" if len(examples) > 1 else "") + ":\n"
                                 + "\n".join(f"  {e}" for e in examples))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-qmul", description="On-device unlearning for int8 models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  edge-qmul info model.tflite\n"
               "  edge-qmul store import store.db --model model.tflite --npz data.npz --owner alice\n"
               "  edge-qmul unlearn --model model.tflite --store store.db --owner alice --out new.tflite "
               "--report forget.json --commit\n"
               "  edge-qmul unlearn --state /var/lib/edge-qmul --owner alice --commit\n"
               "  edge-qmul keygen device.key\n"
               "  edge-qmul serve --serial /dev/ttyUSB0 --state /var/lib/edge-qmul --key-file device.key")
    p.add_argument("--version", action="version", version=f"edge-qmul {__version__}")
    p.add_argument("--litert", metavar="PLATFORM",
                   help="compute as the LiteRT of this platform does: x86_64 or aarch64 (default: "
                        "$EDGE_QMUL_LITERT, else this machine's), e.g. on a host, what a board computes")
    sub = p.add_subparsers(dest="command", required=True)
    info = add_command(sub, "info", "print a .tflite model's ops, shapes, parameters, bytes and MACs",
                       "edge-qmul info model.tflite")
    info.add_argument("model", help="path to an int8 .tflite model")
    info.set_defaults(func=_info)

    un = add_command(sub, "unlearn", "forget samples of the store from a model", [
        "edge-qmul unlearn --model model.tflite --store store.db --owner alice --out new.tflite",
        "edge-qmul unlearn --model model.tflite --store store.db --ids ids.txt --method qmul --table table.json "
        "--out new.tflite --report forget.json --commit",
        "edge-qmul unlearn --state /var/lib/edge-qmul --owner alice --commit   # as the agent would"])
    un.add_argument("--state", help="a device's state directory (edge-qmul serve --state): its active model "
                                    "and store; the job, the new model and the commit go where the agent's do")
    un.add_argument("--model", help="the int8 .tflite the device runs (without --state)")
    un.add_argument("--store", help="the sample store (SQLite) (without --state)")
    un.add_argument("--owner", help="forget every sample of this owner")
    un.add_argument("--ids", help="forget the sample ids listed in this file, one per line")
    un.add_argument("--class", dest="label", type=int, help="forget a whole class")
    un.add_argument("--method", default=None, choices=sorted(METHODS),
                    help=f"default: {DEFAULT_METHOD} (an owner, listed ids) or {DEFAULT_CLASS_METHOD} (--class), "
                         "from the measured comparison (benchmarks/README.md)")
    un.add_argument("--table", help="similar-label table (JSON) from the host")
    un.add_argument("--allow-table-mismatch", action="store_true",
                    help="accept a table made for another model (same class count)")
    un.add_argument("--epochs", type=int, help="epoch cap")
    un.add_argument("--budget", type=float,
                    help="work cap as a fraction of retraining's sample-passes (e.g. 0.1; benchmarks/README.md)")
    un.add_argument("--lr", type=float, help="learning rate")
    un.add_argument("--seed", type=int)
    un.add_argument("--retain-max", type=int, help="at most this many retain samples (class-stratified)")
    un.add_argument("--out", help="where to write the new model (with --state: a copy of it)")
    un.add_argument("--report", help="where to write the report / forget certificate (JSON)")
    un.add_argument("--commit", action="store_true",
                    help="delete the forgotten samples and record the new model as active")
    un.set_defaults(func=_unlearn)

    st = add_command(sub, "store", "the sample store: import, list, stats, verify",
                     ["edge-qmul store import store.db --model model.tflite --npz data.npz",
                      "edge-qmul store stats store.db"])
    st_sub = st.add_subparsers(dest="store_command", required=True)
    imp = add_command(st_sub, "import", "import samples (quantized with the model's input parameters)", [
        "edge-qmul store import store.db --model model.tflite --npz data.npz   # owners from the file",
        "edge-qmul store import store.db --model model.tflite --images photos/ --owner alice"])
    imp.add_argument("store")
    imp.add_argument("--model", required=True, help="the model whose input quantization to use")
    imp.add_argument("--npz", help="x / y (or x_train / y_train), optional owners")
    imp.add_argument("--images", help="image folder: one subfolder per class")
    imp.add_argument("--owner", help="owner of every imported sample")
    imp.add_argument("--role", default="train", choices=("train", "validation"))
    for name, what, extra in (("list", "list the stored samples (id, owner, label, role)", " --owner alice"),
                              ("stats", "count samples per owner, label and role; requests; audit rows", ""),
                              ("verify", "check integrity, every row's digest and the audit hash chain", "")):
        cmd = add_command(st_sub, name, what, f"edge-qmul store {name} store.db{extra}")
        cmd.add_argument("store")
        if name == "list":
            cmd.add_argument("--owner")
    st.set_defaults(func=_store)
    for plugin in entry_points(group=COMMAND_GROUP):
        try:
            add_commands = plugin.load()
        except ImportError:  # its package's dependencies are not installed here: no such commands
            continue
        add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = os.environ.get(ENV)
    try:
        if args.litert is not None:
            os.environ[ENV] = arithmetic(args.litert).platform  # every model the command loads
        return args.func(args)
    except (ModelError, StoreError, TableError, CLIError, StateError, SelectorError) as e:  # ForgetError: a ModelError
        print(f"edge-qmul: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a port that will not open, an address in use, a missing file
        where = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"edge-qmul: error: {where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge-qmul: interrupted; nothing was committed (files are written atomically)", file=sys.stderr)
        return 130
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous


if __name__ == "__main__":
    sys.exit(main())
