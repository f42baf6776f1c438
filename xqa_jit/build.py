"""Stages 2 and 3: source -> library in the on-disk cache (locked, atomic) -> memoized module.

Cache layout (root = $XQA_JIT_CACHE_DIR, else $XDG_CACHE_HOME/xqa_jit, else ~/.cache/xqa_jit)::

    <root>/<spec name>-sm<arch>-<key16>/   one published entry: kernel.cu, kernel.so, meta.json
    <root>/.locks/<entry>.lock              filelock (fcntl: released by the kernel if a builder dies)
    <root>/.tmp/<entry>.<pid>.<rand>/       private build directories, renamed into place when done
    <root>/.failed/<entry>/                 the last failed build: source and nvcc log

The key hashes everything the compiler sees: rendered source, flags, target arch, and the versions
of xqa_jit, torch and CUDA. An entry directory appears only by ``os.rename`` of a finished build
directory, so no process can see a half-written library; a complete entry is loaded without taking
the lock (read-only caches work), after checking the library's recorded sha256.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .render import render

log = logging.getLogger("xqa_jit")

CACHE_FORMAT = 1
LIB_NAME = "kernel.so"
SRC_NAME = "kernel.cu"
NVCC_FLAGS = ("-O3", "-std=c++17", "-Xptxas=-warn-spills")
INFO_FIELDS = ("threads", "smem_bytes", "blocks_per_sm", "tile_tokens", "rows_per_block",
               "row_chunks", "max_splits")


class XqaBuildError(RuntimeError):
    """A kernel failed to compile; the message carries nvcc's log and the rendered source's path."""


class XqaNoBuildError(RuntimeError):
    """XQA_JIT_NO_BUILD=1 is set and the kernel is not in the cache."""


class XqaCacheError(RuntimeError):
    """The cache directory is unsafe or unusable."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def cache_root() -> Path:
    """The cache root of API.md (not created here)."""
    d = os.environ.get("XQA_JIT_CACHE_DIR")
    if d:
        return Path(d).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "xqa_jit"


# ----------------------------------------------------------------------------- toolchain


def _has_toolkit(root: Path) -> bool:
    return (root / "bin" / "nvcc").exists() and any(
        (root / sub / "libcudart.so").exists() for sub in ("lib64", "lib", "targets/x86_64-linux/lib"))


