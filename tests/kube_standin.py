"""A STAND-IN for a Kubernetes API server, used only by this project's tests; never shipped.

No real cluster, API server or kubelet can run on the machines the tests run on, so the
``kubernetes`` engine is tested against this stand-in instead.  It speaks the real wire
protocols the official ``kubernetes`` Python client uses, so the engine cannot tell it from a
cluster:

* HTTP/1.1 over TLS (a self-signed CA, written into the kubeconfig) with JSON bodies in the
  shapes of the Kubernetes API (lists, ``metav1.Status`` error bodies with the real reasons and
  codes), a bearer token checked on every request, label and field selectors,
  ``generateName``, resource versions and watches.  TLS ends in a relay thread per connection
  that forwards whatever has arrived in one write, as a proxy does: several WebSocket frames
  then share one TLS record;
* a kubeconfig file for ``kubernetes.config.load_kube_config(config_file=...)``;
* pods that are REAL Docker containers (docker SDK), started by a small "kubelet" thread that
  moves them through Pending and Running and records Events.  A pod has the host's network
  (so it reaches the stand-in on 127.0.0.1, as ``KUBERNETES_SERVICE_HOST`` says) unless a
  NetworkPolicy of its namespace denies its egress and ``enforce_network_policy`` is set (a
  CNI that enforces policies): then it has none;
* ``exec`` over an RFC 6455 WebSocket speaking ``v5.channel.k8s.io`` / ``v4.channel.k8s.io``
  with the kubelet's channel layout and its status message on channel 3, run through the
  docker exec API with stdin attached.  Authorised as a kubelet-facing API server does: a
  WebSocket exec (GET) needs ``get`` on ``pods/exec``, and also ``create`` from 1.35 on;
  a client that disconnects leaves its process running (kubernetes#89031);
* admission as a cluster does it where tests depend on it: Pod Security ``restricted`` or
  ``baseline`` enforced by the namespace label ``pod-security.kubernetes.io/enforce``, a
  ``default`` ServiceAccount that appears ``serviceaccount_delay`` seconds after its
  namespace (pods before then get the 403 "error looking up service account"), and 429 with
  Retry-After on request (``throttle``).

What it leaves out (and a real cluster has): RBAC objects (``allow`` decides instead),
PATCH/PUT, image pulls (only local images run: ``imagePullPolicy`` is ignored), more than one
container per pod, volumes other than ``emptyDir`` (a tmpfs, mode 0777 as the kubelet makes
it), NetworkPolicy rules other than "deny all egress", init containers and probes.  Grace
periods are honoured up to ``grace_cap`` seconds, so tests stay quick.  Every container it
makes is labelled ``pytest-isolation-standin=<server id>`` and ``stop()`` removes them all.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import math
import re
import secrets
import select
import shutil
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, cast
from urllib.parse import parse_qs, unquote, urlsplit

import docker
import docker.errors
import docker.utils
import trustme
import yaml

#: A JSON object as the API sends and receives it.
Obj = dict[str, Any]
#: Decides whether the stand-in's user may do ``verb`` on ``resource`` ("pods", "pods/exec").
Allow = Mapping[tuple[str, str], bool] | Callable[[str, str], bool]

#: Label on every container the stand-in makes; its value is the server id.
STANDIN_LABEL = "pytest-isolation-standin"
#: Label naming the pod (``namespace/name``) a container belongs to.
POD_LABEL = "pytest-isolation-standin.pod"
#: A pod whose ``spec.nodeSelector`` has this key is never scheduled.
UNSCHEDULABLE_KEY = "standin/unschedulable"
#: The one node pods are scheduled on.
NODE_NAME = "standin-node"
#: The user the kubeconfig names (and Forbidden messages quote).
USER_NAME = "standin-user"
#: Exec subprotocols, most preferred first.
PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
#: The characters the API server draws ``generateName`` suffixes from.
NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_MAX_MESSAGE = 64 * 1024 * 1024
_STDIN, _STDOUT, _STDERR, _ERROR, _RESIZE, _CLOSE = 0, 1, 2, 3, 4, 255
#: An image reference as a container runtime parses it (lowercase repository, tag, digest).
_IMAGE_RE = re.compile(
    r"[a-z0-9]+([._-]+[a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?"
)
_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SUFFIXES: dict[str, Decimal] = {
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
}
_QUANTITY_RE = re.compile(
    r"([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?"
)
#: Compute resources a ResourceQuota can limit here, and where a container states them.
_QUOTA_RESOURCES = {
    "limits.memory": ("limits", "memory"),
    "limits.cpu": ("limits", "cpu"),
    "requests.memory": ("requests", "memory"),
    "requests.cpu": ("requests", "cpu"),
    "memory": ("requests", "memory"),
    "cpu": ("requests", "cpu"),
}


# --- errors -----------------------------------------------------------------------------------


def status_body(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    """A ``metav1.Status`` failure body, as the API server sends with an error code."""
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details:
        body["details"] = details
    body["code"] = code
    return body


class ApiError(Exception):
    """An error the stand-in answers with a ``metav1.Status`` body."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: Obj | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = dict(headers or {})

    def body(self) -> Obj:
        return status_body(self.code, self.reason, self.message, self.details)


def _not_found(resource: str, name: str) -> ApiError:
    details = {"name": name, "kind": resource}
    return ApiError(404, "NotFound", f'{resource} "{name}" not found', details)


def _already_exists(resource: str, name: str) -> ApiError:
    details = {"name": name, "kind": resource}
    return ApiError(409, "AlreadyExists", f'{resource} "{name}" already exists', details)


def _forbidden(resource: str, name: str, why: str, causes: list[Obj] | None = None) -> ApiError:
    subject = f'{resource} "{name}"' if name else resource
    details: Obj = {"name": name, "kind": resource} if name else {"kind": resource}
    if causes:
        details["causes"] = causes
    return ApiError(403, "Forbidden", f"{subject} is forbidden: {why}", details)


def _invalid(kind: str, name: str, field: str, message: str) -> ApiError:
    cause = {"reason": "FieldValueInvalid", "message": message, "field": field}
    details = {"name": name, "kind": kind, "causes": [cause]}
    return ApiError(422, "Invalid", f'{kind} "{name}" is invalid: {field}: {message}', details)


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


class _ConfigError(Exception):
    """A pod the stand-in cannot turn into a container (CreateContainerConfigError)."""


