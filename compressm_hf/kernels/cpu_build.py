"""Build and load the fused CPU selective-scan extension: keyed per environment, locked, and bounded.

``torch.utils.cpp_extension.load`` alone is not safe to call at a model's first forward:

* It serialises builds with a "baton": a ``lock`` file created with ``O_EXCL`` in the build directory
  and removed when the build ends. A build killed by SIGKILL (OOM killer, ``kill -9``, a job
  scheduler) never removes it, and every later process then polls for it forever, printing nothing.
* Its build directory is named only by the extension name, while the ``build.ninja`` in it embeds the
  interpreter's torch include paths; two venvs sharing ``~/.cache/torch_extensions`` rebuild over each
  other at every switch.

So here the directory name hashes everything the binary depends on (source, flags, CPU, compiler, torch
version and location, interpreter and ``sys.prefix``). An environment's builds are serialised with our
own ``fcntl.flock`` on ``<prefix><hash>.lock`` next to the build directories, which the kernel releases
when its holder dies, even by SIGKILL; so a baton found while holding it is necessarily stale and is
removed. The compile runs in one child process in its own session (trying the flag sets in order), killed
with ninja and the compiler when the time budget ``COMPRESSM_KERNEL_BUILD_TIMEOUT`` (seconds, default
900) runs out; waiting for another process's build counts against the same budget, and is announced.
A finished build is marked by ``built.json``; later processes load its library directly, without taking
the lock, starting a child or running ninja.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not POSIX: builds are still bounded, but not serialised
    fcntl = None

__all__ = [
    "FLAG_SETS",
    "TIMEOUT_ENV",
    "BuildTimeout",
    "build_and_load",
    "build_directory",
    "build_name",
    "build_root",
    "build_timeout",
    "lock_path",
]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("selective_scan_cpu.cpp")
NAME_PREFIX = "compressm_selective_scan_cpu_"
TIMEOUT_ENV = "COMPRESSM_KERNEL_BUILD_TIMEOUT"
DEFAULT_TIMEOUT_S = 900.0
_STAMP = "built.json"  # written by the builder once the library loads and its ops are registered
_BATON = "lock"  # cpp_extension's FileBaton in the build directory
_POLL_S = 0.5

# Tried in order; the first that builds wins. -ffast-math is deliberately absent: the kernel has its
# own vector exp/log (no libm calls to vectorise) and fast-math could fold its Cody-Waite ln2 split.
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=fast"),
    ("-O3", "-fopenmp", "-fno-math-errno"),
    ("-O2",),
)

# Runs in the builder child: for each flag set in order, build (and load, which checks that the ops
# register) and mark it built, stopping at the first that works; the last line reports the failures.
# A timer kills the child's whole session (ninja and the compiler included) at the deadline, so even a
# builder orphaned by a killed parent, which keeps the build lock through its inherited descriptor,
# holds it no longer than the budget.
_RESULT = "COMPRESSM_BUILD_RESULT "
_BUILDER = r"""
import json, os, signal, sys, threading
args = json.loads(sys.argv[1])
timer = threading.Timer(args["timeout"], lambda: os.killpg(os.getpgrp(), signal.SIGKILL))
timer.daemon = True
timer.start()
import torch
from torch.utils import cpp_extension
errors = []
for build in args["builds"]:
    try:
        os.makedirs(build["directory"], exist_ok=True)  # cpp_extension's baton goes in it first
        cpp_extension.load(
            name=os.path.basename(build["directory"]), sources=[args["source"]],
            extra_cflags=build["cflags"], extra_ldflags=build["ldflags"],
            build_directory=build["directory"], is_python_module=False, verbose=args["verbose"],
        )
        torch.ops.compressm_scan.fwd
    except Exception as exc:
        errors.append(" ".join(build["cflags"]) + ": " + type(exc).__name__ + ": " + str(exc).strip()[-800:])
        continue
    stamp = os.path.join(build["directory"], args["stamp"])
    with open(stamp + ".tmp", "w") as fh:
        json.dump({"cflags": build["cflags"], "torch": torch.__version__}, fh)
    os.replace(stamp + ".tmp", stamp)
    break
