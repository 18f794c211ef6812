"""A mosquitto setup for a fleet: config, password file, ACL and TLS certificates, by one command.

    edge-qmul broker-config /etc/edge-qmul/broker --device board-1 --device board-2 --port 8883

writes into DIR:

    mosquitto.conf      one listener (TLS unless --no-tls), no anonymous clients, the files below,
                        persistent sessions kept in DIR/data/ (queued messages survive a restart)
    passwd              one user per device (its id) and one fleet host user, PBKDF2-SHA512 hashes
                        in mosquitto's own `$7$` format (what mosquitto_passwd writes), mode 600
    acl                 a device may publish only on PREFIX/ID/to_host and PREFIX/ID/status (its
                        retained presence) and subscribe only to PREFIX/ID/to_device; the host
                        user may use PREFIX/#
    passwords/ID.pw     each user's password (random, 256 bits), mode 600, for its password_file=
    ca.crt, ca.key      a CA made here (key mode 600): clients verify the broker with ca=ca.crt
    server.crt/.key     the broker's certificate for localhost, 127.0.0.1 and --hostname names

Running it again keeps the passwords and certificates already there and adds new devices. Nothing
secret is printed or logged: the passwords live only in their files. The broker never sees the
devices' frame keys; the frames are sealed end to end (transport/mqtt.py).
"""
from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import ipaddress
import os
import secrets
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .transport.mqtt import PREFIX, check_device_id, device_topics, status_topic

__all__ = ["BrokerConfig", "HOST_USER", "add_broker_command", "hash_password", "write_broker_config"]

HOST_USER = "edge_qmul_host"
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's own; the passwords are 256 random bits, not guessable
DEFAULT_PORTS = {True: 8883, False: 1883}


