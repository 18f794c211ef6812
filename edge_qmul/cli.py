"""The `edge-qmul` command (device side): info, unlearn, store."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import ModelError


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _info(args: argparse.Namespace) -> int:
    from .tflite import load_tflite
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
    data = Path(args.model).read_bytes()
    print(f"model: {args.model}")
    print(f"sha256: {hashlib.sha256(data).hexdigest()}")
    print(f"size: {len(data)} bytes")
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
                from tqdm import tqdm
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
    from .fsutil import atomic_write
    from .forget import commit, run_forget
    from .store import Store

    model_path, out_path = Path(args.model), Path(args.out)
    if out_path.resolve() == model_path.resolve():
        raise CLIError("--out must differ from --model: the original model stays as it is")
    selector = _selector(args)
    if not Path(args.store).is_file():
        raise CLIError(f"--store {args.store}: no such file")
    if not model_path.is_file():
        raise CLIError(f"--model {model_path}: no such file")
    overrides = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("seed", args.seed),
                                   ("budget", args.budget)) if v is not None}
    progress = Progress()
    with Store(args.store) as store:
        cert = run_forget(model_path, store, selector, args.method, overrides, args.table,
                          args.allow_table_mismatch, args.retain_max, out_path, progress,
                          warn=lambda m: print(f"edge-qmul: {m}", file=sys.stderr))
        progress.close()
        if args.commit:
            cert = commit(store, cert)
        else:
            cert.pop("_forget_ids")
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


def _serve(args: argparse.Namespace) -> int:
    import logging
    from firmware_bridge.device import Agent, KeyFileError, read_key, serve
    from firmware_bridge.transport import SerialTransport, TcpListener
    logging.basicConfig(level=logging.INFO, format='{"time": "%(asctime)s", "level": "%(levelname)s", '
                        '"logger": "%(name)s", "message": "%(message)s"}')
    try:
        key = read_key(args.key_file)
    except KeyFileError as e:
        raise CLIError(str(e)) from None
    if args.threads is not None:
        import numba
        if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
            raise CLIError(f"--threads {args.threads}: must be between 1 and {numba.config.NUMBA_NUM_THREADS}")
    agent = Agent(args.state, threads=args.threads)
    if args.serial:
        serve(SerialTransport(args.serial), agent, key)
        return 0
    host, _, port = args.listen.rpartition(":")
    if not port.isdigit():
        raise CLIError(f"--listen {args.listen!r}: expected HOST:PORT")
    listener = TcpListener(host or "127.0.0.1", int(port))
    print(f"listening on {listener.address[0]}:{listener.address[1]}", flush=True)
    while True:  # one host at a time; the next connection gets the same state
        transport = listener.accept(timeout=None)
        serve(transport, agent, key)


def _keygen(args: argparse.Namespace) -> int:
    from firmware_bridge.device import write_key
    try:
        path = write_key(args.key_file)
    except FileExistsError:
        raise CLIError(f"{args.key_file} exists: a key is never overwritten") from None
    print(f"wrote a 32-byte key to {path} (mode 600)")
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

    from .unlearn import DEFAULT_CLASS_METHOD, DEFAULT_METHOD, METHODS
    un = add_command(sub, "unlearn", "forget samples of the store from a model", [
        "edge-qmul unlearn --model model.tflite --store store.db --owner alice --out new.tflite",
        "edge-qmul unlearn --model model.tflite --store store.db --ids ids.txt --method qmul --table table.json "
        "--out new.tflite --report forget.json --commit"])
    un.add_argument("--model", required=True, help="the int8 .tflite the device runs")
    un.add_argument("--store", required=True, help="the sample store (SQLite)")
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
    un.add_argument("--out", required=True, help="where to write the new model")
    un.add_argument("--report", help="where to write the report / forget certificate (JSON)")
    un.add_argument("--commit", action="store_true",
                    help="delete the forgotten samples and record the new model as active")
    un.set_defaults(func=_unlearn)

    sv = add_command(sub, "serve", "run the device agent (firmware_bridge) on a serial line or TCP", [
        "edge-qmul serve --serial /dev/ttyUSB0 --state /var/lib/edge-qmul --key-file device.key",
        "edge-qmul serve --listen 0.0.0.0:7070 --state /var/lib/edge-qmul --key-file device.key"])
    where = sv.add_mutually_exclusive_group(required=True)
    where.add_argument("--serial", help="a pyserial URL or device, e.g. /dev/ttyUSB0")
    where.add_argument("--listen", help="HOST:PORT to listen on (TCP)")
    sv.add_argument("--state", required=True, help="the device's state directory")
    sv.add_argument("--key-file", required=True, help="the 32-byte pre-shared key (mode 0600)")
    sv.add_argument("--threads", type=int, help="compute threads for unlearning (default: every core; "
                    "1 on a board whose other cores are kept busy, where parallel kernels wait for them)")
    sv.set_defaults(func=_serve)
    kg = add_command(sub, "keygen", "write a new 32-byte pre-shared key with mode 0600",
                     "edge-qmul keygen device.key   # then copy it to the host over a channel you trust")
    kg.add_argument("key_file")
    kg.set_defaults(func=_keygen)

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .store import StoreError
    from .unlearn.similar_labels import TableError
    from .arithmetic import ENV, arithmetic
    previous = os.environ.get(ENV)
    try:
        if args.litert is not None:
            os.environ[ENV] = arithmetic(args.litert).platform  # every model the command loads
        return args.func(args)
    except (ModelError, StoreError, TableError, CLIError) as e:  # ForgetError is a ModelError
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
