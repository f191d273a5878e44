"""Where the data root is, and what every command shares: the options ``--root``, ``--dataset``,
``--set``, ``--quiet``, ``--threads`` and ``--workers``, the ``--set KEY=VALUE`` grammar, the
help format, the usage error and the thread default."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import shlex
import statistics
import time
from pathlib import Path

import yaml

DEFAULT_ROOT = "data"
CONFIG_FILE = Path("config") / "config.yaml"


def resolve_root(cli_value: str | None = None, config_file: Path = CONFIG_FILE) -> Path:
    """``--root`` beats ``$ITMKIT_DATA``, which beats ``root:`` in config/config.yaml
    (looked up from the current directory), which beats ``data/``."""
    if cli_value:
        return Path(cli_value)
    if os.environ.get("ITMKIT_DATA"):
        return Path(os.environ["ITMKIT_DATA"])
    if config_file.exists():
        cfg = yaml.safe_load(config_file.read_text()) or {}
        if cfg.get("root"):
            return Path(cfg["root"])
    return Path(DEFAULT_ROOT)


def config_problems(config: dict, schema_file) -> list[str]:
    """One line per way ``config`` breaks the JSON schema in ``schema_file``, each naming the
    key (the workflow prints the first and stops, instead of a dump of the schema)."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_file).read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config),
                    key=lambda e: list(map(str, e.absolute_path)))
    out = []
    for e in errors:
        key = ".".join(map(str, e.absolute_path))
        if e.validator == "additionalProperties":
            unknown = sorted(set(e.instance) - set(e.schema.get("properties", {})))
            msg = f"unknown key(s) {', '.join(unknown)} (the keys are listed in {Path(schema_file).name})"
        else:
            msg = e.message
        out.append(f"{key}: {msg}" if key else msg)
    return out


# ---------------------------------------------------------------------------------------------
# the command line every command shares

class UsageError(ValueError):
    """The command line cannot work as given (an unknown ``--set`` key, a value that does not
    fit): exit status 2, where a failure is 1."""