@dataclass
class BrokerConfig:
    """Where write_broker_config put things (paths only: never a password)."""

    directory: Path
    conf: Path
    passwd: Path
    acl: Path
    port: int
    bind: str
    tls: bool
    host_user: str
    prefix: str
    password_files: dict[str, Path] = field(default_factory=dict)  # user -> its password file
    ca: Path | None = None

    def url(self, device_id: str, role: str = "host", host: str | None = None) -> str:
        """The transport URL for `device_id` as `role` with this broker's user and password file."""
        user = self.host_user if role == "host" else device_id
        scheme = "mqtts" if self.tls else "mqtt"
        quote = urllib.parse.quote
        query = f"role={role}&username={user}&password_file={quote(str(self.password_files[user]))}"
        if self.tls:
            query += f"&ca={quote(str(self.ca))}"
        if self.prefix != PREFIX:
            query += f"&prefix={self.prefix}"
        return f"{scheme}://{host or self.bind}:{self.port}/{device_id}?{query}"


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """mosquitto's password-file hash: `$7$ITERATIONS$base64(salt)$base64(PBKDF2-SHA512)`."""
    salt = os.urandom(12) if salt is None else salt
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def _write(path: Path, text: str | bytes, secret: bool = False) -> None:
    """Write atomically (a temporary file renamed); a secret file is created with mode 600."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    try:
        os.write(fd, text.encode() if isinstance(text, str) else text)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _password(path: Path, given: str | None) -> str:
    if given is not None:
        _write(path, given + "\n", secret=True)
        return given
    if path.exists():  # kept across runs: the devices already hold it
        return path.read_text().strip()
    password = secrets.token_urlsafe(32)
    _write(path, password + "\n", secret=True)
    return password


def _certificates(directory: Path, hostnames: Iterable[str]) -> Path:
    """A CA and a server certificate signed by it (kept if present); returns the CA's path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_crt, ca_key = directory / "ca.crt", directory / "ca.key"
    srv_crt, srv_key = directory / "server.crt", directory / "server.key"
    pem = serialization.Encoding.PEM

    def key_pem(key) -> bytes:
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    now = datetime.datetime.now(datetime.timezone.utc)
    if ca_crt.exists() and ca_key.exists():
        ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        key = serialization.load_pem_private_key(ca_key.read_bytes(), None)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-qmul broker CA")])
        ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
              .not_valid_after(now + datetime.timedelta(days=3650))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                             critical=True)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
              .sign(key, hashes.SHA256()))
        _write(ca_key, key_pem(key), secret=True)
        _write(ca_crt, ca.public_bytes(pem))
    names = list(dict.fromkeys(["localhost", "127.0.0.1", *hostnames]))
    if srv_crt.exists() and srv_key.exists():
        current = x509.load_pem_x509_certificate(srv_crt.read_bytes())
        san = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have = {str(v) for v in san.get_values_for_type(x509.DNSName)}
        have |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
        if set(names) <= have:
            return ca_crt
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    skey = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca.subject).public_key(skey.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write(srv_key, key_pem(skey), secret=True)
    _write(srv_crt, cert.public_bytes(pem))
    return ca_crt


def write_broker_config(directory: str | os.PathLike, devices: dict[str, str] | Iterable[str], *,
                        host_user: str = HOST_USER, port: int | None = None, bind: str = "127.0.0.1",
                        tls: bool = True, prefix: str = PREFIX, hostnames: Iterable[str] = (),
                        run_as: str | None = None) -> BrokerConfig:
    """Write a mosquitto setup for `devices` (ids, or id -> password) into `directory`.

    Devices already in the directory (a password file under passwords/) stay. `port` defaults to
    8883 with TLS, 1883 without. `run_as` adds mosquitto's `user` option (the account it drops
    root privileges to; it must be able to read the files written here, which are owned by the
    caller and secret ones mode 600). Returns the paths; no password is returned or printed.
    """
    directory = Path(directory).resolve()
    if any(ch.isspace() or ch == "#" for ch in str(directory)):
        raise ValueError(f"{directory}: mosquitto.conf cannot name paths with spaces or '#'")
    given = dict(devices) if isinstance(devices, dict) else {d: None for d in devices}
    for device in given:
        check_device_id(device)
    check_device_id(host_user)
    if host_user in given:
        raise ValueError(f"the host user {host_user!r} cannot also be a device id")
    port = DEFAULT_PORTS[tls] if port is None else int(port)
    if not 0 < port < 65536:
        raise ValueError(f"port {port}: expected 1 to 65535")
    pw_dir = directory / "passwords"
    for d in (directory, pw_dir, directory / "data"):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    pw_dir.chmod(0o700)
    known = sorted(p.stem for p in pw_dir.glob("*.pw") if p.stem != host_user)
    fleet = sorted(set(known) | set(given))
    cfg = BrokerConfig(directory, directory / "mosquitto.conf", directory / "passwd", directory / "acl",
                       port, bind, tls, host_user, prefix)
    lines = []
    for user in [host_user, *fleet]:
        path = pw_dir / f"{user}.pw"
        lines.append(f"{user}:{hash_password(_password(path, given.get(user)))}")
        cfg.password_files[user] = path
    _write(cfg.passwd, "\n".join(lines) + "\n", secret=True)

    acl = [f"# generated by edge-qmul broker-config: every device on its own topics only",
           f"user {host_user}", f"topic readwrite {prefix}/#", ""]
    for device in fleet:
        to_device, to_host = device_topics(device, prefix)
        acl += [f"user {device}", f"topic read {to_device}", f"topic write {to_host}",
                f"topic write {status_topic(device, prefix)}", ""]
    _write(cfg.acl, "\n".join(acl), secret=True)

    conf = ["# generated by edge-qmul broker-config", "per_listener_settings false",
            "allow_anonymous false", f"password_file {cfg.passwd}", f"acl_file {cfg.acl}",
            "persistence true", f"persistence_location {directory / 'data'}/", "autosave_interval 30",
            "max_queued_messages 10000", "set_tcp_nodelay true"]
    if run_as:
        conf.append(f"user {run_as}")
    conf.append(f"listener {port} {bind}")
    if tls:
        cfg.ca = _certificates(directory, hostnames)
        conf += [f"cafile {cfg.ca}", f"certfile {directory / 'server.crt'}",
                 f"keyfile {directory / 'server.key'}", "tls_version tlsv1.2"]
    _write(cfg.conf, "\n".join(conf) + "\n")
    return cfg


def _broker_config(args: argparse.Namespace) -> int:
    from edge_qmul.api import CLIError

    try:
        cfg = write_broker_config(args.dir, args.device, host_user=args.host_user, port=args.port,
                                  bind=args.bind, tls=not args.no_tls, prefix=args.prefix,
                                  hostnames=args.hostname, run_as=args.run_as)
    except (ValueError, OSError) as e:
        raise CLIError(f"broker-config: {e}") from None
    print(f"wrote {cfg.conf} (listener {cfg.bind}:{cfg.port}, {'TLS' if cfg.tls else 'no TLS'}), "
          f"{cfg.passwd}, {cfg.acl}")
    print(f"passwords (mode 600, one per user; give each device its own): {cfg.directory / 'passwords'}/")
    print(f"run: mosquitto -c {cfg.conf}")
    example = next(user for user in cfg.password_files if user != cfg.host_user)
    host = args.hostname[0] if args.hostname else "BROKER" if cfg.bind in ("0.0.0.0", "::") else cfg.bind
    print(f"device URL, e.g.: {cfg.url(example, 'device', host)}")
    print(f"host URL, e.g.:   {cfg.url(example, 'host', host)}")
    return 0


def add_broker_command(sub) -> None:
    """Add ``broker-config`` to the ``edge-qmul`` sub-command parsers ``sub``."""
    from edge_qmul.api import add_command

    bc = add_command(sub, "broker-config", "write a mosquitto config, password file, ACL and TLS "
                     "certificates for a fleet of devices (MQTT transport)", [
                         "edge-qmul broker-config broker/ --device board-1 --device board-2",
                         "edge-qmul broker-config broker/ --device board-3 --bind 0.0.0.0 --hostname mqtt.lan"])
    bc.add_argument("dir", help="where to write (created; existing passwords and certificates are kept)")
    bc.add_argument("--device", action="append", required=True, help="a device id (repeat for each)")
    bc.add_argument("--host-user", default=HOST_USER, help=f"the fleet host's user (default {HOST_USER})")
    bc.add_argument("--port", type=int, help="listener port (default 8883, or 1883 with --no-tls)")
    bc.add_argument("--bind", default="127.0.0.1", help="listener address (default 127.0.0.1)")
    bc.add_argument("--hostname", action="append", default=[],
                    help="a name or address the devices reach the broker by (put in its certificate)")
    bc.add_argument("--prefix", default=PREFIX, help=f"the topics' first level (default {PREFIX})")
    bc.add_argument("--run-as", help="the account mosquitto drops root privileges to (its `user` option)")
    bc.add_argument("--no-tls", action="store_true", help="plain MQTT (only on a network you trust)")
    bc.set_defaults(func=_broker_config)