class _ProtocolError(Exception):
    """A WebSocket peer broke RFC 6455; carries the close code to answer with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- API kinds --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    plural: str
    kind: str
    group: str
    version: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ("create", "delete", "get", "list", "watch")

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version(self) -> str:
        return self.api_version

    @property
    def singular(self) -> str:
        return self.kind.lower()


_KINDS = [
    _Kind("namespaces", "Namespace", "", "v1", False, ("ns",)),
    _Kind("pods", "Pod", "", "v1", True, ("po",)),
    _Kind("events", "Event", "", "v1", True, ("ev",)),
    _Kind("resourcequotas", "ResourceQuota", "", "v1", True, ("quota",)),
    _Kind("limitranges", "LimitRange", "", "v1", True, ("limits",)),
    _Kind("networkpolicies", "NetworkPolicy", "networking.k8s.io", "v1", True, ("netpol",)),
    _Kind(
        "selfsubjectaccessreviews",
        "SelfSubjectAccessReview",
        "authorization.k8s.io",
        "v1",
        False,
        verbs=("create",),
    ),
]
KINDS: dict[tuple[str, str], _Kind] = {(k.group_version, k.plural): k for k in _KINDS}
#: Subresources that discovery lists under their resource.
_SUBRESOURCES = {"pods": {"log": ("get",), "exec": ("create", "get")}}


# --- small helpers ----------------------------------------------------------------------------


def now_rfc3339(offset: float = 0.0) -> str:
    """The time as the API writes it: RFC 3339, seconds, UTC."""
    moment = datetime.now(timezone.utc) + timedelta(seconds=offset)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _docker_time(value: str | None) -> str:
    """A docker timestamp (nanoseconds) as the API writes times."""
    if not value or value.startswith("0001-"):
        return now_rfc3339()
    return value[:19] + "Z"


def parse_quantity(value: object) -> Decimal:
    """A Kubernetes resource quantity ("512Mi", "100m", "1.5", "2e3") as a number."""
    match = _QUANTITY_RE.fullmatch(str(value).strip())
    if match is None:
        raise ValueError(f"quantities must match the regular expression: {value!r}")
    try:
        return Decimal(match.group(1)) * _SUFFIXES[match.group(2) or ""]
    except InvalidOperation as error:
        raise ValueError(f"invalid quantity {value!r}") from error


def format_quantity(resource: str, amount: Decimal) -> str:
    """A quantity as the API server prints it: memory in binary units, CPU in millicores."""
    if resource.endswith("cpu"):
        if amount == amount.to_integral_value():
            return str(int(amount))
        return f"{int((amount * 1000).to_integral_value())}m"
    if resource == "pods":
        return str(int(amount))
    number = int(amount.to_integral_value())
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = int(_SUFFIXES[suffix])
        if number and number % unit == 0:
            return f"{number // unit}{suffix}"
    return str(number)


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part for part in parts if part.strip()]


_SELECTOR_TERM = re.compile(
    r"""\s*(?:
        !\s*(?P<absent>[^\s!=,()]+)
      | (?P<setkey>[^\s!=,()]+)\s+(?P<setop>in|notin)\s*\((?P<values>[^()]*)\)
      | (?P<eqkey>[^\s!=,()]+)\s*(?P<eqop>==|=|!=)\s*(?P<value>[^\s!=,()]*)
      | (?P<present>[^\s!=,()]+)
    )\s*""",
    re.VERBOSE,
)


def parse_label_selector(selector: str) -> list[tuple[str, str, frozenset[str]]]:
    """Requirements ``(key, operator, values)`` of a label selector.

    Operators: ``=`` (also ``==``), ``!=``, ``in``, ``notin``, ``exists`` (``a``) and ``!``
    (``!a``); requirements are comma-joined.  Raises ApiError 400 on a malformed selector.
    """
    requirements: list[tuple[str, str, frozenset[str]]] = []
    for term in _split_top_level(selector):
        match = _SELECTOR_TERM.fullmatch(term)
        if match is None:
            raise _bad_request(f"unable to parse requirement: found '{term.strip()}'")
        if match.group("absent"):
            requirements.append((match.group("absent"), "!", frozenset()))
        elif match.group("setkey"):
            values = frozenset(v.strip() for v in match.group("values").split(",") if v.strip())
            requirements.append((match.group("setkey"), match.group("setop"), values))
        elif match.group("eqkey"):
            operator = "!=" if match.group("eqop") == "!=" else "="
            requirements.append((match.group("eqkey"), operator, frozenset([match.group("value")])))
        else:
            requirements.append((match.group("present"), "exists", frozenset()))
    return requirements


def labels_match(
    requirements: list[tuple[str, str, frozenset[str]]], labels: Mapping[str, str]
) -> bool:
    """Whether ``labels`` satisfy every requirement of a parsed label selector."""
    for key, operator, values in requirements:
        present = key in labels
        if operator == "=" and not (present and labels[key] in values):
            return False
        if operator == "!=" and present and labels[key] in values:
            return False
        if operator == "in" and not (present and labels[key] in values):
            return False
        if operator == "notin" and present and labels[key] in values:
            return False
        if operator == "exists" and not present:
            return False
        if operator == "!" and present:
            return False
    return True


def parse_field_selector(selector: str) -> list[tuple[str, bool, str]]:
    """Terms ``(dotted path, equal, value)`` of a field selector (``a.b=c``, ``a!=c``)."""
    terms: list[tuple[str, bool, str]] = []
    for term in _split_top_level(selector):
        match = re.fullmatch(r"\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(\S*)\s*", term)
        if match is None:
            raise _bad_request(f"invalid selector: '{selector}'; can't understand '{term}'")
        terms.append((match.group(1), match.group(2) != "!=", match.group(3)))
    return terms


def _field(obj: Obj, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def fields_match(terms: list[tuple[str, bool, str]], obj: Obj) -> bool:
    return all((_field(obj, path) == value) == equal for path, equal, value in terms)


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in command, args and env values; ``$$`` escapes."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, text)


def _flag(query: Mapping[str, list[str]], name: str) -> bool:
    return (query.get(name) or ["false"])[-1].lower() in ("true", "1")


def _string_map(value: object, field: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _bad_request(
            f"json: cannot unmarshal into Go struct field ObjectMeta.{field} of type string"
        )
    return dict(value)


# --- WebSocket (RFC 6455, server side) --------------------------------------------------------


class _WebSocket:
    """The server end of a WebSocket over an upgraded HTTP connection."""

    def __init__(self, rfile: BinaryIO, sock: socket.socket) -> None:
        self._rfile = rfile
        self._sock = sock
        self._write_lock = threading.Lock()
        self.close_sent = False
        self.close_received = False

    def send(self, opcode: int, payload: bytes) -> bool:
        """Send one unfragmented frame; False once the peer is gone or closing was sent."""
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, length)
        elif length < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 127, length)
        with self._write_lock:
            if self.close_sent:
                return False
            try:
                self._sock.sendall(header + payload)
            except OSError:
                self.close_sent = True
                return False
            if opcode == _OP_CLOSE:
                self.close_sent = True
        return True

    def send_channel(self, channel: int, data: bytes) -> bool:
        return self.send(_OP_BINARY, bytes([channel]) + data)

    def close(self, code: int = 1000, reason: str = "") -> None:
        self.send(_OP_CLOSE, struct.pack("!H", code) + reason.encode()[:120])

    def _read_exact(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self._rfile.read(count - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _read_frame(self) -> tuple[bool, int, bytes]:
        first, second = self._read_exact(2)
        fin, opcode = bool(first & 0x80), first & 0x0F
        if first & 0x70:
            raise _ProtocolError(1002, "reserved bits set")
        if not second & 0x80:
            raise _ProtocolError(1002, "client frames must be masked")
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read_exact(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read_exact(8))
        if opcode >= 0x8 and (not fin or length > 125):
            raise _ProtocolError(1002, "bad control frame")
        if length > _MAX_MESSAGE:
            raise _ProtocolError(1009, "message too big")
        mask = self._read_exact(4)
        payload = self._read_exact(length)
        if length:
            key = int.from_bytes((mask * (length // 4 + 1))[:length], "big")
            payload = (int.from_bytes(payload, "big") ^ key).to_bytes(length, "big")
        return fin, opcode, payload

    def read_message(self) -> tuple[int, bytes] | None:
        """The next data or close message; answers pings.  None when the peer is gone."""
        opcode: int | None = None
        parts: list[bytes] = []
        size = 0
        try:
            while True:
                fin, frame_opcode, payload = self._read_frame()
                if frame_opcode == _OP_PING:
                    self.send(_OP_PONG, payload)
                    continue
                if frame_opcode == _OP_PONG:
                    continue
                if frame_opcode == _OP_CLOSE:
                    self.close_received = True
                    return _OP_CLOSE, payload
                if frame_opcode == _OP_CONT:
                    if opcode is None:
                        raise _ProtocolError(1002, "continuation without a message")
                elif frame_opcode in (_OP_TEXT, _OP_BINARY):
                    if opcode is not None:
                        raise _ProtocolError(1002, "new message inside a fragmented one")
                    opcode = frame_opcode
                else:
                    raise _ProtocolError(1002, f"unknown opcode {frame_opcode}")
                parts.append(payload)
                size += len(payload)
                if size > _MAX_MESSAGE:
                    raise _ProtocolError(1009, "message too big")
                if fin:
                    return opcode, b"".join(parts)
        except (EOFError, OSError, ValueError):
            return None


# --- the HTTP server --------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    standin: KubeStandIn

    def __init__(self, standin: KubeStandIn) -> None:
        self.standin = standin
        self.connections: dict[socket.socket, threading.Thread] = {}
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="kube-standin-http",
            daemon=True,
        )
        with self.connections_lock:
            self.connections[request] = thread
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.standin._record_error("http connection", None)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kube-standin/1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        standin = cast("_Server", self.server).standin
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            standin._serve(self, method, body)
        except ApiError as error:
            self.send_json(error.code, error.body(), error.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:
            standin._record_error(f"{method} {self.path}", error)
            self.send_json(500, status_body(500, "InternalError", f"stand-in failure: {error!r}"))

    def send_json(self, code: int, obj: Obj, headers: Mapping[str, str] | None = None) -> None:
        self.send_bytes(code, json.dumps(obj).encode(), "application/json", headers)

    def send_bytes(
        self, code: int, data: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        try:
            self.send_response(code)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-cache, private")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def start_chunked(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self) -> None:
        with contextlib.suppress(OSError):
            self.wfile.write(b"0\r\n\r\n")


class _TlsFront:
    """TLS for the server: accepts on 127.0.0.1, ends TLS, relays to the HTTP server.

    One thread per connection moves bytes both ways through non-blocking sockets with a
    buffer each way, so the TLS object is only ever used by that thread, and whatever has
    arrived goes on in one write (several WebSocket frames in one TLS record, as behind a
    proxy).
    """

    _LIMIT = 1 << 20

    def __init__(self, server: _Server, context: ssl.SSLContext, stopping: threading.Event):
        self.server = server
        self.context = context
        self.stopping = stopping
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept, name="kube-standin-tls", daemon=True)
        self.thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(10)
        for thread in list(self.threads):
            thread.join(10)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, address = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(
                target=self._relay, args=(conn, address), name="kube-standin-relay", daemon=True
            )
            self.threads = [t for t in self.threads if t.is_alive()] + [thread]
            thread.start()

    def _relay(self, conn: socket.socket, address: Any) -> None:
        try:
            conn.settimeout(10)
            tls = self.context.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError):
            conn.close()
            return
        inner, outer = socket.socketpair()
        self.server.process_request(inner, address)
        try:
            self._pump(tls, outer)
        except (OSError, ssl.SSLError):
            pass
        finally:
            outer.close()
            tls.close()

    def _pump(self, tls: ssl.SSLSocket, plain: socket.socket) -> None:
        tls.setblocking(False)
        plain.setblocking(False)
        up, down = bytearray(), bytearray()  # client to server, server to client
        client_done = server_done = half_closed = False
        while not self.stopping.is_set():
            if server_done and not down:
                return
            readers: list[socket.socket] = []
            if not client_done and len(up) < self._LIMIT:
                readers.append(tls)
            if not server_done and len(down) < self._LIMIT:
                readers.append(plain)
            writers = ([plain] if up else []) + ([tls] if down else [])
            ready = tls in readers and tls.pending() > 0
            readable, writable, _ = select.select(readers, writers, [], 0 if ready else 0.5)
            if ready or tls in readable:
                try:
                    data = tls.recv(65536)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    data = None
                if data == b"":
                    client_done = True
                elif data:
                    up += data
            if plain in readable:
                data = plain.recv(65536)
                if not data:
                    server_done = True
                down += data
            if plain in writable and up:
                del up[: plain.send(up)]
            if client_done and not up and not half_closed:
                half_closed = True
                with contextlib.suppress(OSError):
                    plain.shutdown(socket.SHUT_WR)
            if tls in writable and down:
                with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    del down[: tls.send(down)]


# --- the kubelet's view of a pod --------------------------------------------------------------


@dataclass
class _Runtime:
    """What the stand-in's kubelet knows of one pod (by uid)."""

    uid: str
    namespace: str
    name: str
    container: str
    image: str
    restart_policy: str
    stage: str = "new"  # new, unschedulable, pull-failed, config-error, running, backoff, exited
    container_id: str | None = None
    image_id: str = ""
    restart_count: int = 0
    next_action: float = 0.0
    backoff_reported: bool = False
    terminator: threading.Thread | None = None


# --- the stand-in -----------------------------------------------------------------------------