print(args["result"] + json.dumps(errors), flush=True)
"""


class BuildTimeout(RuntimeError):
    """The build (or the wait for another process's build) ran past ``COMPRESSM_KERNEL_BUILD_TIMEOUT``."""


def build_timeout() -> float:
    """Seconds that one :func:`build_and_load` may spend waiting for and running builds."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(
            f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds; unset it for the default"
        )
    return value


def _cpu_tag() -> str:
    """The CPU model, so that a shared cache never reuses a -march=native build on another CPU."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("model name", "flags", "Features")):
                    text += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return text


def _environment_key() -> list[str]:
    """Everything but the flags that the binary and its ``build.ninja`` depend on."""
    return [
        SOURCE.read_bytes().hex(),
        _cpu_tag(),
        os.environ.get("CXX", "c++"),
        torch.__version__,
        str(torch.version.git_version),
        os.path.dirname(torch.__file__),
        sys.version,
        sys.prefix,
        os.path.realpath(sys.executable),  # bin/python and bin/python3 of one venv share a build
    ]


def _digest(parts: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def build_name(flags: Sequence[str]) -> str:
    """Extension (and build directory) name for ``flags``: a hash of everything the binary and its
    ``build.ninja`` depend on, so different venvs, interpreters or torch builds never share a directory,
    and one environment always finds its own finished build."""
    return NAME_PREFIX + _digest([*_environment_key(), " ".join(flags)])


def build_root() -> Path:
    """Where the build directories live: ``$TORCH_EXTENSIONS_DIR``, else torch's default cache
    (``~/.cache/torch_extensions/py<XY>_cpu``), as cpp_extension itself would choose."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils import cpp_extension  # imported lazily: pulls in setuptools

    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(cpp_extension.get_default_build_root()) / f"{py}_cpu"


def build_directory(flags: Sequence[str]) -> Path:
    """The build directory for ``flags``."""
    return build_root() / build_name(flags)


def lock_path() -> Path:
    """The ``flock`` file that serialises this environment's builds (all flag sets), next to the build
    directories."""
    return build_root() / f"{NAME_PREFIX}{_digest(_environment_key())}.lock"


def _library(directory: Path) -> Path:
    from torch.utils.cpp_extension import LIB_EXT

    return directory / f"{directory.name}{LIB_EXT}"


def _is_built(directory: Path) -> bool:
    return (directory / _STAMP).is_file() and _library(directory).is_file()


@contextlib.contextmanager
def _build_lock(path: Path, deadline: float, budget: float) -> Iterator[int | None]:
    """Hold an exclusive ``flock`` on ``path``; yields its descriptor, or None where files cannot be
    locked here (then builds are not serialised). Says once that it waits when another process holds
    it, and raises :class:`BuildTimeout` at ``deadline``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = fcntl is not None
        waiting_since = None
        while locked:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            except OSError as exc:  # a file system without flock (some network mounts)
                logger.warning(
                    "compressm_hf: cannot lock %s (%s); building the C++ selective-scan kernel without "
                    "serialising against other processes",
                    path,
                    exc,
                )
                locked = False
                break
            now = time.monotonic()
            if waiting_since is None:
                waiting_since = now
                logger.warning(
                    "compressm_hf: waiting for another process (pid %s) to finish building the C++ "
                    "selective-scan kernel (lock %s); giving up after %.0f s more (%s)",
                    _read_owner(fd),
                    path,
                    max(0.0, deadline - now),
                    TIMEOUT_ENV,
                )
            if now >= deadline:
                raise BuildTimeout(
                    f"another process (pid {_read_owner(fd)}) held the build lock {path} for "
                    f"{now - waiting_since:.0f} s, past {TIMEOUT_ENV}={budget:g} s; raise {TIMEOUT_ENV} "
                    f"to wait longer"
                )
            time.sleep(min(_POLL_S, max(0.0, deadline - now)))
        if locked:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield fd if locked else None
    finally:
        os.close(fd)  # releases the flock (unless a builder child inherited it and still runs)


def _read_owner(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def _remove_stale_baton(directory: Path, *, locked: bool, budget: float) -> None:
    """Remove cpp_extension's baton left by an interrupted build. With our lock held no build can be
    running, so any baton is stale; without it (no flock here), only one older than the budget is."""
    baton = directory / _BATON
    try:
        age = time.time() - baton.stat().st_mtime
    except FileNotFoundError:
        return
    if not locked and age < budget:
        return
    logger.warning(
        "compressm_hf: removing the stale build lock %s (%.0f s old) left by an interrupted build of "
        "the C++ selective-scan kernel",
        baton,
        age,
    )
    baton.unlink(missing_ok=True)


def _run_builder(lock_fd: int | None, deadline: float, budget: float) -> list[str]:
    """Compile the flag sets in order, until one works, in a child process (own session) that is killed
    with its compiler at ``deadline``. Returns each failed flag set's error; raises
    :class:`BuildTimeout`, or RuntimeError if the builder itself failed."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise BuildTimeout(f"no time left to build within {TIMEOUT_ENV}={budget:g} s")
    directories = [build_directory(flags) for flags in FLAG_SETS]
    args = {
        "source": str(SOURCE),
        "builds": [
            {
                "directory": str(directory),
                "cflags": list(flags),
                "ldflags": ["-fopenmp"] if "-fopenmp" in flags else [],
            }
            for flags, directory in zip(FLAG_SETS, directories)
        ],
        "stamp": _STAMP,
        "result": _RESULT,
        "timeout": remaining,
        "verbose": os.environ.get("COMPRESSM_VERBOSE_BUILD", "0") == "1",
    }
    logger.warning(
        "compressm_hf: building the C++ selective-scan kernel in %s; once per environment, ~20-60 s on "
        "2 cores (bounded by %s=%g s)",
        directories[0],
        TIMEOUT_ENV,
        budget,
    )
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", _BUILDER, json.dumps(args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
        pass_fds=() if lock_fd is None else (lock_fd,),
    )
    try:
        out, _ = proc.communicate(timeout=remaining)
    except BaseException as exc:  # the timeout, or KeyboardInterrupt: never leave a compiler behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if lock_fd is not None:
            for directory in directories:
                _remove_stale_baton(directory, locked=True, budget=budget)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise BuildTimeout(
                f"building into {directories[0]} did not finish within {TIMEOUT_ENV}={budget:g} s and "
                f"was killed; a build takes ~20-60 s on 2 cores (longer under load): raise {TIMEOUT_ENV}"
            ) from None
        raise
    if args["verbose"]:
        sys.stderr.write(out)
    lines = [line for line in out.splitlines() if line.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        if proc.returncode == -signal.SIGKILL:
            raise BuildTimeout(f"the kernel builder was killed at {TIMEOUT_ENV}={budget:g} s")
        raise RuntimeError(f"the kernel builder failed (exit status {proc.returncode}): {out.strip()[-800:]}")
    logger.info("compressm_hf: C++ selective-scan kernel builder finished in %.1f s", time.monotonic() - t0)
    return json.loads(lines[-1][len(_RESULT) :])


def _first_built() -> Path | None:
    for flags in FLAG_SETS:
        directory = build_directory(flags)
        if _is_built(directory):
            return _library(directory)
    return None


def build_and_load() -> Path:
    """Build (unless an earlier process did) and load the extension, from the first flag set that
    compiles; returns the library's path. Raises :class:`BuildTimeout` once the time budget is spent,
    or RuntimeError with each flag set's failure. A finished build is loaded without any lock or child
    process; a flag set that failed is not retried while a later one's build exists (delete the build
    directories to retry)."""
    budget = build_timeout()
    deadline = time.monotonic() + budget
    errors: list[str] = []
    library = _first_built()
    if library is None:
        with _build_lock(lock_path(), deadline, budget) as lock_fd:
            library = _first_built()  # finished by another process while we waited?
            if library is None:
                for flags in FLAG_SETS:
                    _remove_stale_baton(build_directory(flags), locked=lock_fd is not None, budget=budget)
                errors = _run_builder(lock_fd, deadline, budget)
                library = _first_built()
    if library is None:
        raise RuntimeError("no flag set built:\n" + "\n".join(errors))
    try:
        torch.ops.load_library(str(library))
        torch.ops.compressm_scan.fwd  # noqa: B018  (raises if the ops did not register)
    except Exception as exc:
        if not _ops_registered():
            raise RuntimeError(
                f"loading {library} failed ({type(exc).__name__}: {exc}); delete {library.parent} to "
                f"rebuild it"
            ) from exc
    return library


def _ops_registered() -> bool:
    return hasattr(torch.ops, "compressm_scan") and hasattr(torch.ops.compressm_scan, "fwd")