def find_cuda_home() -> str:
    """The CUDA toolkit root. nvcc on the PATH may be a wrapper script, so its parent's parent is
    not trusted unless it really holds a toolkit; then the usual install locations are tried."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(os.path.realpath(nvcc)).parent.parent))
        try:  # a wrapper script that execs the real nvcc: read the path it names
            text = Path(nvcc).read_text(errors="ignore")[:4096]
            for tok in text.replace('"', " ").replace("'", " ").split():
                if tok.endswith("/bin/nvcc"):
                    cands.append(str(Path(tok).parent.parent))
        except OSError:
            pass
    cands += ["/usr/local/cuda"] + sorted((str(p) for p in Path("/usr/local").glob("cuda-*")),
                                          reverse=True)
    for c in cands:
        if c and _has_toolkit(Path(c)):
            return str(Path(c))
    raise XqaBuildError(
        "no CUDA toolkit found (need bin/nvcc and libcudart): set CUDA_HOME to the toolkit root; "
        f"tried {[c for c in cands if c]}")


def normalize_arch(arch) -> str:
    """'9.0a', '90a', 'sm_90a', (9, 0) -> '9.0a'; '8.0' -> '8.0'."""
    if isinstance(arch, tuple):
        major, minor = arch
        return f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")
    s = str(arch).strip().lower().replace("sm_", "").replace("compute_", "")
    suffix = "a" if s.endswith("a") else ""
    s = s.rstrip("a")
    if "." not in s:
        if not s.isdigit() or len(s) < 2:
            raise ValueError(f"cannot parse CUDA arch {arch!r}; use e.g. '9.0a' or '8.0'")
        s = f"{s[:-1]}.{s[-1]}"
    major, minor = s.split(".")
    if not (major.isdigit() and minor.isdigit()) or int(major) < 8:
        raise ValueError(f"CUDA arch {arch!r} unsupported: xqa_jit needs sm_80 or newer")
    return f"{int(major)}.{int(minor)}{suffix}"


_DEVICE_ARCH: dict = {}


def device_arch(device_index: int) -> str:
    a = _DEVICE_ARCH.get(device_index)
    if a is None:
        import torch

        a = _DEVICE_ARCH[device_index] = normalize_arch(torch.cuda.get_device_capability(device_index))
    return a


def default_arch() -> str:
    """Arch to build for when no tensor names one: the current GPU, else TORCH_CUDA_ARCH_LIST's
    last (newest) entry, else 9.0a."""
    import torch

    if torch.cuda.is_available():
        return device_arch(torch.cuda.current_device())
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(",", ";").replace(" ", ";")
    items = [x.replace("+PTX", "") for x in env.split(";") if x.strip()]
    return normalize_arch(items[-1]) if items else "9.0a"


def arch_flags(arch: str) -> list[str]:
    a = arch.replace(".", "")
    return [f"-gencode=arch=compute_{a},code=sm_{a}"]


@dataclass(frozen=True)
class BuildPlan:
    spec: object
    arch: str
    source: str
    flags: tuple
    key: str
    entry: Path


_VERSIONS = None


def _versions() -> dict:
    global _VERSIONS
    if _VERSIONS is None:
        import torch

        from . import __version__

        _VERSIONS = {"xqa_jit": __version__, "torch": torch.__version__,
                     "cuda": str(torch.version.cuda), "format": CACHE_FORMAT}
    return _VERSIONS


def plan(spec, arch: str | None = None) -> BuildPlan:
    arch = normalize_arch(arch) if arch is not None else default_arch()
    source = render(spec)
    flags = tuple(NVCC_FLAGS) + tuple(arch_flags(arch))
    blob = json.dumps({"source": source, "flags": flags, "arch": arch, **_versions()},
                      sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()
    entry = cache_root() / f"{spec.name}-sm{arch.replace('.', '')}-{key[:16]}"
    return BuildPlan(spec, arch, source, flags, key, entry)


# ----------------------------------------------------------------------------- cache safety

_CHECKED_ROOTS: set = set()


def check_root_safe(root: Path) -> None:
    """Refuse a cache root that other users can write: a planted library is code execution."""
    if root in _CHECKED_ROOTS:
        return
    for p in (root, root.parent):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if p == root.parent and st.st_mode & stat.S_ISVTX:
            break  # /tmp-like parent: entries are protected by the sticky bit; root itself checked
        if st.st_mode & stat.S_IWOTH or (hasattr(os, "getuid") and st.st_uid not in (os.getuid(), 0)
                                         and st.st_mode & stat.S_IWGRP):
            raise XqaCacheError(
                f"xqa_jit cache directory {p} is writable by other users (mode "
                f"{stat.filemode(st.st_mode)}, owner uid {st.st_uid}); a library planted there "
                f"would run in this process. Use a private directory (XQA_JIT_CACHE_DIR) or "
                f"chmod o-w,g-w {p}")
        if p == root:
            continue
        break
    _CHECKED_ROOTS.add(root)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_entry(entry: Path, key: str | None = None) -> dict | None:
    """meta.json of a complete, intact entry, or None. A truncated or altered library, or one whose
    recorded key differs, is reported with a warning and treated as missing."""
    meta_path = entry / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("xqa_jit: unreadable cache entry %s (%s); it will be rebuilt", entry, e)
        return None
    lib = entry / meta.get("lib", LIB_NAME)
    if key is not None and meta.get("key") != key:
        log.warning("xqa_jit: cache entry %s has key %s, expected %s; ignored",
                    entry, meta.get("key"), key)
        return None
    try:
        digest = sha256_file(lib)
    except OSError as e:
        log.warning("xqa_jit: cache entry %s lost its library (%s); it will be rebuilt", entry, e)
        return None
    if digest != meta.get("sha256"):
        log.warning("xqa_jit: cache entry %s is corrupted (library checksum %s, recorded %s); "
                    "it will be rebuilt, never loaded", entry, digest[:12],
                    str(meta.get("sha256"))[:12])
        return None
    return meta


# ----------------------------------------------------------------------------- building


def _lock_path(p: BuildPlan) -> Path:
    return p.entry.parent / ".locks" / f"{p.entry.name}.lock"


def _acquire(lock, holder_file: Path, what: str):
    """Wait for the build lock, logging who holds it every XQA_JIT_LOCK_LOG seconds (default 30);
    give up after XQA_JIT_LOCK_TIMEOUT seconds if set (default: wait for ever)."""
    import filelock

    limit = float(os.environ.get("XQA_JIT_LOCK_TIMEOUT", "0") or 0)
    every = float(os.environ.get("XQA_JIT_LOCK_LOG", "30") or 30)
    t0 = time.monotonic()
    while True:
        step = every if limit <= 0 else max(0.05, min(every, limit - (time.monotonic() - t0)))
        try:
            lock.acquire(timeout=step)
            return
        except filelock.Timeout:
            waited = time.monotonic() - t0
            try:
                holder = holder_file.read_text().strip()
            except OSError:
                holder = "unknown"
            if limit > 0 and waited >= limit:
                raise XqaBuildError(
                    f"xqa_jit: gave up after {waited:.0f} s waiting for the build lock of {what} "
                    f"({lock.lock_file}); held by {holder}. Raise XQA_JIT_LOCK_TIMEOUT or unset it "
                    f"to wait for ever") from None
            log.warning("xqa_jit: waiting %.0f s for the build lock of %s, held by %s",
                        waited, what, holder)


def _cuda_home_for_torch() -> str:
    home = find_cuda_home()
    import torch.utils.cpp_extension as cpp

    cpp.CUDA_HOME = home  # torch guessed it at import from the nvcc wrapper's location
    os.environ["CUDA_HOME"] = home
    return home


def _compile(p: BuildPlan, tmp: Path, verbose: bool) -> None:
    import torch.utils.cpp_extension as cpp

    _cuda_home_for_torch()
    src = tmp / SRC_NAME
    src.write_text(p.source)
    # A fresh name per build: cpp_extension skips a build whose name and sources it has seen
    # before in this process, so rebuilding a damaged entry (or retrying) would yield no library.
    name = f"xqa_{p.key[:16]}_{uuid.uuid4().hex[:8]}"
    cpp.load(name=name, sources=[str(src)], extra_cuda_cflags=list(p.flags),
             build_directory=str(tmp), verbose=verbose, is_python_module=False, with_cuda=True)
    built = tmp / f"{name}.so"
    os.replace(built, tmp / LIB_NAME)
    for junk in ("build.ninja", ".ninja_deps", ".ninja_log", "kernel.cuda.o", "lock"):
        try:
            (tmp / junk).unlink()
        except OSError:
            pass


def _sweep_tmp(tmp_root: Path, max_age_s: float = 3600.0) -> None:
    """Remove build directories left by builders that died (older than an hour)."""
    try:
        now = time.time()
        for d in tmp_root.iterdir():
            try:
                if now - d.stat().st_mtime > max_age_s:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass
    except OSError:
        pass


def build(p: BuildPlan, verbose: bool | None = None) -> dict:
    """Build ``p`` into the cache unless a complete entry exists; return its meta."""
    check_root_safe(p.entry.parent)  # before trusting an entry: loads too, not only builds
    meta = read_entry(p.entry, p.key)
    if meta is not None:
        return meta
    if _env_flag("XQA_JIT_NO_BUILD"):
        raise XqaNoBuildError(
            f"xqa_jit: kernel {p.spec.name} for sm_{p.arch} is not in the cache {cache_root()} "
            f"and XQA_JIT_NO_BUILD is set. Warm the cache first: python cache_tool.py warmup "
            f"--config FILE (spec: {p.spec.to_json()})")
    import filelock

    verbose = _env_flag("XQA_JIT_VERBOSE") if verbose is None else verbose
    root = p.entry.parent
    root.mkdir(parents=True, exist_ok=True)
    check_root_safe(root)
    for sub in (".locks", ".tmp", ".failed", ".trash"):
        (root / sub).mkdir(exist_ok=True)
    lock = filelock.FileLock(str(_lock_path(p)))
    holder_file = _lock_path(p).with_suffix(".holder")
    _acquire(lock, holder_file, p.spec.name)
    try:
        meta = read_entry(p.entry, p.key)  # second check: another process may have finished it
        if meta is not None:
            return meta
        holder_file.write_text(f"pid {os.getpid()} on {socket.gethostname()} since "
                               f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        _sweep_tmp(root / ".tmp")
        if p.entry.exists():  # corrupt or foreign: move aside, never load
            shutil.move(str(p.entry), str(root / ".trash" / f"{p.entry.name}.{uuid.uuid4().hex}"))
        tmp = root / ".tmp" / f"{p.entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        os.makedirs(tmp, mode=0o777)  # honours the user's umask
        _build_log_start(p)
        t0 = time.perf_counter()
        try:
            _compile(p, tmp, verbose)
        except Exception as e:  # keep the source and log where the user can read them
            failed = root / ".failed" / p.entry.name
            shutil.rmtree(failed, ignore_errors=True)
            shutil.move(str(tmp), str(failed))
            msg = str(e)
            (failed / "build.log").write_text(msg)
            raise XqaBuildError(
                f"xqa_jit: building {p.spec.name} for sm_{p.arch} failed.\n"
                f"  rendered source: {failed / SRC_NAME}\n  flags: {' '.join(p.flags)}\n"
                f"  compiler log:\n{msg}") from None
        seconds = time.perf_counter() - t0
        meta = {"spec": p.spec.to_dict(), "name": p.spec.name, "key": p.key, "arch": p.arch,
                "flags": list(p.flags), "lib": LIB_NAME, "sha256": sha256_file(tmp / LIB_NAME),
                "size": (tmp / LIB_NAME).stat().st_size, "build_seconds": round(seconds, 3),
                "created": time.time(), "host": socket.gethostname(), **_versions()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.rename(tmp, p.entry)  # atomic publish of the whole directory
        log.info("xqa_jit: built %s for sm_%s in %.1f s", p.spec.name, p.arch, seconds)
        return meta
    finally:
        try:
            holder_file.unlink()
        except OSError:
            pass
        lock.release()


def _build_log_start(p: BuildPlan) -> None:
    if not log.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
    log.info("xqa_jit: building %s for sm_%s (first use; cached afterwards in %s)",
             p.spec.name, p.arch, p.entry.parent)


# ----------------------------------------------------------------------------- loading


class Module:
    """A loaded kernel library: ``launch(params_bytes, stream, device)`` and its geometry."""

    __slots__ = ("spec", "arch", "path", "lib", "launch", "info", "meta")

    def __init__(self, spec, arch: str, path: Path, meta: dict):
        self.spec, self.arch, self.path, self.meta = spec, arch, path, meta
        self.lib = ctypes.CDLL(str(path / meta.get("lib", LIB_NAME)), mode=os.RTLD_LOCAL)
        fn = self.lib.xqa_launch
        fn.argtypes = (ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int)
        fn.restype = ctypes.c_int
        self.launch = fn
        info = (ctypes.c_int64 * 16)()
        rc = self.lib.xqa_info(info, 16)
        if rc != 0:
            raise XqaBuildError(f"xqa_jit: {spec.name}: xqa_info failed with {rc}")
        self.info = dict(zip(INFO_FIELDS, info[: len(INFO_FIELDS)]))

    def occupancy(self, device: int) -> int:
        """Resident blocks per SM on ``device`` (queried once per device, no synchronisation)."""
        return int(self.lib.xqa_occupancy(ctypes.c_int(device)))


_MEMO: dict = {}
_MEMO_LOCK = threading.Lock()


def get_module(spec, arch: str | None = None) -> Module:
    """Build (if needed) and load ``spec`` for ``arch``; memoized in-process."""
    arch = normalize_arch(arch) if arch is not None else default_arch()
    key = (spec, arch)
    m = _MEMO.get(key)
    if m is not None:
        return m
    with _MEMO_LOCK:
        m = _MEMO.get(key)
        if m is None:
            p = plan(spec, arch)
            meta = build(p)
            m = _MEMO[key] = Module(spec, arch, p.entry, meta)
    return m


def warmup(specs, arch: str | None = None) -> list:
    """Build (or find) each spec for ``arch`` without loading it; returns the metas."""
    return [build(plan(s, arch)) for s in specs]