class KubeStandIn:
    """A stand-in Kubernetes API server on 127.0.0.1 with Docker containers as pods.

    Started on construction, stopped by ``stop()`` or leaving the ``with`` block, which removes
    every container it made.  Settable: ``token_valid`` (False: every request gets 401),
    ``allow`` (a ``{(verb, resource): bool}`` mapping, missing keys allowed, ``"*"`` matching
    any verb or resource; or a callable ``(verb, resource) -> bool``), ``grace_cap``,
    ``namespace_linger``, ``minor`` (the Kubernetes 1.x it claims to be),
    ``serviceaccount_delay``, ``enforce_network_policy``, ``drop_exec_status`` (end execs
    without their status message, as a kubelet's idle timeout does), ``hold_exec_upgrade``
    (accept execs and never answer), ``deletion_blocked`` (a message: namespaces stay
    Terminating with that condition, as when an aggregated API is down) and ``throttle()``.
    To inspect: ``namespaces``, ``objects`` (by plural, keyed by
    ``(namespace, name)``), ``pods``, ``events``, ``request_log`` (``(method, path)``),
    ``request_times``, ``access_reviews``, ``exec_log`` and ``errors`` (failures of the stand-in
    itself; tests should find it empty).
    """

    def __init__(self, directory: Path | None = None, *, token: str | None = None) -> None:
        self.server_id = uuid.uuid4().hex[:12]
        self.token = token or secrets.token_urlsafe(24)
        #: Longest grace period honoured, in seconds (a real cluster waits the full period).
        self.grace_cap = 1.0
        #: Shortest time a deleted namespace stays visible as Terminating.
        self.namespace_linger = 0.3
        self._namespace_born: dict[str, float] = {}
        self.namespaces: dict[str, Obj] = {}
        self.objects: dict[str, dict[tuple[str, str], Obj]] = {
            kind.plural: {} for kind in _KINDS if kind.namespaced
        }
        self.request_log: list[tuple[str, str]] = []
        self.request_times: list[float] = []
        self.access_reviews: list[Obj] = []
        self.exec_log: list[tuple[str, str, list[str]]] = []
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self.reset()
        self._changed = threading.Condition(self._lock)
        self._history: deque[tuple[int, str, str, str, Obj]] = deque(maxlen=4096)
        self._rv = 1
        self._runtimes: dict[str, _Runtime] = {}
        self._deleted_at: dict[str, float] = {}
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._stopped = False
        self._docker_options = docker.utils.kwargs_from_env()
        self.docker = docker.DockerClient(**self._docker_options)
        self._api_version = self.docker.api.api_version
        self._own_directory = directory is None
        self.directory = (
            Path(tempfile.mkdtemp(prefix="kube-standin-")) if directory is None else directory
        )
        for name in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self._store_namespace(self._new_namespace(name, {}, {}, None))
        self._server = _Server(self)
        self.ca = trustme.CA()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        self._front = _TlsFront(self._server, context, self._stopping)
        self.port: int = self._front.port
        self.url = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = self.directory / "kubeconfig"
        #: The CA that signed the server's certificate (PEM), for clients other than the
        #: kubeconfig's.
        self.ca_file = self.directory / "ca.crt"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self._write_kubeconfig()
        self._http_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._http_thread.start()
        self._kubelet_thread = threading.Thread(target=self._kubelet, daemon=True)
        self._kubelet_thread.start()

    # -- lifecycle --

    def __enter__(self) -> KubeStandIn:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Shut the server down and remove every container the stand-in made."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        self._wake.set()
        self._server.shutdown()
        self._server.server_close()
        self._front.close()
        with self._changed:
            self._changed.notify_all()
        with self._server.connections_lock:
            connections = dict(self._server.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._kubelet_thread.join(30)
        with self._lock:
            terminators = [rt.terminator for rt in self._runtimes.values() if rt.terminator]
        for terminator in terminators:
            terminator.join(30)
        self.sweep()
        for thread in connections.values():
            thread.join(10)
        self._http_thread.join(10)
        self.docker.close()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def sweep(self) -> list[str]:
        """Remove every container of this stand-in; the ids removed."""
        removed = []
        for container in self.container_ids():
            with contextlib.suppress(docker.errors.NotFound):
                self.docker.api.remove_container(container, force=True, v=True)
                removed.append(container)
        return removed

    def container_ids(self) -> list[str]:
        """Ids of the containers this stand-in made that still exist."""
        filters = {"label": f"{STANDIN_LABEL}={self.server_id}"}
        return [c["Id"] for c in self.docker.api.containers(all=True, filters=filters)]

    @property
    def pods(self) -> dict[tuple[str, str], Obj]:
        return self.objects["pods"]

    @property
    def events(self) -> dict[tuple[str, str], Obj]:
        return self.objects["events"]

    def container_of(self, namespace: str, name: str) -> str | None:
        """The docker container id of a pod, once it has one."""
        with self._lock:
            pod = self.pods.get((namespace, name))
            runtime = self._runtimes.get(pod["metadata"]["uid"]) if pod else None
            return runtime.container_id if runtime else None

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "standin",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(
                            self.ca.cert_pem.bytes()
                        ).decode(),
                    },
                }
            ],
            "users": [{"name": USER_NAME, "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "standin",
                    "context": {"cluster": "standin", "user": USER_NAME, "namespace": "default"},
                }
            ],
            "current-context": "standin",
            "preferences": {},
        }
        self.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))

    def _new_api(self) -> docker.APIClient:
        """A docker client of its own, for a thread of its own."""
        return docker.APIClient(version=self._api_version, **self._docker_options)

    def _record_error(self, where: str, error: BaseException | None) -> None:
        if error is None:
            error = sys.exc_info()[1]
        if error is None or isinstance(error, (BrokenPipeError, ConnectionResetError)):
            return
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        self.errors.append(f"{where}: {text}")

    def _guarded(self, where: str, function: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                function()
            except Exception as error:
                self._record_error(where, error)

        return run

    # -- state --

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _changed_object(self, plural: str, namespace: str, kind: str, obj: Obj) -> None:
        """Record a change (for watches); the caller holds the lock."""
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._history.append((self._rv, plural, namespace, kind, copy.deepcopy(obj)))
        self._changed.notify_all()

    def _new_metadata(self, metadata: Obj, name: str, namespace: str | None) -> Obj:
        out: Obj = {"name": name}
        if metadata.get("generateName"):
            out["generateName"] = metadata["generateName"]
        if namespace is not None:
            out["namespace"] = namespace
        out["uid"] = str(uuid.uuid4())
        out["resourceVersion"] = "0"
        out["creationTimestamp"] = now_rfc3339()
        labels = _string_map(metadata.get("labels"), "labels")
        annotations = _string_map(metadata.get("annotations"), "annotations")
        if labels:
            out["labels"] = labels
        if annotations:
            out["annotations"] = annotations
        for key in ("ownerReferences", "finalizers"):
            if metadata.get(key):
                out[key] = copy.deepcopy(metadata[key])
        return out

    def _new_namespace(
        self, name: str, labels: dict[str, str], annotations: dict[str, str], generate: str | None
    ) -> Obj:
        metadata: Obj = {"labels": {**labels, "kubernetes.io/metadata.name": name}}
        if annotations:
            metadata["annotations"] = annotations
        if generate:
            metadata["generateName"] = generate
        return {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": self._new_metadata(metadata, name, None),
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }

    def _store_namespace(self, namespace: Obj) -> None:
        with self._lock:
            name = namespace["metadata"]["name"]
            kind = "MODIFIED" if name in self.namespaces else "ADDED"
            self.namespaces[name] = namespace
            self._changed_object("namespaces", "", kind, namespace)

    def _generate_name(self, prefix: str, limit: int, taken: Callable[[str], bool]) -> str:
        prefix = prefix[: limit - 5]
        for _ in range(16):
            name = prefix + "".join(secrets.choice(NAME_ALPHABET) for _ in range(5))
            if not taken(name):
                return name
        return name

    def _allowed(self, verb: str, resource: str) -> bool:
        allow = self.allow
        if callable(allow):
            return bool(allow(verb, resource))
        for key in ((verb, resource), ("*", resource), (verb, "*"), ("*", "*")):
            if key in allow:
                return bool(allow[key])
        return True

    # -- requests --

    def _serve(self, handler: _Handler, method: str, body: bytes) -> None:
        url = urlsplit(handler.path)
        with self._lock:
            self.request_log.append((method, url.path))
            self.request_times.append(time.monotonic())
        auth = handler.headers.get("Authorization") or ""
        if not self.token_valid or auth != f"Bearer {self.token}":
            raise ApiError(401, "Unauthorized", "Unauthorized")
        with self._lock:
            throttled = self._throttled > 0 and url.path.rstrip("/") != "/version"
            if throttled:
                self._throttled -= 1
        if throttled:
            raise ApiError(
                429,
                "TooManyRequests",
                "Too many requests, please try again later.",
                {"retryAfterSeconds": self._retry_after},
                {"Retry-After": str(self._retry_after)},
            )
        query = parse_qs(url.query, keep_blank_values=True)
        for number in (
            "gracePeriodSeconds",
            "timeoutSeconds",
            "tailLines",
            "limitBytes",
            "sinceSeconds",
        ):
            if not all(re.fullmatch(r"-?[0-9]+", v) for v in query.get(number, [])):
                raise _bad_request(f"invalid value for {number}: {query[number][-1]!r}")
        parts = [unquote(p) for p in url.path.split("/") if p]
        discovery = self._discovery(parts)
        if discovery is not None:
            if method != "GET":
                raise ApiError(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                )
            handler.send_json(200, discovery)
            return
        resolved = self._resolve(parts)
        if resolved is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        kind, namespace, name, sub = resolved
        if kind.namespaced and namespace is None and (name is not None or method != "GET"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        data: Obj = {}
        if body and method in ("POST", "PUT", "PATCH", "DELETE"):
            try:
                loaded = json.loads(body)
            except ValueError as error:
                raise _bad_request(
                    f"the body of the request was in an unknown format: {error}"
                ) from error
            if not isinstance(loaded, dict):
                raise _bad_request("the body of the request must be a JSON object")
            data = loaded
        if sub is not None:
            self._serve_subresource(handler, method, kind, namespace or "", name or "", sub, query)
            return
        watch = _flag(query, "watch")
        verb = {
            ("GET", False): "watch" if watch else "list",
            ("GET", True): "get",
            ("POST", False): "create",
            ("DELETE", True): "delete",
        }.get((method, name is not None))
        if verb is None or verb not in kind.verbs:
            raise ApiError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                {"kind": kind.plural},
            )
        self._authorize(verb, kind.plural, namespace, name or "")
        if kind.plural == "selfsubjectaccessreviews":
            handler.send_json(201, self._access_review(data))
        elif verb == "create":
            handler.send_json(201, self._create(kind, namespace, data))
        elif verb == "get":
            handler.send_json(200, self._get(kind, namespace, name or ""))
        elif verb == "list":
            handler.send_json(200, self._list(kind, namespace, query))
        elif verb == "watch":
            self._watch(handler, kind, namespace, query)
        else:
            options = dict(data)
            for key in ("gracePeriodSeconds", "propagationPolicy"):
                if key in query and key not in options:
                    value = query[key][-1]
                    options[key] = int(value) if key == "gracePeriodSeconds" else value
            deleted = self._delete(kind, namespace, name or "", options)
            # the API server's one case of 202: not deleted yet, dependents not orphaned
            pending = bool(deleted["metadata"].get("deletionTimestamp")) and self._exists(
                kind, namespace, name or ""
            )
            accepted = pending and options.get("orphanDependents") is False
            handler.send_json(202 if accepted else 200, deleted)

    def reset(self) -> None:
        """Every setting back to a healthy cluster's."""
        self.token_valid = True
        self.allow: Allow = {}
        self.minor = 33
        self.protocols: tuple[str, ...] = PROTOCOLS
        #: Seconds after its namespace until the ``default`` ServiceAccount exists.
        self.serviceaccount_delay = 0.0
        self.enforce_network_policy = True
        self.drop_exec_status = False
        self.hold_exec_upgrade = False
        self.deletion_blocked: str | None = None
        self._throttled, self._retry_after = 0, 1

    def throttle(self, count: int, retry_after: int = 1) -> None:
        """Answer the next ``count`` requests (but ``/version``) with 429 and Retry-After."""
        with self._lock:
            self._throttled, self._retry_after = count, retry_after

    def _authorize(self, verb: str, resource: str, namespace: str | None, name: str) -> None:
        if self._allowed(verb, resource):
            return
        group = ""
        plural = resource.split("/", maxsplit=1)[0]
        for kind in _KINDS:
            if kind.plural == plural:
                group = kind.group
        scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
        why = (
            f'User "{USER_NAME}" cannot {verb} resource "{resource}" in API group "{group}" {scope}'
        )
        raise _forbidden(plural, name, why)

    def _discovery(self, parts: list[str]) -> Obj | None:
        if parts == []:
            paths = ["/api", "/api/v1", "/apis", "/version"]
            paths += sorted({f"/apis/{k.group}/{k.version}" for k in _KINDS if k.group})
            return {"paths": paths}
        if parts == ["version"]:
            return {
                "major": "1",
                "minor": str(self.minor),
                "emulationMajor": "1",
                "emulationMinor": str(self.minor),
                "minCompatibilityMajor": "1",
                "minCompatibilityMinor": str(self.minor - 1),
                "gitVersion": f"v1.{self.minor}.0-standin",
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2025-01-01T00:00:00Z",
                "goVersion": "go1.24.0",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        if parts == ["api"]:
            address = {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [address],
            }
        if parts == ["apis"]:
            groups = sorted({k.group for k in _KINDS if k.group})
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [self._group(group) for group in groups],
            }
        if len(parts) == 2 and parts[0] == "apis" and any(k.group == parts[1] for k in _KINDS):
            return {"kind": "APIGroup", "apiVersion": "v1", **self._group(parts[1])}
        if parts == ["api", "v1"]:
            return self._resource_list("v1")
        if len(parts) == 3 and parts[0] == "apis":
            version = f"{parts[1]}/{parts[2]}"
            if any(k.group_version == version for k in _KINDS):
                return self._resource_list(version)
        return None

    @staticmethod
    def _group(group: str) -> Obj:
        version = {"groupVersion": f"{group}/v1", "version": "v1"}
        return {"name": group, "versions": [version], "preferredVersion": version}

    @staticmethod
    def _resource_list(group_version: str) -> Obj:
        resources: list[Obj] = []
        for kind in _KINDS:
            if kind.group_version != group_version:
                continue
            entry: Obj = {
                "name": kind.plural,
                "singularName": kind.singular,
                "namespaced": kind.namespaced,
                "kind": kind.kind,
                "verbs": list(kind.verbs),
            }
            if kind.short_names:
                entry["shortNames"] = list(kind.short_names)
            resources.append(entry)
            for sub, verbs in _SUBRESOURCES.get(kind.plural, {}).items():
                resources.append(
                    {
                        "name": f"{kind.plural}/{sub}",
                        "singularName": "",
                        "namespaced": kind.namespaced,
                        "kind": "PodExecOptions" if sub == "exec" else kind.kind,
                        "verbs": list(verbs),
                    }
                )
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }

    @staticmethod
    def _resolve(parts: list[str]) -> tuple[_Kind, str | None, str | None, str | None] | None:
        if parts[:2] == ["api", "v1"]:
            group_version, rest = "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            return None
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            return None
        kind = KINDS.get((group_version, rest[0]))
        if kind is None or (namespace is not None and not kind.namespaced):
            return None
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None and sub not in _SUBRESOURCES.get(kind.plural, {}):
            return None
        return kind, namespace, name, sub

    # -- generic objects --

    def _store_of(self, kind: _Kind) -> dict[tuple[str, str], Obj]:
        return self.objects[kind.plural]

    def _get(self, kind: _Kind, namespace: str | None, name: str) -> Obj:
        with self._lock:
            if kind.plural == "namespaces":
                obj = self.namespaces.get(name)
            elif namespace is None:
                obj = None
            else:
                obj = self._store_of(kind).get((namespace, name))
            if obj is None:
                raise _not_found(kind.plural, name)
            if kind.plural == "resourcequotas":
                self._quota_status(obj)
            return copy.deepcopy(obj)

    def _exists(self, kind: _Kind, namespace: str | None, name: str) -> bool:
        with self._lock:
            if kind.plural == "namespaces":
                return name in self.namespaces
            return (namespace or "", name) in self._store_of(kind)

    def _matching(
        self, kind: _Kind, namespace: str | None, query: Mapping[str, list[str]]
    ) -> list[Obj]:
        labels = parse_label_selector((query.get("labelSelector") or [""])[-1])
        fields = parse_field_selector((query.get("fieldSelector") or [""])[-1])
        if kind.plural == "namespaces":
            candidates = list(self.namespaces.values())
        else:
            candidates = [
                obj
                for (ns, _), obj in self._store_of(kind).items()
                if namespace is None or ns == namespace
            ]
        out = []
        for obj in candidates:
            if labels_match(labels, obj["metadata"].get("labels") or {}) and fields_match(
                fields, obj
            ):
                out.append(obj)
        # etcd's key order, as a real API server lists
        return sorted(
            out, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"])
        )

    def _list(self, kind: _Kind, namespace: str | None, query: Mapping[str, list[str]]) -> Obj:
        with self._lock:
            items = []
            for obj in self._matching(kind, namespace, query):
                if kind.plural == "resourcequotas":
                    self._quota_status(obj)
                item = copy.deepcopy(obj)
                item.pop("apiVersion", None)
                item.pop("kind", None)
                items.append(item)
            return {
                "kind": f"{kind.kind}List",
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }

    def _watch(
        self, handler: _Handler, kind: _Kind, namespace: str | None, query: Mapping[str, list[str]]
    ) -> None:
        labels = parse_label_selector((query.get("labelSelector") or [""])[-1])
        fields = parse_field_selector((query.get("fieldSelector") or [""])[-1])
        timeout = float((query.get("timeoutSeconds") or ["1800"])[-1])
        since = (query.get("resourceVersion") or [""])[-1]
        deadline = time.monotonic() + timeout
        with self._lock:
            if since in ("", "0"):
                initial = [
                    ("ADDED", copy.deepcopy(o)) for o in self._matching(kind, namespace, query)
                ]
                cursor = self._rv
            else:
                initial = []
                cursor = int(since)
                oldest = self._history[0][0] if self._history else self._rv
                if cursor < oldest - 1:
                    gone = status_body(
                        410, "Expired", f"too old resource version: {cursor} ({oldest})"
                    )
                    initial = [("ERROR", gone)]
                    deadline = 0.0
        handler.start_chunked("application/json")
        try:
            for event_type, obj in initial:
                handler.write_chunk(
                    json.dumps({"type": event_type, "object": obj}).encode() + b"\n"
                )
            while not self._stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                with self._changed:
                    if self._rv <= cursor:
                        self._changed.wait(min(remaining, 0.5))
                    changes = [c for c in self._history if c[0] > cursor]
                    cursor = self._rv
                for _, plural, ns, event_type, obj in changes:
                    if plural != kind.plural or (namespace is not None and ns != namespace):
                        continue
                    if not (
                        labels_match(labels, obj["metadata"].get("labels") or {})
                        and fields_match(fields, obj)
                    ):
                        continue
                    handler.write_chunk(
                        json.dumps({"type": event_type, "object": obj}).encode() + b"\n"
                    )
            handler.end_chunked()
        except OSError:
            handler.close_connection = True

    def _create(self, kind: _Kind, namespace: str | None, data: Obj) -> Obj:
        if kind.plural == "namespaces":
            return self._create_namespace(data)
        assert namespace is not None
        metadata = data.get("metadata") or {}
        if metadata.get("namespace") not in (None, namespace):
            raise _bad_request(
                "the namespace of the provided object does not match the namespace sent on "
                "the request"
            )
        with self._lock:
            self._writable_namespace(kind.plural, namespace, metadata.get("name") or "")
            store = self._store_of(kind)
            name = self._name_for(kind, data, lambda n: (namespace, n) in store)
            if kind.plural == "pods":
                self._check_service_account(namespace, name, data)
                self._check_pod_security(namespace, name, data)
                obj = self._admit_pod(namespace, name, data)
            else:
                obj = copy.deepcopy(data)
                obj["apiVersion"] = kind.api_version
                obj["kind"] = kind.kind
                obj["metadata"] = self._new_metadata(metadata, name, namespace)
            store[(namespace, name)] = obj
            self._changed_object(kind.plural, namespace, "ADDED", obj)
            if kind.plural == "pods":
                spec = obj["spec"]
                runtime = _Runtime(
                    uid=obj["metadata"]["uid"],
                    namespace=namespace,
                    name=name,
                    container=spec["containers"][0]["name"],
                    image=spec["containers"][0]["image"],
                    restart_policy=spec["restartPolicy"],
                )
                self._runtimes[runtime.uid] = runtime
                self._wake.set()
            if kind.plural == "resourcequotas":
                self._quota_status(obj)
            return copy.deepcopy(obj)

    def _name_for(self, kind: _Kind, data: Obj, taken: Callable[[str], bool]) -> str:
        metadata = data.get("metadata") or {}
        name = metadata.get("name") or ""
        limit = 63 if kind.plural in ("namespaces", "pods") else 253
        generate = metadata.get("generateName") or ""
        if not isinstance(name, str) or not isinstance(generate, str):
            raise _bad_request("metadata.name and metadata.generateName must be strings")
        if not name and generate:
            name = self._generate_name(generate, limit, taken)
        if not name:
            raise _invalid(
                kind.kind, "", "metadata.name", "Required value: name or generateName is required"
            )
        pattern = _LABEL_RE if kind.plural == "namespaces" else _SUBDOMAIN_RE
        if len(name) > limit or not pattern.fullmatch(name):
            what = "RFC 1123 label" if kind.plural == "namespaces" else "RFC 1123 subdomain"
            raise _invalid(
                kind.kind,
                name,
                "metadata.name",
                f'Invalid value: "{name}": a lowercase {what} must consist of lower case '
                "alphanumeric characters or '-', and must start and end with an alphanumeric "
                f"character (at most {limit} characters)",
            )
        if taken(name):
            raise _already_exists(kind.plural, name)
        return name

    def _writable_namespace(self, plural: str, namespace: str, name: str) -> None:
        existing = self.namespaces.get(namespace)
        if existing is None:
            raise _not_found("namespaces", namespace)
        if existing["status"].get("phase") == "Terminating":
            raise _forbidden(
                plural,
                name,
                f"unable to create new content in namespace {namespace} because it is being "
                "terminated",
                [
                    {
                        "reason": "NamespaceTerminating",
                        "message": f"namespace {namespace} is being terminated",
                        "field": "metadata.namespace",
                    }
                ],
            )

    def _create_namespace(self, data: Obj) -> Obj:
        kind = KINDS[("v1", "namespaces")]
        metadata = data.get("metadata") or {}
        with self._lock:
            name = self._name_for(kind, data, lambda n: n in self.namespaces)
            labels = _string_map(metadata.get("labels"), "labels")
            annotations = _string_map(metadata.get("annotations"), "annotations")
            namespace = self._new_namespace(name, labels, annotations, metadata.get("generateName"))
            self._store_namespace(namespace)
            self._namespace_born[name] = time.monotonic()
            return copy.deepcopy(namespace)

    def _delete(self, kind: _Kind, namespace: str | None, name: str, options: Obj) -> Obj:
        if kind.plural == "namespaces":
            return self._delete_namespace(name, options)
        if kind.plural == "pods":
            return self._delete_pod(namespace or "", name, options)
        with self._lock:
            obj = self._store_of(kind).pop((namespace or "", name), None)
            if obj is None:
                raise _not_found(kind.plural, name)
            self._changed_object(kind.plural, namespace or "", "DELETED", obj)
            return copy.deepcopy(obj)

    def _delete_namespace(self, name: str, options: Obj) -> Obj:
        with self._lock:
            namespace = self.namespaces.get(name)
            if namespace is None:
                raise _not_found("namespaces", name)
            if name in ("default", "kube-system", "kube-public"):
                raise _forbidden("namespaces", name, "this namespace may not be deleted")
            metadata = namespace["metadata"]
            if not metadata.get("deletionTimestamp"):
                metadata["deletionTimestamp"] = now_rfc3339()
                metadata["deletionGracePeriodSeconds"] = 0
                if options.get("propagationPolicy") == "Foreground":
                    metadata["finalizers"] = [*metadata.get("finalizers", []), "foregroundDeletion"]
                elif options.get("propagationPolicy") == "Orphan":
                    metadata["finalizers"] = [*metadata.get("finalizers", []), "orphan"]
                namespace["status"] = {"phase": "Terminating"}
                self._store_namespace(namespace)
                self._deleted_at[name] = time.monotonic()
            self._wake.set()
            return copy.deepcopy(namespace)

    def _access_review(self, data: Obj) -> Obj:
        spec = data.get("spec") or {}
        attributes = spec.get("resourceAttributes")
        with self._lock:
            self.access_reviews.append(copy.deepcopy(spec))
        if attributes:
            resource = attributes.get("resource") or ""
            group = attributes.get("group") or ""
            if group and all(group != kind.group for kind in _KINDS):
                resource = f"{resource}.{group}"  # an API the stand-in does not serve
            if attributes.get("subresource"):
                resource = f"{resource}/{attributes['subresource']}"
            verb = attributes.get("verb") or ""
        else:
            other = spec.get("nonResourceAttributes") or {}
            resource, verb = other.get("path") or "", other.get("verb") or ""
        allowed = self._allowed(verb, resource)
        status: Obj = {"allowed": allowed}
        if allowed:
            status["reason"] = f'stand-in: {verb} on "{resource}" allowed'
        return {
            "kind": "SelfSubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }

    # -- pods: admission --

    def _admit_pod(self, namespace: str, name: str, data: Obj) -> Obj:
        """Validate, default and quota-check a new pod; the caller holds the lock."""
        pod = copy.deepcopy(data)
        pod["apiVersion"], pod["kind"] = "v1", "Pod"
        pod["metadata"] = self._new_metadata(data.get("metadata") or {}, name, namespace)
        spec = pod.get("spec")
        if not isinstance(spec, dict):
            raise _invalid("Pod", name, "spec", "Required value")
        containers = spec.get("containers")
        if not isinstance(containers, list) or not containers:
            raise _invalid("Pod", name, "spec.containers", "Required value")
        if len(containers) > 1 or spec.get("initContainers"):
            raise _invalid(
                "Pod", name, "spec.containers", "Too many: the stand-in runs one container per pod"
            )
        container = containers[0]
        if not isinstance(container, dict) or not container.get("name"):
            raise _invalid("Pod", name, "spec.containers[0].name", "Required value")
        if not container.get("image"):
            raise _invalid("Pod", name, "spec.containers[0].image", "Required value")
        if not _LABEL_RE.fullmatch(str(container["name"])):
            raise _invalid(
                "Pod", name, "spec.containers[0].name", f'Invalid value: "{container["name"]}"'
            )
        resources = container.setdefault("resources", {})
        for section in ("limits", "requests"):
            for resource, value in (resources.get(section) or {}).items():
                try:
                    parse_quantity(value)
                except ValueError as error:
                    raise _bad_request(
                        f"quantities must match the regular expression: {error}"
                    ) from error
                resources[section][resource] = str(value)
        applied = self._apply_limit_ranges(namespace, name, container)
        if applied:
            pod["metadata"].setdefault("annotations", {})["kubernetes.io/limit-ranger"] = (
                f"LimitRanger plugin set: {', '.join(applied)} for container {container['name']}"
            )
        for resource, value in (
            resources.get("limits") or {}
        ).items():  # requests default to limits
            resources.setdefault("requests", {}).setdefault(resource, value)
        self._check_quotas(namespace, name, container)
        image = str(container["image"])
        tagged = ":" in image.rsplit("/", 1)[-1] or "@" in image
        latest = not tagged or image.endswith(":latest")
        container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        spec.setdefault("dnsPolicy", "ClusterFirst")
        spec.setdefault("securityContext", {})
        spec.setdefault("schedulerName", "default-scheduler")
        spec.setdefault("serviceAccountName", "default")
        spec.setdefault("enableServiceLinks", True)
        spec.setdefault("priority", 0)
        pod["status"] = {"phase": "Pending", "qosClass": self._qos(container)}
        return pod

    def _check_service_account(self, namespace: str, name: str, data: Obj) -> None:
        """The ServiceAccount admission plugin: the pod's account must exist already."""
        account = (data.get("spec") or {}).get("serviceAccountName") or "default"
        born = self._namespace_born.get(namespace)
        if account == "default" and (
            born is None or time.monotonic() - born >= self.serviceaccount_delay
        ):
            return
        raise _forbidden(
            "pods",
            name,
            f"error looking up service account {namespace}/{account}: "
            f'serviceaccount "{account}" not found',
        )

    def _check_pod_security(self, namespace: str, name: str, data: Obj) -> None:
        """Pod Security admission, for a namespace labelled to enforce ``baseline`` or
        ``restricted``: the checks of those levels that pods here can fail."""
        labels = self.namespaces[namespace]["metadata"].get("labels") or {}
        level = labels.get("pod-security.kubernetes.io/enforce", "privileged")
        if level not in ("baseline", "restricted"):
            return
        spec = data.get("spec") or {}
        pod_context = spec.get("securityContext") or {}
        problems: list[str] = []
        containers = [c for c in spec.get("containers") or [] if isinstance(c, dict)]
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                problems.append(f"host namespaces ({flag}=true)")
        for container in containers:
            context = container.get("securityContext") or {}
            if context.get("privileged"):
                problems.append(
                    f'privileged (container "{container.get("name")}" must not set '
                    "securityContext.privileged=true)"
                )
        for volume in spec.get("volumes") or []:
            if "hostPath" in volume:
                problems.append(f'hostPath volumes (volume "{volume.get("name")}")')
        if level == "restricted":
            allowed_volumes = (
                "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                "persistentVolumeClaim", "projected", "secret",
            )  # fmt: skip
            for volume in spec.get("volumes") or []:
                if not any(kind in volume for kind in allowed_volumes):
                    problems.append(f'restricted volume types (volume "{volume.get("name")}")')
            for container in containers:
                context = container.get("securityContext") or {}
                who = f'container "{container.get("name")}"'
                if context.get("allowPrivilegeEscalation") is not False:
                    problems.append(
                        f"allowPrivilegeEscalation != false ({who} must set "
                        "securityContext.allowPrivilegeEscalation=false)"
                    )
                capabilities = context.get("capabilities") or {}
                if "ALL" not in (capabilities.get("drop") or []) or set(
                    capabilities.get("add") or []
                ) - {"NET_BIND_SERVICE"}:
                    problems.append(
                        f"unrestricted capabilities ({who} must set "
                        'securityContext.capabilities.drop=["ALL"])'
                    )
                if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
                    problems.append(
                        f"runAsNonRoot != true (pod or {who} must set "
                        "securityContext.runAsNonRoot=true)"
                    )
                if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
                    problems.append(f"runAsUser=0 ({who} must not set runAsUser=0)")
                profile = context.get("seccompProfile") or pod_context.get("seccompProfile") or {}
                if profile.get("type") not in ("RuntimeDefault", "Localhost"):
                    problems.append(
                        f"seccompProfile (pod or {who} must set securityContext.seccompProfile"
                        '.type to "RuntimeDefault" or "Localhost")'
                    )
        if problems:
            raise _forbidden(
                "pods", name, f'violates PodSecurity "{level}:latest": {", ".join(problems)}'
            )

    @staticmethod
    def _qos(container: Obj) -> str:
        resources = container.get("resources") or {}
        limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
        if not limits and not requests:
            return "BestEffort"
        guaranteed = all(
            r in limits and parse_quantity(limits[r]) == parse_quantity(requests.get(r, limits[r]))
            for r in ("cpu", "memory")
        )
        return "Guaranteed" if guaranteed else "Burstable"

    def _apply_limit_ranges(self, namespace: str, name: str, container: Obj) -> list[str]:
        """Default a container's resources from the namespace's LimitRanges; what was set."""
        resources = container["resources"]
        applied: list[str] = []
        for (ns, _), limit_range in sorted(self.objects["limitranges"].items()):
            if ns != namespace:
                continue
            for item in (limit_range.get("spec") or {}).get("limits") or []:
                if item.get("type") != "Container":
                    continue
                default = item.get("default") or item.get("max") or {}
                default_request = item.get("defaultRequest") or default
                for resource, value in default.items():
                    if resource not in (resources.get("limits") or {}):
                        resources.setdefault("limits", {})[resource] = str(value)
                        applied.append(f"{resource} limit")
                for resource, value in default_request.items():
                    if resource not in (resources.get("requests") or {}):
                        resources.setdefault("requests", {})[resource] = str(value)
                        applied.append(f"{resource} request")
                for resource, value in (item.get("max") or {}).items():
                    limit = (resources.get("limits") or {}).get(resource)
                    if limit is not None and parse_quantity(limit) > parse_quantity(value):
                        raise _forbidden(
                            "pods",
                            name,
                            f"maximum {resource} usage per Container is {value}, "
                            f"but limit is {limit}",
                        )
        return applied

    def _pod_demand(self, container: Obj, quota_key: str) -> Decimal | None:
        if quota_key in ("pods", "count/pods"):
            return Decimal(1)
        section, resource = _QUOTA_RESOURCES[quota_key]
        value = ((container.get("resources") or {}).get(section) or {}).get(resource)
        return None if value is None else parse_quantity(value)

    def _quota_used(self, namespace: str, quota_key: str, exclude: str | None = None) -> Decimal:
        used = Decimal(0)
        for (ns, pod_name), pod in self.pods.items():
            if ns != namespace or pod_name == exclude:
                continue
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                continue
            demand = self._pod_demand(pod["spec"]["containers"][0], quota_key)
            used += demand or 0
        return used

    def _check_quotas(self, namespace: str, name: str, container: Obj) -> None:
        for (ns, quota_name), quota in sorted(self.objects["resourcequotas"].items()):
            if ns != namespace:
                continue
            hard = (quota.get("spec") or {}).get("hard") or {}
            keys = [k for k in sorted(hard) if k in _QUOTA_RESOURCES or k in ("pods", "count/pods")]
            missing = [k for k in keys if self._pod_demand(container, k) is None]
            if missing:
                raise _forbidden(
                    "pods", name, f"failed quota: {quota_name}: must specify {','.join(missing)}"
                )
            exceeded = []
            for key in keys:
                demand = self._pod_demand(container, key) or Decimal(0)
                used = self._quota_used(namespace, key)
                if used + demand > parse_quantity(hard[key]):
                    exceeded.append((key, demand, used, hard[key]))
            if exceeded:
                requested = ",".join(f"{k}={format_quantity(k, d)}" for k, d, _, _ in exceeded)
                used_text = ",".join(f"{k}={format_quantity(k, u)}" for k, _, u, _ in exceeded)
                limited = ",".join(f"{k}={h}" for k, _, _, h in exceeded)
                raise _forbidden(
                    "pods",
                    name,
                    f"exceeded quota: {quota_name}, requested: {requested}, used: {used_text}, "
                    f"limited: {limited}",
                )

    def _quota_status(self, quota: Obj) -> None:
        hard = dict((quota.get("spec") or {}).get("hard") or {})
        namespace = quota["metadata"]["namespace"]
        used = {}
        for key in hard:
            if key in _QUOTA_RESOURCES or key in ("pods", "count/pods"):
                used[key] = format_quantity(key, self._quota_used(namespace, key))
        quota["status"] = {"hard": hard, "used": used}

    def _delete_pod(self, namespace: str, name: str, options: Obj) -> Obj:
        with self._lock:
            pod = self.pods.get((namespace, name))
            if pod is None:
                raise _not_found("pods", name)
            metadata = pod["metadata"]
            if metadata.get("deletionTimestamp"):
                return copy.deepcopy(pod)
            grace = options.get("gracePeriodSeconds")
            if grace is None:
                grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
            scheduled = bool(pod["spec"].get("nodeName"))
            terminal = pod["status"].get("phase") in ("Succeeded", "Failed")
            metadata["deletionTimestamp"] = now_rfc3339(float(grace))
            metadata["deletionGracePeriodSeconds"] = int(grace)
            if int(grace) == 0 or not scheduled or terminal:
                del self.pods[(namespace, name)]
                self._changed_object("pods", namespace, "DELETED", pod)
            else:
                self._changed_object("pods", namespace, "MODIFIED", pod)
            self._wake.set()
            return copy.deepcopy(pod)

    # -- subresources: log and exec --

    def _serve_subresource(
        self,
        handler: _Handler,
        method: str,
        kind: _Kind,
        namespace: str,
        name: str,
        sub: str,
        query: Mapping[str, list[str]],
    ) -> None:
        allowed_methods = ("GET",) if sub == "log" else ("GET", "POST")
        if method not in allowed_methods:
            raise ApiError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        # a WebSocket exec is a GET, authorised as "get"; from 1.35 also as "create"
        # (kubernetes#134577), which a POST (SPDY) always needed
        verbs = ["get" if method == "GET" else "create"]
        if sub == "exec" and method == "GET" and self.minor >= 35:
            verbs.append("create")
        for verb in verbs:
            self._authorize(verb, f"pods/{sub}", namespace, name)
        with self._lock:
            pod = self.pods.get((namespace, name))
            if pod is None:
                raise _not_found("pods", name)
            pod = copy.deepcopy(pod)
            runtime = self._runtimes.get(pod["metadata"]["uid"])
        container = pod["spec"]["containers"][0]["name"]
        wanted = (query.get("container") or [container])[-1]
        if wanted != container:
            raise _bad_request(f"container {wanted} is not valid for pod {name}")
        if sub == "log":
            self._serve_log(handler, pod, runtime, query)
        else:
            self._serve_exec(handler, pod, runtime, query)

    def _serve_log(
        self, handler: _Handler, pod: Obj, runtime: _Runtime | None, query: Mapping[str, list[str]]
    ) -> None:
        name, container = pod["metadata"]["name"], pod["spec"]["containers"][0]["name"]
        if runtime is None or runtime.container_id is None:
            reason = "ContainerCreating"
            if runtime is not None and runtime.stage == "pull-failed":
                reason = "trying and failing to pull image"
            raise _bad_request(
                f'container "{container}" in pod "{name}" is waiting to start: {reason}'
            )
        if _flag(query, "previous") and runtime.restart_count == 0:
            raise _bad_request(
                f'previous terminated container "{container}" in pod "{name}" not found'
            )
        tail_text = (query.get("tailLines") or [""])[-1]
        since_text = (query.get("sinceSeconds") or [""])[-1]
        limit_text = (query.get("limitBytes") or [""])[-1]
        options: dict[str, Any] = {
            "stdout": True,
            "stderr": True,
            "timestamps": _flag(query, "timestamps"),
        }
        if tail_text:
            options["tail"] = int(tail_text)
        if since_text:
            options["since"] = int(time.time() - int(since_text))
        if _flag(query, "follow"):
            handler.start_chunked("text/plain")
            stream = self.docker.api.logs(runtime.container_id, stream=True, follow=True, **options)
            try:
                for chunk in stream:
                    handler.write_chunk(chunk)
                handler.end_chunked()
            except OSError:
                handler.close_connection = True
            finally:
                # CancellableStream.close() leaves the socket's file wrapper open: close the
                # response too, or the socket outlives it (a ResourceWarning)
                with contextlib.suppress(Exception):
                    stream.close()
                with contextlib.suppress(Exception):
                    cast("Any", stream)._response.close()
            return
        data = self.docker.api.logs(runtime.container_id, **options)
        if limit_text:
            data = data[: int(limit_text)]
        handler.send_bytes(200, data, "text/plain")

    def _serve_exec(
        self, handler: _Handler, pod: Obj, runtime: _Runtime | None, query: Mapping[str, list[str]]
    ) -> None:
        command = query.get("command") or []
        stdin, stdout, stderr, tty = (_flag(query, f) for f in ("stdin", "stdout", "stderr", "tty"))
        container = pod["spec"]["containers"][0]["name"]
        if not command:
            raise _bad_request("you must specify at least one command for the container")
        if not (stdin or stdout or stderr):
            raise _bad_request("you must specify at least 1 of stdin, stdout, stderr")
        headers = handler.headers
        if "websocket" not in (headers.get("Upgrade") or "").lower():
            raise _bad_request("Upgrade request required")
        key = headers.get("Sec-WebSocket-Key") or ""
        if headers.get("Sec-WebSocket-Version") != "13" or len(base64.b64decode(key + "==")) < 16:
            raise _bad_request("unable to upgrade connection: bad websocket handshake")
        offered = [p.strip() for p in (headers.get("Sec-WebSocket-Protocol") or "").split(",")]
        protocol = next((p for p in self.protocols if p in offered), None)
        if protocol is None:
            raise _bad_request(
                "unable to upgrade connection: none of the offered subprotocols "
                f"{offered} is supported"
            )
        if runtime is None or runtime.container_id is None or runtime.stage != "running":
            raise _bad_request(f'unable to upgrade connection: container not found ("{container}")')
        if self.hold_exec_upgrade:  # a server that accepts and never upgrades
            handler.close_connection = True
            with contextlib.suppress(OSError, ValueError):
                while not self._stopping.is_set() and handler.rfile.read1(65536):
                    pass
            return
        container_id = runtime.container_id
        api = self._new_api()
        try:
            try:
                exec_id = api.exec_create(
                    container_id, command, stdout=stdout, stderr=stderr, stdin=stdin, tty=tty
                )["Id"]
                raw = api.exec_start(exec_id, tty=tty, socket=True)
            except docker.errors.APIError as error:
                raise ApiError(500, "InternalError", f"Internal error occurred: {error}") from error
            with self._lock:
                self.exec_log.append(
                    (pod["metadata"]["namespace"], pod["metadata"]["name"], list(command))
                )
            accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
            handler.close_connection = True
            handler.send_response(101, "Switching Protocols")
            handler.send_header("Upgrade", "websocket")
            handler.send_header("Connection", "Upgrade")
            handler.send_header("Sec-WebSocket-Accept", accept)
            handler.send_header("Sec-WebSocket-Protocol", protocol)
            handler.end_headers()
            ws = _WebSocket(cast("BinaryIO", handler.rfile), handler.connection)
            session = _ExecSession(self, api, exec_id, container_id, raw, ws, protocol, command)
            session.run(stdin=stdin, stdout=stdout, stderr=stderr, tty=tty)
        finally:
            api.close()

    # -- the kubelet --

    def _kubelet(self) -> None:
        while not self._stopping.is_set():
            try:
                self._sync()
            except Exception as error:
                self._record_error("kubelet", error)
            self._wake.wait(0.1)
            self._wake.clear()

    def _sync(self) -> None:
        with self._lock:
            runtimes = list(self._runtimes.values())
            pods = {pod["metadata"]["uid"]: copy.deepcopy(pod) for pod in self.pods.values()}
        states: dict[str, str] | None = None
        for runtime in runtimes:
            if self._stopping.is_set():
                return
            pod = pods.get(runtime.uid)
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                self._sync_deleting(runtime, pod)
            elif runtime.stage == "new":
                self._start_pod(runtime, pod)
            elif runtime.stage == "pull-failed" and not runtime.backoff_reported:
                if time.monotonic() >= runtime.next_action:
                    self._report_backoff(runtime, pod)
            elif runtime.stage == "running":
                if states is None:
                    filters = {"label": f"{STANDIN_LABEL}={self.server_id}"}
                    listed = self.docker.api.containers(all=True, filters=filters)
                    states = {c["Id"]: c["State"] for c in listed}
                if runtime.container_id and states.get(runtime.container_id) != "running":
                    self._container_exited(runtime, pod)
            elif runtime.stage == "backoff" and time.monotonic() >= runtime.next_action:
                self._restart(runtime, pod)
        self._sync_namespaces()

    def _mutate_pod(self, runtime: _Runtime, change: Callable[[Obj], None]) -> None:
        with self._lock:
            pod = self.pods.get((runtime.namespace, runtime.name))
            if pod is None or pod["metadata"]["uid"] != runtime.uid:
                return
            change(pod)
            self._changed_object("pods", runtime.namespace, "MODIFIED", pod)

    def _event(
        self,
        pod: Obj,
        event_type: str,
        reason: str,
        message: str,
        component: str = "kubelet",
        container: bool = True,
    ) -> None:
        metadata = pod["metadata"]
        namespace = metadata["namespace"]
        stamp = now_rfc3339()
        involved: Obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": metadata["name"],
            "namespace": namespace,
            "uid": metadata["uid"],
            "resourceVersion": metadata.get("resourceVersion", ""),
        }
        if container:
            involved["fieldPath"] = f"spec.containers{{{pod['spec']['containers'][0]['name']}}}"
        # the event recorder's naming: the object's name and the time in hex nanoseconds
        name = f"{metadata['name']}.{time.time_ns():x}"
        event: Obj = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "resourceVersion": "0",
                "creationTimestamp": stamp,
            },
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "source": {"component": component, "host": NODE_NAME}
            if component == "kubelet"
            else {"component": component},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "type": event_type,
            "eventTime": None,
            "reportingComponent": component,
            "reportingInstance": NODE_NAME if component == "kubelet" else "",
        }
        with self._lock:
            if namespace not in self.namespaces:
                return
            while (namespace, event["metadata"]["name"]) in self.events:
                event["metadata"]["name"] = f"{metadata['name']}.{time.time_ns():x}"
            name = event["metadata"]["name"]
            self.events[(namespace, name)] = event
            self._changed_object("events", namespace, "ADDED", event)

    @staticmethod
    def _set_conditions(
        pod: Obj, statuses: Mapping[str, tuple[str, str | None, str | None]]
    ) -> None:
        old = {c["type"]: c for c in pod["status"].get("conditions") or []}
        order = [
            "PodReadyToStartContainers",
            "Initialized",
            "Ready",
            "ContainersReady",
            "PodScheduled",
        ]
        out = []
        for kind in order:
            if kind not in statuses and kind not in old:
                continue
            if kind not in statuses:
                out.append(old[kind])
                continue
            status, reason, message = statuses[kind]
            previous = old.get(kind)
            condition: Obj = {
                "type": kind,
                "status": status,
                "lastProbeTime": None,
                "lastTransitionTime": previous["lastTransitionTime"]
                if previous and previous["status"] == status
                else now_rfc3339(),
            }
            if reason:
                condition["reason"] = reason
            if message:
                condition["message"] = message
            out.append(condition)
        pod["status"]["conditions"] = out

    def _container_status(
        self, runtime: _Runtime, state: Obj, ready: bool, last: Obj | None = None
    ) -> Obj:
        status: Obj = {
            "name": runtime.container,
            "state": state,
            "lastState": last or {},
            "ready": ready,
            "restartCount": runtime.restart_count,
            "image": runtime.image,
            "imageID": runtime.image_id,
            "started": "running" in state,
        }
        if runtime.container_id:
            status["containerID"] = f"docker://{runtime.container_id}"
        return status

    def _waiting(self, runtime: _Runtime, reason: str, message: str) -> Callable[[Obj], None]:
        not_ready = f"containers with unready status: [{runtime.container}]"

        def change(pod: Obj) -> None:
            self._set_conditions(
                pod,
                {
                    "PodReadyToStartContainers": ("True", None, None),
                    "Initialized": ("True", None, None),
                    "Ready": ("False", "ContainersNotReady", not_ready),
                    "ContainersReady": ("False", "ContainersNotReady", not_ready),
                },
            )
            state = {"waiting": {"reason": reason, "message": message}}
            pod["status"]["containerStatuses"] = [self._container_status(runtime, state, False)]

        return change

    def _start_pod(self, runtime: _Runtime, pod: Obj) -> None:
        spec = pod["spec"]
        if UNSCHEDULABLE_KEY in (spec.get("nodeSelector") or {}):
            message = (
                "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. "
                "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling."
            )

            def unschedulable(pod: Obj) -> None:
                self._set_conditions(pod, {"PodScheduled": ("False", "Unschedulable", message)})

            runtime.stage = "unschedulable"
            self._mutate_pod(runtime, unschedulable)
            self._event(
                pod, "Warning", "FailedScheduling", message, "default-scheduler", container=False
            )
            return

        def scheduled(pod: Obj) -> None:
            pod["spec"]["nodeName"] = NODE_NAME
            pod["status"]["hostIP"] = "127.0.0.1"
            pod["status"]["hostIPs"] = [{"ip": "127.0.0.1"}]
            pod["status"]["startTime"] = now_rfc3339()
            self._set_conditions(pod, {"PodScheduled": ("True", None, None)})

        self._mutate_pod(runtime, scheduled)
        self._event(
            pod,
            "Normal",
            "Scheduled",
            f"Successfully assigned {runtime.namespace}/{runtime.name} to {NODE_NAME}",
            "default-scheduler",
            container=False,
        )
        image_name = runtime.image
        if not _IMAGE_RE.fullmatch(image_name):
            message = (
                f'Failed to apply default image tag "{image_name}": couldn\'t parse image name '
                f'"{image_name}": invalid reference format'
            )
            runtime.stage = "config-error"
            self._mutate_pod(runtime, self._waiting(runtime, "InvalidImageName", message))
            self._event(pod, "Warning", "InspectFailed", message)
            self._event(pod, "Warning", "Failed", "Error: InvalidImageName")
            return
        try:
            image = self.docker.images.get(image_name)
        except docker.errors.ImageNotFound:
            failure = (
                f'Failed to pull image "{image_name}": rpc error: code = NotFound desc = '
                f'failed to pull and unpack image "{image_name}": the stand-in pulls no images '
                "and this one is not present on the machine"
            )
            runtime.stage = "pull-failed"
            runtime.next_action = time.monotonic() + 1.0
            self._mutate_pod(runtime, self._waiting(runtime, "ErrImagePull", failure))
            self._event(pod, "Normal", "Pulling", f'Pulling image "{image_name}"')
            self._event(pod, "Warning", "Failed", failure)
            self._event(pod, "Warning", "Failed", "Error: ErrImagePull")
            return
        runtime.image_id = f"docker-pullable://{image_name}@{image.id}"
        try:
            config = self._container_config(
                pod, str(image.attrs.get("Config", {}).get("User") or "")
            )
        except _ConfigError as error:
            runtime.stage = "config-error"
            self._mutate_pod(
                runtime, self._waiting(runtime, "CreateContainerConfigError", str(error))
            )
            self._event(pod, "Warning", "Failed", f"Error: {error}")
            return
        self._event(
            pod, "Normal", "Pulled", f'Container image "{image_name}" already present on machine'
        )
        try:
            created = self.docker.containers.create(image_name, **config)
        except docker.errors.APIError as error:
            runtime.stage = "config-error"
            self._mutate_pod(runtime, self._waiting(runtime, "CreateContainerError", str(error)))
            self._event(pod, "Warning", "Failed", f"Error: {error}")
            return
        runtime.container_id = created.id
        self._event(pod, "Normal", "Created", f"Created container: {runtime.container}")
        try:
            created.start()
        except docker.errors.APIError as error:
            runtime.stage = "exited"
            self._mutate_pod(runtime, self._waiting(runtime, "RunContainerError", str(error)))
            self._event(pod, "Warning", "Failed", f"Error: {error}")
            return
        self._open_empty_dirs(runtime.container_id, list(config.get("tmpfs") or {}))
        self._mark_running(runtime)
        self._event(pod, "Normal", "Started", f"Started container {runtime.container}")

    def _open_empty_dirs(self, container_id: str | None, mounts: list[str]) -> None:
        """Make emptyDirs 0777, as the kubelet does: docker resets a tmpfs that is also the
        working directory to 0755 when it makes that directory."""
        if not mounts or container_id is None:
            return
        with contextlib.suppress(docker.errors.APIError):
            exec_id = self.docker.api.exec_create(
                container_id, ["chmod", "0777", *mounts], user="0", stdout=False, stderr=False
            )["Id"]
            self.docker.api.exec_start(exec_id)

    def _mark_running(self, runtime: _Runtime, last: Obj | None = None) -> None:
        assert runtime.container_id is not None
        started = _docker_time(
            self.docker.api.inspect_container(runtime.container_id)["State"].get("StartedAt")
        )
        runtime.stage = "running"

        def running(pod: Obj) -> None:
            pod["status"]["phase"] = "Running"
            self._set_conditions(
                pod,
                {
                    "PodReadyToStartContainers": ("True", None, None),
                    "Initialized": ("True", None, None),
                    "Ready": ("True", None, None),
                    "ContainersReady": ("True", None, None),
                },
            )
            state = {"running": {"startedAt": started}}
            pod["status"]["containerStatuses"] = [
                self._container_status(runtime, state, True, last)
            ]

        self._mutate_pod(runtime, running)

    def _report_backoff(self, runtime: _Runtime, pod: Obj) -> None:
        runtime.backoff_reported = True
        message = f'Back-off pulling image "{runtime.image}"'
        self._mutate_pod(runtime, self._waiting(runtime, "ImagePullBackOff", message))
        self._event(pod, "Normal", "BackOff", message)
        self._event(pod, "Warning", "Failed", "Error: ImagePullBackOff")

    def _container_exited(self, runtime: _Runtime, pod: Obj) -> None:
        assert runtime.container_id is not None
        try:
            state = self.docker.api.inspect_container(runtime.container_id)["State"]
        except docker.errors.NotFound:
            state = {"ExitCode": 137, "OOMKilled": False}
        code = int(state.get("ExitCode") or 0)
        reason = "Completed" if code == 0 else ("OOMKilled" if state.get("OOMKilled") else "Error")
        terminated = {
            "terminated": {
                "exitCode": code,
                "reason": reason,
                "startedAt": _docker_time(state.get("StartedAt")),
                "finishedAt": _docker_time(state.get("FinishedAt")),
                "containerID": f"docker://{runtime.container_id}",
            }
        }
        policy = runtime.restart_policy
        if policy == "Always" or (policy == "OnFailure" and code != 0):
            delay = min(10.0, 0.5 * 2**runtime.restart_count)
            runtime.stage = "backoff"
            runtime.next_action = time.monotonic() + delay
            message = (
                f"back-off {delay:g}s restarting failed container={runtime.container} "
                f"pod={runtime.name}_{runtime.namespace}({runtime.uid})"
            )
            self._mutate_pod(
                runtime,
                self._waiting_after(runtime, "CrashLoopBackOff", message, terminated),
            )
            self._event(
                pod,
                "Warning",
                "BackOff",
                f"Back-off restarting failed container {runtime.container} in pod "
                f"{runtime.name}_{runtime.namespace}({runtime.uid})",
            )
            return
        runtime.stage = "exited"
        done = "PodCompleted" if code == 0 else "PodFailed"

        def exited(pod: Obj) -> None:
            pod["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
            self._set_conditions(
                pod,
                {
                    "PodReadyToStartContainers": ("False", None, None),
                    "Initialized": ("True", done, None),
                    "Ready": ("False", done, None),
                    "ContainersReady": ("False", done, None),
                },
            )
            pod["status"]["containerStatuses"] = [
                self._container_status(runtime, terminated, False)
            ]

        self._mutate_pod(runtime, exited)

    def _waiting_after(
        self, runtime: _Runtime, reason: str, message: str, last: Obj
    ) -> Callable[[Obj], None]:
        base = self._waiting(runtime, reason, message)

        def change(pod: Obj) -> None:
            base(pod)
            pod["status"]["containerStatuses"][0]["lastState"] = last

        return change

    def _restart(self, runtime: _Runtime, pod: Obj) -> None:
        assert runtime.container_id is not None
        last = (pod["status"].get("containerStatuses") or [{}])[0].get("lastState") or {}
        try:
            self.docker.api.start(runtime.container_id)
        except docker.errors.APIError as error:
            runtime.stage = "exited"
            self._event(pod, "Warning", "Failed", f"Error: {error}")
            return
        runtime.restart_count += 1
        self._mark_running(runtime, last)
        self._event(pod, "Normal", "Started", f"Started container {runtime.container}")

    def _sync_deleting(self, runtime: _Runtime, pod: Obj | None) -> None:
        if runtime.terminator is None:
            grace = 0.0
            if pod is not None:
                grace = float(pod["metadata"].get("deletionGracePeriodSeconds") or 0)
                if runtime.container_id:
                    self._event(pod, "Normal", "Killing", f"Stopping container {runtime.container}")
            grace = min(grace, self.grace_cap)
            runtime.terminator = threading.Thread(
                target=self._guarded("terminate", lambda: self._terminate(runtime, grace)),
                daemon=True,
            )
            runtime.terminator.start()
        elif not runtime.terminator.is_alive():
            with self._lock:
                current = self.pods.get((runtime.namespace, runtime.name))
                if current is not None and current["metadata"]["uid"] == runtime.uid:
                    del self.pods[(runtime.namespace, runtime.name)]
                    self._changed_object("pods", runtime.namespace, "DELETED", current)
                self._runtimes.pop(runtime.uid, None)

    def _terminate(self, runtime: _Runtime, grace: float) -> None:
        if runtime.container_id is None:
            return
        api = self._new_api()
        try:
            with contextlib.suppress(docker.errors.NotFound):
                if grace > 0 and runtime.stage == "running":
                    api.stop(runtime.container_id, timeout=max(1, math.ceil(grace)))
                api.remove_container(runtime.container_id, force=True, v=True)
        finally:
            api.close()
        self._wake.set()

    def _sync_namespaces(self) -> None:
        with self._lock:
            terminating = [
                name
                for name, ns in self.namespaces.items()
                if ns["status"].get("phase") == "Terminating"
            ]
            for name in terminating:
                for pod in self.pods.values():
                    metadata = pod["metadata"]
                    if metadata["namespace"] == name and not metadata.get("deletionTimestamp"):
                        grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))
                        metadata["deletionTimestamp"] = now_rfc3339(grace)
                        metadata["deletionGracePeriodSeconds"] = grace
                        self._changed_object("pods", name, "MODIFIED", pod)
                        self._wake.set()
                busy = any(rt.namespace == name for rt in self._runtimes.values())
                busy = busy or any(ns == name for ns, _ in self.pods)
                deleted_at = self._deleted_at.get(name, 0.0)
                if busy or time.monotonic() - deleted_at < self.namespace_linger:
                    continue
                if self.deletion_blocked is not None:
                    self._block_deletion(self.namespaces[name], self.deletion_blocked)
                    continue
                for plural, store in self.objects.items():
                    for key in [k for k in store if k[0] == name]:
                        self._changed_object(plural, name, "DELETED", store.pop(key))
                namespace = self.namespaces.pop(name)
                self._deleted_at.pop(name, None)
                self._changed_object("namespaces", "", "DELETED", namespace)

    def _block_deletion(self, namespace: Obj, message: str) -> None:
        """Keep a namespace Terminating with the condition the namespace controller sets
        when it cannot list every API (an aggregated API down); the caller holds the lock."""
        conditions = namespace["status"].setdefault("conditions", [])
        if any(c["type"] == "NamespaceDeletionDiscoveryFailure" for c in conditions):
            return
        conditions.append(
            {
                "type": "NamespaceDeletionDiscoveryFailure",
                "status": "True",
                "lastTransitionTime": now_rfc3339(),
                "reason": "DiscoveryFailed",
                "message": message,
            }
        )
        self._changed_object("namespaces", "", "MODIFIED", namespace)

    # -- containers --

    def _egress_denied(self, pod: Obj) -> bool:
        """Whether an enforced NetworkPolicy of the pod's namespace selects it for egress."""
        if not self.enforce_network_policy:
            return False
        labels = pod["metadata"].get("labels") or {}
        with self._lock:
            policies = [
                copy.deepcopy(policy)
                for (ns, _), policy in self.objects["networkpolicies"].items()
                if ns == pod["metadata"]["namespace"]
            ]
        for policy in policies:
            spec = policy.get("spec") or {}
            wanted = (spec.get("podSelector") or {}).get("matchLabels") or {}
            if all(labels.get(k) == v for k, v in wanted.items()) and "Egress" in (
                spec.get("policyTypes") or []
            ):
                return True
        return False

    def _container_config(self, pod: Obj, image_user: str) -> dict[str, Any]:
        """docker ``containers.create`` arguments for a pod; raises _ConfigError."""
        spec, metadata = pod["spec"], pod["metadata"]
        container = spec["containers"][0]
        env: dict[str, str] = {}
        fields = {
            "metadata.name": metadata["name"],
            "metadata.namespace": metadata["namespace"],
            "metadata.uid": metadata["uid"],
            "spec.nodeName": NODE_NAME,
            "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
            "status.hostIP": "127.0.0.1",
            "status.podIP": "",
        }
        # the kubelet always sets the API server's Service address
        env["KUBERNETES_SERVICE_HOST"] = "127.0.0.1"
        env["KUBERNETES_SERVICE_PORT"] = str(self.port)
        for item in container.get("env") or []:
            name = item["name"]
            if "valueFrom" in item:
                source = item["valueFrom"] or {}
                path = (source.get("fieldRef") or {}).get("fieldPath")
                if path in fields:
                    env[name] = fields[path]
                    continue
                label = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path or "")
                if label:
                    env[name] = (metadata.get(label.group(1)) or {}).get(label.group(2), "")
                    continue
                raise _ConfigError(f"stand-in: env {name}: only fieldRef sources are supported")
            env[name] = _expand(str(item.get("value", "")), env)
        command = [_expand(str(x), env) for x in container.get("command") or []]
        args = [_expand(str(x), env) for x in container.get("args") or []]
        config: dict[str, Any] = {
            "name": f"standin-{self.server_id}-{metadata['namespace']}-{metadata['name']}-"
            f"{metadata['uid'][:8]}",
            "labels": {
                STANDIN_LABEL: self.server_id,
                POD_LABEL: f"{metadata['namespace']}/{metadata['name']}",
            },
            "hostname": metadata["name"][:63],
            "network_mode": "none" if self._egress_denied(pod) else "host",
            "environment": [f"{k}={v}" for k, v in env.items()],
            "stdin_open": bool(container.get("stdin")),
            "tty": bool(container.get("tty")),
        }
        if command:
            config["entrypoint"] = command
            config["command"] = args
        elif args:
            config["command"] = args
        if container.get("workingDir"):
            config["working_dir"] = container["workingDir"]
        pod_context = spec.get("securityContext") or {}
        context = container.get("securityContext") or {}
        user = context.get("runAsUser", pod_context.get("runAsUser"))
        group = context.get("runAsGroup", pod_context.get("runAsGroup"))
        non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
        if user is not None:
            config["user"] = f"{user}:{group}" if group is not None else str(user)
        elif group is not None:
            config["user"] = f"{image_user.split(':', maxsplit=1)[0] or 0}:{group}"
        if non_root:
            effective = str(user) if user is not None else image_user.split(":", maxsplit=1)[0]
            pod_ref = f"{metadata['name']}_{metadata['namespace']}({metadata['uid']})"
            where = f'(pod: "{pod_ref}", container: {container["name"]})'
            if effective in ("", "root", "0"):
                if user is not None:
                    raise _ConfigError(f"container's runAsUser breaks non-root policy {where}")
                raise _ConfigError(f"container has runAsNonRoot and image will run as root {where}")
            if not effective.isdigit():
                raise _ConfigError(
                    f"container has runAsNonRoot and image has non-numeric user ({effective}), "
                    f"cannot verify user is non-root {where}"
                )
        if pod_context.get("supplementalGroups"):
            config["group_add"] = [str(g) for g in pod_context["supplementalGroups"]]
        if context.get("allowPrivilegeEscalation") is False:
            config["security_opt"] = ["no-new-privileges"]
        capabilities = context.get("capabilities") or {}
        if capabilities.get("drop"):
            config["cap_drop"] = list(capabilities["drop"])
        if capabilities.get("add"):
            config["cap_add"] = list(capabilities["add"])
        if context.get("readOnlyRootFilesystem"):
            config["read_only"] = True
        if context.get("privileged"):
            config["privileged"] = True
        limits = (container.get("resources") or {}).get("limits") or {}
        if "memory" in limits:
            config["mem_limit"] = max(6 * 2**20, int(parse_quantity(limits["memory"])))
        if "cpu" in limits:
            config["nano_cpus"] = max(10_000_000, int(parse_quantity(limits["cpu"]) * 10**9))
        volumes = {v.get("name"): v for v in spec.get("volumes") or []}
        tmpfs: dict[str, str] = {}
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount.get("name"))
            if volume is None:
                raise _ConfigError(f'stand-in: volumeMount "{mount.get("name")}" names no volume')
            if "emptyDir" not in volume or mount.get("subPath"):
                raise _ConfigError(
                    f'stand-in: volume "{mount.get("name")}": only emptyDir volumes without '
                    "subPath are supported"
                )
            options = ["ro" if mount.get("readOnly") else "rw", "exec", "mode=0777"]
            size = (volume.get("emptyDir") or {}).get("sizeLimit")
            if size:
                options.append(f"size={int(parse_quantity(size))}")
            tmpfs[mount["mountPath"]] = ",".join(options)
        if tmpfs:
            config["tmpfs"] = tmpfs
        return config


