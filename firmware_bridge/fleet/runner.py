"""The fleet's runner: it works through the registry's deliveries by talking to the devices.

The idea: every delivery moves forward by small *steps*, each one short exchange with one device
(JOB_STATUS, FORGET, COMMIT, GET), and every step's outcome is written to the registry before the
next. A scheduler hands steps to a few worker threads, at most one per device, and never waits on a
device: a job that is still running is looked at again a second later, and a device that does not
answer HELLO is offline, so its delivery stays pending and is tried again every `poll_s` seconds
(or as soon as its presence says `online`, when the broker carries presence: fleet/presence.py).

Exactly once. A delivery's FORGET carries its job key; the device makes the key its job id and
answers a FORGET whose key it knows with that job. Before any FORGET, the runner asks JOB_STATUS of
the key: a job the device already has (a FORGET whose reply was lost, a fleet process restarted
mid-step) is followed, never started again. COMMIT is idempotent on the device too (the commit of a
committed job returns its certificate). A job the agent's start-up recovery failed ("interrupted":
the agent died while it ran, nothing was committed) is started again as the delivery's next
attempt (a new key), up to `max_attempts` jobs; the report lists the earlier ones. After COMMIT
the runner pulls the whole certificate (jobs/<id>.json) and the active model (`current`) and
checks sha256(current) equals the certificate's model_after_sha256.

Stale HELLOs. Over MQTT, the HELLOs sent to an offline device wait in its broker session and reach
it in a burst when it returns: it answers each, and the host's Client ignores every HELLO_ACK
whose host nonce is not the one it is waiting for (channel.py), so they are harmless. Nothing else
is sent to a device that has not answered a HELLO. The fleet never logs keys or passwords.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

from ..channel import ChannelError, Client, RemoteError
from ..device import KeyFileError, read_key
from ..frames import MsgType
from ..host import DeviceClient
from ..transport import Transport, TransportError, open_transport
from .registry import FleetError, Registry, canonical_json

__all__ = ["Fleet", "Offline"]

log = logging.getLogger("firmware_bridge.fleet")


class Offline(FleetError):
    """A device did not answer (no HELLO_ACK, or a request without a reply): try again later."""


@dataclass
class Link:
    transport: Transport
    client: Client


def _close_quietly(link: Link) -> None:
    try:
        link.transport.close()
    except Exception:  # noqa: BLE001 - closing what may already be gone
        pass


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Fleet:
    """The devices of one registry, as the runner talks to them.

    `hello_timeout` bounds a HELLO (an offline device costs that much per try); `reply_timeout`
    bounds one reply; `poll_s` is how often a device that was offline is tried again.
    """

    # Links kept open at most (least recently used closed first): paho's network loop uses
    # select(), which fails on fds >= 1024, and each link holds 3 fds; 200 leaves room.
    max_links = 200

    def __init__(self, registry: Registry, *, hello_timeout: float = 2.0, reply_timeout: float = 3.0,
                 poll_s: float = 10.0, job_poll_s: float = 1.0, workers: int = 8,
                 on_event: Callable[[str], None] | None = None, presence=None, max_attempts: int = 3) -> None:
        self.registry = registry
        self.hello_timeout, self.reply_timeout = hello_timeout, reply_timeout
        self.poll_s, self.job_poll_s, self.workers = poll_s, job_poll_s, workers
        self.on_event = on_event or (lambda msg: None)
        self.presence = presence  # an optional presence watcher: .online(device_id) -> bool | None
        self.max_attempts = max_attempts  # jobs per delivery when agents die mid-job (then: failed)
        self._links: dict[str, Link] = {}
        self._links_lock = threading.Lock()

    def close(self) -> None:
        with self._links_lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            try:
                link.transport.close()
            except Exception:  # noqa: BLE001 - closing what may already be gone
                pass
        if self.presence is not None:
            self.presence.close()

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _event(self, msg: str) -> None:
        log.info("%s", msg)
        self.on_event(msg)

    # --- links ---
    def open_link(self, device_id: str, url: str, key_file: str) -> Link:
        try:
            key = read_key(key_file)
        except KeyFileError as e:
            raise FleetError(f"device {device_id}: {e}") from None
        try:
            transport = open_transport(url, timeout=0.2)
        except TransportError as e:  # the broker is down or refuses us: nothing reached the device
            raise Offline(f"device {device_id}: {e}") from None
        return Link(transport, Client(transport, key, timeout=self.hello_timeout, retries=1))

    def contact(self, device_id: str, url: str | None = None, key_file: str | None = None) -> DeviceClient:
        """A DeviceClient with a live session to the device (at the registry's URL and key file,
        unless given); Offline if it does not answer HELLO."""
        with self._links_lock:
            link = self._links.pop(device_id, None)
            if link is not None:
                self._links[device_id] = link  # least recently used first
        if link is None:
            if url is None or key_file is None:
                dev = self.registry.device(device_id)
                url, key_file = dev["url"], dev["key_file"]
            link = self.open_link(device_id, url, key_file)
            with self._links_lock:
                self._links[device_id] = link
                extra = len(self._links) - self.max_links // 2 if len(self._links) > self.max_links else 0
                evicted = [self._links.pop(d) for d in list(self._links)[:extra]]
            self._release(evicted)  # scale: paho's select() cannot watch fds >= 1024 (3 fds per link)
        if link.client.session is None:
            link.client.timeout, link.client.retries = self.hello_timeout, 1
            try:
                link.client.connect()
            except ChannelError:
                raise Offline(f"device {device_id}: no answer to HELLO within {self.hello_timeout} s") from None
            except TransportError as e:
                raise Offline(f"device {device_id}: {e}") from None
            link.client.timeout, link.client.retries = self.reply_timeout, 3
        return DeviceClient(link.client)

    def close_link(self, device_id: str) -> None:
        """Close the device's link (a delivery that ended): it is opened again when needed."""
        with self._links_lock:
            link = self._links.pop(device_id, None)
        if link is not None:
            self._release([link])

    def _release(self, links: list[Link]) -> None:
        """Close links (each transport frees its sockets as it closes)."""
        for link in links:
            _close_quietly(link)

    def drop_session(self, device_id: str) -> None:
        with self._links_lock:
            link = self._links.get(device_id)
        if link is not None:
            link.client.session = None

    def refresh(self, device_id: str) -> dict:
        """Contact the device and record its INFO (owners, model, samples, last seen)."""
        try:
            info = self.contact(device_id).info()
        except (ChannelError, TransportError) as e:
            self.drop_session(device_id)
            raise Offline(f"device {device_id}: {e}") from None
        self.registry.seen(device_id, info)
        return info

    def refresh_all(self, device_ids: list[str] | None = None) -> dict[str, str]:
        """Refresh every (or the given) device at once; {device_id: "online" | "offline" | error}."""
        ids = [d["id"] for d in self.registry.devices()] if device_ids is None else device_ids
        out: dict[str, str] = {}

        def one(device_id: str) -> None:
            if self.presence is not None and self.presence.online(device_id) is False:
                out[device_id] = "offline"
                return
            try:
                self.refresh(device_id)
                out[device_id] = "online"
            except Offline:
                out[device_id] = "offline"
            except FleetError as e:
                out[device_id] = str(e)
        with ThreadPoolExecutor(max(1, min(self.workers, len(ids)))) as pool:
            list(pool.map(one, ids))
        return out

    # --- one step of one delivery ---
    def step(self, delivery: dict) -> float | None:
        """Move a delivery forward as far as it goes without waiting; the seconds until it should be
        looked at again, or None once it has ended (committed, done without --commit, failed)."""
        rid, did = delivery["request_id"], delivery["device_id"]
        req = self.registry.request(rid)
        if self.presence is not None and self.presence.online(did) is False:
            return self.poll_s
        try:
            dev = self.contact(did)
            self.registry.seen(did)
            return self._advance(dev, req, delivery)
        except Offline as e:
            self.drop_session(did)
            self._note(rid, did, delivery, str(e))
            return self.poll_s
        except (ChannelError, TransportError) as e:  # it went away mid-step: nothing is lost
            self.drop_session(did)
            self._note(rid, did, delivery, f"device {did}: {e}")
            return self.poll_s
        except RemoteError as e:
            if e.code in ("busy", "not_ready"):  # another job is open there: try again later
                self._note(rid, did, delivery, f"device {did}: {e.code}: {e.message}")
                return self.poll_s
            self.registry.update_delivery(rid, did, status="failed", error=f"{e.code}: {e.message}")
            self._event(f"{did}: request {rid} failed: {e.code}: {e.message}")
            return None

    def _note(self, rid: str, did: str, delivery: dict, error: str) -> None:
        if delivery.get("error") != error:
            self.registry.update_delivery(rid, did, error=error)
            delivery["error"] = error

    def _advance(self, dev: DeviceClient, req: dict, d: dict) -> float | None:
        rid, did, key = d["request_id"], d["device_id"], d["job_key"]
        status = d["status"]
        if status in ("pending", "sent"):
            try:
                job = dev.status(key)
            except RemoteError as e:
                if e.code != "not_found":
                    raise
                job = None
            if job is None:
                body = {"selector": {"owner": req["owner"]}, "method": req["method"], "params": req["params"],
                        "job_key": key}
                job_id = dev.client.request(MsgType.FORGET, body)["job_id"]
                d.update(self.registry.update_delivery(rid, did, status="sent", job_id=job_id, error=None))
                self._event(f"{did}: job {job_id} sent (request {rid}, owner {req['owner']})")
                return self.job_poll_s
            if status == "pending":
                d.update(self.registry.update_delivery(rid, did, status="sent", job_id=key, error=None))
            if job["status"] in ("queued", "running"):
                return self.job_poll_s
            if job["status"] in ("failed", "rolled_back"):
                result = dev.result(key)
                why = result.get("error") or f"the job was {job['status']}"
                if job["status"] == "failed" and str(why).startswith("interrupted") \
                        and d["attempts"] + 1 < self.max_attempts:
                    # the agent died mid-job and its recovery failed it: nothing was committed, so
                    # the delivery starts again as a new attempt (a new key; the failed job stays)
                    d.update(self.registry.next_attempt(rid, did, error=f"job {key} failed: {why}"))
                    self._event(f"{did}: job {key} interrupted ({why}); attempt {d['attempts'] + 1} "
                                f"as job {d['job_key']}")
                    return 0.0
                self.registry.update_delivery(rid, did, status="failed", error=f"job {key} {job['status']}: {why}")
                self._event(f"{did}: job {key} {job['status']}: {why}")
                return None
            d.update(self.registry.update_delivery(rid, did, status="done", error=None))
            if job["status"] == "done":
                self._event(f"{did}: job {key} done")
        if d["status"] == "done":
            if not req["commit"]:
                cert = dev.certificate(key)
                self.registry.update_delivery(rid, did, certificate=cert,
                                              certificate_sha256=_sha256(canonical_json(cert).encode()))
                self._refresh_quietly(dev, did)
                return None
            return self._commit(dev, rid, did, key)
        return None

    def _commit(self, dev: DeviceClient, rid: str, did: str, key: str) -> None:
        dev.commit(key)  # a committed job's commit returns its certificate again
        cert = dev.certificate(key)
        model = dev.pull("current")
        pulled = _sha256(model)
        fields = dict(certificate=cert, certificate_sha256=_sha256(canonical_json(cert).encode()),
                      model_sha256_pulled=pulled)
        if not cert.get("committed") or pulled != cert.get("model_after_sha256"):
            why = (f"the device's model {pulled[:12]} is not the certificate's model_after_sha256 "
                   f"{str(cert.get('model_after_sha256'))[:12]}" if cert.get("committed") else
                   "the certificate does not say committed")
            self.registry.update_delivery(rid, did, status="failed", error=why, **fields)
            self._event(f"{did}: job {key}: {why}")
            return None
        self.registry.update_delivery(rid, did, status="committed", error=None, **fields)
        self._event(f"{did}: job {key} committed, model {pulled[:12]}")
        self._refresh_quietly(dev, did)
        return None

    def _refresh_quietly(self, dev: DeviceClient, did: str) -> None:
        try:
            self.registry.seen(did, dev.info())
        except (ChannelError, TransportError, RemoteError):
            pass

    # --- the scheduler ---
    def _active(self, request_ids: set[str] | None) -> dict[str, dict]:
        """Per device, the delivery to work on: the oldest request's (a device runs one job at a time)."""
        commits = {r["id"]: r["commit"] for r in self.registry.requests()}
        out: dict[str, dict] = {}
        for d in sorted(self.registry.deliveries(open_only=True), key=lambda d: d["request_id"]):
            if request_ids is not None and d["request_id"] not in request_ids:
                continue
            if d["status"] == "done" and not commits.get(d["request_id"]):
                continue
            out.setdefault(d["device_id"], d)
        return out

    def run(self, request_ids: list[str] | None = None, wait_all: bool = True,
            timeout: float | None = None, stop: Callable[[], bool] = lambda: False) -> bool:
        """Work through the open deliveries (of `request_ids`, else all). With `wait_all`, until none
        is left (True) or `timeout` passes (False); without, one step per device (True if none is
        left). The registry is read again every round: a request added meanwhile is taken up too."""
        ids = set(request_ids) if request_ids is not None else None
        deadline = None if timeout is None else time.monotonic() + timeout
        due: dict[str, float] = {}
        due_set: dict[str, float] = {}
        inflight: dict[Future, str] = {}
        stepped: set[str] = set()
        with ThreadPoolExecutor(max(1, self.workers), thread_name_prefix="fleet") as pool:
            while True:
                active = self._active(ids)
                busy = set(inflight.values())
                if not active and not busy:
                    return True
                if not wait_all and not busy and set(active) <= stepped:
                    return not active
                if stop() or (deadline is not None and time.monotonic() > deadline):
                    if not busy:
                        return False
                now = time.monotonic()
                for did, d in active.items():
                    back = (self.presence is not None and self.presence.online(did)
                            and self.presence.changed(did) > due_set.get(did, 0))  # came back: now
                    if did in busy or (due.get(did, 0) > now and not back) or stop():
                        continue
                    if not wait_all and did in stepped:
                        continue
                    if deadline is not None and now > deadline:
                        continue
                    if self.presence is not None and self.presence.online(did) is False:
                        stepped.add(did)  # offline: looked at again when its presence changes
                        continue
                    stepped.add(did)
                    inflight[pool.submit(self.step, d)] = did
                if inflight:
                    done, _ = wait(list(inflight), timeout=0.2, return_when=FIRST_COMPLETED)
                    for fut in done:
                        did = inflight.pop(fut)
                        try:
                            delay = fut.result()
                        except FleetError as e:  # a key file gone bad: the delivery waits for a fix
                            self._event(f"{did}: {e}")
                            delay = self.poll_s
                        due_set[did] = time.monotonic()
                        due[did] = due_set[did] + (delay or 0.0)
                        if delay is None:  # this delivery ended: free its link (fds, broker session)
                            self.close_link(did)
                else:
                    if self.presence is not None:
                        self.presence.wait_change(0.2)
                    else:
                        time.sleep(0.2)