class ArgumentParser(argparse.ArgumentParser):
    """A usage error is one line, the message and where the options are listed, instead of the
    whole usage before it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` shows the default of every option that takes a value and has a default."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        if ("%(default)" in help_ or not action.option_strings or action.nargs == 0
                or action.default in (None, "", [], argparse.SUPPRESS)):
            return help_
        return f"{help_} (default: %(default)s)"


def add_root_argument(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    parser.add_argument("--root", default=None, help=help or
                        "data root (default: $ITMKIT_DATA, else 'root' in config/config.yaml, else data/)")


# A dataset is one folder right under the data root: a name, never a path (no "/", no "..").
# manifests/schema.yaml holds the same pattern for a manifest's `name`.
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def dataset_name(text: str) -> str:
    """The type of every option that names a dataset."""
    if not DATASET_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a dataset name (a folder right under the data root: letters, digits, "
            f"'_', '.', '-', starting with a letter or digit)")
    return text


def step(command: str, root, dataset: str, more: str = "") -> str:
    """The command line of a missing step, in backquotes, to copy: ``itmkit COMMAND --dataset
    NAME --root ROOT MORE``, with the root, so that it runs on the same data."""
    return f"`itmkit {command} --dataset {dataset} --root {shlex.quote(str(root))}{' ' + more if more else ''}`"


def add_dataset_argument(parser: argparse.ArgumentParser, *flags: str, required: bool = True,
                         help: str = "dataset name (folder under the data root)") -> None:
    parser.add_argument(*(flags or ("--dataset",)), required=required, type=dataset_name, help=help)


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    # the earlier spelling of parse, vocab and extract, still used by scripts
    parser.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)


def add_set_argument(parser: argparse.ArgumentParser, what: str, metavar: str = "KEY=VALUE") -> None:
    parser.add_argument("--set", action="append", default=[], type=_setting_item, metavar=metavar,
                        help=f"set {what}; VALUE is YAML (3, 1e-4, true, null, [1, 2], text); repeatable")


def _count(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """The type of an option that counts something and must be at least 1."""
    return _count(text, 1)


def non_negative_int(text: str) -> int:
    """The type of an option that counts something and may be 0."""
    return _count(text, 0)


def run_command(add_arguments, command, argv=None) -> int:
    """One command run from Python (``train.main([...])``): ``argv`` parsed, ``command`` run
    (with the thread default, as ``itmkit`` runs it). A UsageError exits 2 with one line, as
    argparse's own errors do; failures are raised."""
    parser = ArgumentParser(formatter_class=HelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        with command_threads(args):
            return command(args)
    except UsageError as e:
        parser.error(str(e))


def parse_settings(items) -> dict[str, str]:
    """``--set`` items -> {key: value text}, e.g. ``["lr=1e-4", "expected.images=8"]`` ->
    ``{"lr": "1e-4", "expected.images": "8"}``; a later item wins. Consumers type the values
    (``typed_settings``, ``setting_value``) and check the keys against their own config."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE (e.g. --set lr=1e-4)")
        out[key.strip()] = value
    return out


def _setting_item(text: str) -> str:
    try:
        parse_settings([text])
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def setting_value(key: str, text: str):
    """The value of one ``--set`` item: YAML, so ``3``, ``0.5``, ``true``, ``null``, ``[1, 2]``
    and ``{a: 1}`` are typed and anything else is text."""
    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"--set {key}={text}: not a YAML value: {e}") from None


def typed_settings(items, config_class, what: str) -> dict:
    """``--set`` items as values of the fields of the dataclass ``config_class``, each of the
    type of the field's default (so ``lr=1e-4`` is a float, and a tuple field takes ``[10, 20]``
    or ``10,20``). A key it lacks, or a value that does not fit, is a UsageError naming the keys."""
    defaults = config_class()
    names = [f.name for f in dataclasses.fields(config_class)]
    out = {}
    for key, text in parse_settings(items).items():
        if key not in names:
            raise UsageError(f"--set {key}: {what} has no setting '{key}'; its settings: {', '.join(names)}")
        default = getattr(defaults, key)
        try:
            out[key] = _typed(setting_value(key, text), default, text)
        except (TypeError, ValueError):
            raise UsageError(f"--set {key}={text}: expected a value like the default "
                             f"{key}={default!r} of {what}") from None
    return out


def _typed(value, default, text: str | None = None):
    """``value`` (the YAML of ``text``) as the type of ``default``."""
    if default is None or isinstance(default, (list, dict)):
        return value
    if isinstance(default, str):   # the text as written: 'on' stays 'on'
        return text.strip() if text is not None else str(value)
    if isinstance(default, tuple):
        if isinstance(value, str):   # 10,20
            parts = [(setting_value("", t), t) for t in value.split(",") if t.strip()]
        else:
            parts = [(v, None) for v in (value if isinstance(value, list) else [value])]
        return tuple(_typed(v, default[0], t) if default else v for v, t in parts)
    if isinstance(default, bool):
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise ValueError(value)
    if isinstance(value, bool) or (isinstance(default, int) and isinstance(value, float)):
        raise ValueError(value)
    return type(default)(value)


# ---------------------------------------------------------------------------------------------
# CPU threads and DataLoader workers: one default for every command that runs a model

def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may run on: its affinity mask, capped by the cgroup's CPU quota
    (``cpu.max`` of cgroup v2, ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of v1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup)
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cgroup_quota(cgroup: Path) -> float | None:
    """CPUs' worth of time per period the cgroup grants, None when unlimited or unknown."""
    try:
        if (cgroup / "cpu.max").exists():
            quota, period = (cgroup / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        for v1 in (cgroup / "cpu", cgroup / "cpu,cpuacct", cgroup):
            if (v1 / "cpu.cfs_quota_us").exists():
                quota = int((v1 / "cpu.cfs_quota_us").read_text())
                period = int((v1 / "cpu.cfs_period_us").read_text())
                return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def busy_cpus(loadavg: Path = Path("/proc/loadavg"), samples: int = 5, every_s: float = 0.02) -> float:
    """CPUs other processes keep busy now: the tasks running or waiting for a CPU (the 4th field
    of /proc/loadavg, less this process), the median of ``samples`` looks ``every_s`` apart. Not
    the 1-minute load average: it lags a minute behind, so it still counts a run that has just
    ended (one's own, too) and misses a load that has just begun."""
    counts = []
    for i in range(samples):
        try:
            counts.append(int(loadavg.read_text().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return 0.0
        if i + 1 < samples:
            time.sleep(every_s)
    return float(max(0, statistics.median(counts)))


def default_threads(workers: int, usable: int, busy: float, machine: int) -> int:
    """The model's CPU threads when ``--threads`` is not given: the CPUs this process may use
    (``usable``) that the machine (``machine`` CPUs, ``busy`` of them kept busy by others) has
    free, less the DataLoader ``workers`` this process starts; at least 1. A thread that waits for
    a busy core at every op costs more than it gives: on 2 cores at load 5, 2 threads took 3-4x
    as long as 1 (docs/BENCHMARKS.md)."""
    free = min(usable, round(machine - busy))
    return max(1, free - workers)


def env_threads(environ=os.environ) -> int | None:
    """The thread count ``OMP_NUM_THREADS`` asks for (its first field, as OpenMP reads a nested
    list), or None when it is unset or not a positive number. Torch's own default obeys it, and so
    do batch systems and scripts that start several processes side by side, so the default below
    must not override it."""
    value = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def default_workers(device: str) -> int:
    """DataLoader workers when ``--workers`` is not given: 2 beside a GPU; none on the CPU,
    where they would take the cores the model's threads use."""
    return 2 if str(device).startswith("cuda") else 0


def add_threads_arguments(parser: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--workers`` of every command that runs a model."""
    parser.add_argument("--threads", type=non_negative_int, default=None,
                        help="CPU threads of the model (default: $OMP_NUM_THREADS when set, else the "
                             "CPUs this process may use that other processes leave free, less "
                             "--workers, at least 1; 0: torch's own choice, one per core)")
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="DataLoader worker processes (default: 2 with a GPU, 0 on the CPU, where "
                             "they would take the model's cores)")


@contextlib.contextmanager
def command_threads(args):
    """Fill in the ``--workers`` and ``--threads`` defaults of ``args`` (those a command
    with ``add_threads_arguments`` has) and run the block with torch's thread count set to
    ``--threads``; the count before is restored after."""
    if not hasattr(args, "threads"):
        yield
        return
    import torch

    if getattr(args, "workers", 0) is None:
        args.workers = default_workers(getattr(args, "device", "cpu"))
    if args.threads is None:
        args.threads = env_threads() or default_threads(getattr(args, "workers", 0) or 0, usable_cpus(),
                                                        busy_cpus(), os.cpu_count() or 1)
    before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