class _ExecSession:
    """One exec: the client's WebSocket on one side, a docker exec socket on the other."""

    def __init__(
        self,
        standin: KubeStandIn,
        api: docker.APIClient,
        exec_id: str,
        container_id: str,
        raw: Any,
        ws: _WebSocket,
        protocol: str,
        command: list[str],
    ) -> None:
        self.standin = standin
        self.api = api
        self.exec_id = exec_id
        self.container_id = container_id
        self.raw = raw
        self.sock: socket.socket = getattr(raw, "_sock", raw)
        self.ws = ws
        self.protocol = protocol
        self.command = command
        self.client_gone = threading.Event()
        self.server_done = threading.Event()

    def run(self, *, stdin: bool, stdout: bool, stderr: bool, tty: bool) -> None:
        reader = threading.Thread(
            target=self.standin._guarded("exec reader", lambda: self._pump_client(stdin, tty)),
            daemon=True,
        )
        try:
            first = _STDOUT if stdout else _STDERR if stderr else _ERROR
            self.ws.send_channel(first, b"")
            reader.start()
            held = self._pump_docker(stdout, stderr, tty)
            if self.client_gone.is_set():
                return
            status = self._status(held)
            self.server_done.set()
            if not self.standin.drop_exec_status:
                self.ws.send_channel(_ERROR, json.dumps(status, separators=(",", ":")).encode())
            self.ws.close(1000)
            reader.join(2.0)
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
            with contextlib.suppress(Exception):
                self.raw.close()
            if reader.is_alive():
                with contextlib.suppress(OSError):
                    self.ws._sock.shutdown(socket.SHUT_RD)
                reader.join(5.0)

    def _pump_docker(self, stdout: bool, stderr: bool, tty: bool) -> bytes:
        """Forward the exec's output as it comes; returns a held-back runtime error, if any."""
        held = b""
        first = True
        try:
            while True:
                if tty:
                    data = self.sock.recv(65536)
                    if not data:
                        return held
                    self.ws.send_channel(_STDOUT, data)
                    continue
                header = self._recv_exact(8)
                if header is None:
                    return held
                stream, size = header[0], struct.unpack(">I", header[4:])[0]
                payload = self._recv_exact(size)
                if payload is None:
                    return held
                if first and stream == 1 and payload.startswith(b"OCI runtime exec failed"):
                    held = payload
                    continue
                first = False
                if stream == 1 and stdout:
                    self.ws.send_channel(_STDOUT, payload)
                elif stream == 2 and stderr:
                    self.ws.send_channel(_STDERR, payload)
        except OSError:
            return held

    def _recv_exact(self, count: int) -> bytes | None:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def _status(self, held: bytes) -> Obj:
        info: dict[str, Any] = {}
        for _ in range(200):
            info = self.api.exec_inspect(self.exec_id)
            if not info.get("Running"):
                break
            time.sleep(0.02)
        code = int(info.get("ExitCode") or 0)
        if held and code in (126, 127) and not info.get("Pid"):
            text = held.decode(errors="replace").strip()
            message = (
                "error executing command in container: failed to exec in container: "
                f'failed to start exec "{self.exec_id}": {text}'
            )
            return {
                "metadata": {},
                "status": "Failure",
                "message": f"Internal error occurred: {message}",
                "reason": "InternalError",
                "details": {"causes": [{"message": message}]},
                "code": 500,
            }
        if held:
            self.ws.send_channel(_STDOUT, held)
        if code == 0:
            return {"metadata": {}, "status": "Success"}
        # the kubelet's wording around the container runtime's (containerd, CRI-O) error
        command = "[" + " ".join(self.command) + "]"
        return {
            "metadata": {},
            "status": "Failure",
            "message": "command terminated with non-zero exit code: "
            f"error executing command {command}, exit code {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
        }

    def _pump_client(self, stdin: bool, tty: bool) -> None:
        """Client to exec: stdin, stdin's end (v5), resizes.  An early close ends the streams
        and leaves the process running, as a kubelet does."""
        while True:
            try:
                message = self.ws.read_message()
            except _ProtocolError as error:
                self.ws.close(error.code, str(error))
                message = None
            if message is None or message[0] == _OP_CLOSE:
                early = not self.server_done.is_set()
                if early:
                    self.client_gone.set()
                if message is not None and not self.ws.close_sent:
                    self.ws.send(_OP_CLOSE, message[1][:2])
                if early:
                    with contextlib.suppress(OSError):
                        self.sock.shutdown(socket.SHUT_RDWR)
                return
            data = message[1]
            if not data:
                continue
            channel, payload = data[0], data[1:]
            if channel == _STDIN and stdin and payload:
                with contextlib.suppress(OSError):
                    self.sock.sendall(payload)
            elif (
                channel == _CLOSE
                and self.protocol.startswith("v5")
                and payload[:1] == bytes([_STDIN])
            ):
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)
            elif channel == _RESIZE and tty and payload:
                with contextlib.suppress(ValueError, docker.errors.APIError):
                    size = json.loads(payload)
                    self.api.exec_resize(
                        self.exec_id, height=int(size["Height"]), width=int(size["Width"])
                    )
