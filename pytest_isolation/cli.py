"""``pytest-isolation``: check engines, list environments, clean up leftovers.

pytest-isolation doctor [--isolation-kube-context C] [--isolation-option E.O=V]
                                     which engines work here, and why not
pytest-isolation list                live, kept and leftover environments
pytest-isolation cleanup [--all] [--dry-run] [--templates]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from .engines.base import Engine
from .errors import InvalidSpec
from .manager import IsolationManager, SweepReport
from .spec import Layer, Settings

if TYPE_CHECKING:
    from .ledger import ResourceRecord


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pytest-isolation", description="Isolated environments for pytest: maintenance."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    doctor_parser = commands.add_parser(
        "doctor", help="say which engines work on this machine, and why not"
    )
    doctor_parser.add_argument(
        "--isolation-option",
        action="append",
        default=[],
        metavar="ENGINE.OPTION=VALUE",
        help="an engine option default, as for pytest (also PYTEST_ISOLATION_OPTIONS)",
    )
    doctor_parser.add_argument(
        "--isolation-kube-context",
        metavar="CONTEXT",
        help="the kubeconfig context to check (kubernetes.context=CONTEXT)",
    )
    commands.add_parser("list", help="list live, kept and leftover environments")
    cleanup = commands.add_parser(
        "cleanup", help="remove what ended runs left behind, kept environments included"
    )
    cleanup.add_argument(
        "--all", action="store_true", help="also remove resources of runs that still seem alive"
    )
    cleanup.add_argument("--dry-run", action="store_true", help="only say what would go")
    cleanup.add_argument(
        "--templates", action="store_true", help="also remove cached templates (virtualenv)"
    )
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
    except InvalidSpec as exc:
        parser.error(str(exc))
    with IsolationManager(settings=settings) as manager:
        if args.command == "doctor":
            return doctor(manager)
        if args.command == "list":
            return list_environments(manager)
        return clean(manager, everything=args.all, dry_run=args.dry_run, templates=args.templates)


def _settings(args: argparse.Namespace) -> Settings:
    """Engine option defaults (which cluster) from doctor's flags over
    PYTEST_ISOLATION_OPTIONS."""
    options = list(getattr(args, "isolation_option", []))
    if getattr(args, "isolation_kube_context", None):
        options.append(f"kubernetes.context={args.isolation_kube_context}")
    environ = os.environ.get("PYTEST_ISOLATION_OPTIONS", "")
    return Settings.resolve(
        [
            Layer("the command line", {"options": options}),
            Layer("PYTEST_ISOLATION_OPTIONS", {"options": [o for o in environ.split(";") if o]}),
        ]
    )


def doctor(manager: IsolationManager) -> int:
    try:
        own = version("pytest-isolation")
    except PackageNotFoundError:
        own = "not installed"
    print(f"pytest-isolation {own} on {socket.gethostname()}, Python {sys.version.split()[0]}")
    print(f"ledger: {manager.ledger.root}")
    print(f"cache:  {manager.context.cache_dir}")
    print("engines:")
    names = sorted(set(manager.registry.names()) | set(manager.registry.broken))
    for name in names:
        availability = manager.availability(name)
        if availability:
            detail = f" ({availability.detail})" if availability.detail else ""
            print(f"  [ok] {name}: available{detail}")
        else:
            fix = f"; fix: {availability.fix}" if availability.fix else ""
            print(f"  [--] {name}: unavailable: {availability.reason}{fix}")
        if name in manager.registry and manager.registry.get(name).doctor is not Engine.doctor:
            try:
                lines = manager.engine(name).doctor()
            except Exception as exc:
                lines = [f"not checked further: {exc}"]
            for line in lines:
                print(f"       {line}")
    try:
        clash = version("pytest-isolated")
    except PackageNotFoundError:
        clash = None
    if clash:
        print(
            f"warning: pytest-isolated {clash} is installed and claims the same 'isolated' "
            "marker; uninstall it or run pytest with -p no:isolated"
        )
    leftovers = [r for r in manager.ledger.records() if not r.owner.alive() or r.kept]
    if leftovers:
        print(f"{len(leftovers)} leftover or kept resource(s): see `pytest-isolation list`")
    return 0


def _state(record: ResourceRecord, now: float) -> str:
    if record.kept_until is not None:
        left = record.kept_until - now
        return f"kept ({_age(left)} left)" if left > 0 else "kept (expired)"
    return "live" if record.owner.alive() else "leftover"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def list_environments(manager: IsolationManager) -> int:
    records = manager.ledger.records()
    corrupt = manager.ledger.corrupt()
    for bad in corrupt:
        print(f"unreadable ledger entry: {bad} (removed by `cleanup --all`)")
    if not records:
        if not corrupt:
            print("no environments in the ledger")
        return 0
    now = time.time()
    by_env: dict[str, list[ResourceRecord]] = defaultdict(list)
    for record in records:
        by_env[record.env_id].append(record)
    print(f"{'ENVIRONMENT':<13} {'ENGINE':<11} {'STATE':<18} {'OWNER':<8} {'AGE':>5}  TEST")
    for env_id, items in by_env.items():
        first = items[0]
        print(
            f"{env_id:<13} {first.engine:<11} {_state(first, now):<18} "
            f"{first.owner.pid:<8} {_age(now - first.created):>5}  {first.description}"
        )
        for record in items:
            print(f"    {record.kind}: {record.identifier}")
    return 0


def clean(manager: IsolationManager, *, everything: bool, dry_run: bool, templates: bool) -> int:
    report: SweepReport = manager.sweep(include_kept=True, include_live=everything, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for record in report.released:
        print(f"{verb} {record.kind} {record.identifier} ({record.engine}, env {record.env_id})")
    labelled = [] if dry_run else manager.sweep_labels()
    for name in labelled:
        print(f"removed {name} (labelled by an ended run, not in the ledger)")
    for record, error in report.failed:
        print(f"failed to remove {record.kind} {record.identifier}: {error}", file=sys.stderr)
    if everything:
        for bad in manager.ledger.corrupt():
            print(f"{verb} unreadable ledger entry {bad}")
            if not dry_run:
                bad.unlink(missing_ok=True)
    if templates:
        for name in manager.registry.names():
            engine = manager.engine(name)
            if dry_run:
                continue
            for removed in engine.prune_cache(None):
                print(f"removed cached {removed}")
    if not report.released and not report.failed and not labelled:
        print("nothing to clean up")
    return 1 if report.failed else 0
