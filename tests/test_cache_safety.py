"""CPU tests of the kernel cache's safety properties, with real nvcc builds (no GPU needed).

Each test gets its own cache root. One cheap spec (head_dim 64, group 1) is built once per module
for BASE_ARCH and copied into the tests that only need an entry to exist; the others build for real:
concurrent builders, a builder killed mid-nvcc, rebuilds of damaged entries, another arch, a umask.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import xqa_jit.build as B
from xqa_jit import DecodeSpec
from xqa_jit.build import XqaBuildError, XqaCacheError, XqaNoBuildError

REPO = Path(__file__).resolve().parent.parent
SPEC = DecodeSpec(head_dim=64, group=1)
ARCH = "9.0a"
BASE_ARCH = "8.0"  # the shared entry; test_other_arch asks for ARCH and must not get it

pytestmark = pytest.mark.build


# ----------------------------------------------------------------------------------- fixtures


def _reset(monkeypatch, root: Path) -> None:
    monkeypatch.setenv("XQA_JIT_CACHE_DIR", str(root))
    for var in ("XQA_JIT_NO_BUILD", "XQA_JIT_LOCK_TIMEOUT", "XQA_JIT_VERBOSE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(B, "_MEMO", {})  # keyed by (spec, arch), not by cache root
    monkeypatch.setattr(B, "_CHECKED_ROOTS", set())


@pytest.fixture(scope="module")
def base_entry(tmp_path_factory) -> Path:
    """A real build of SPEC for BASE_ARCH in a private root; tests copy it, never modify it."""
    root = tmp_path_factory.mktemp("base_cache")
    with pytest.MonkeyPatch.context() as mp:
        _reset(mp, root)
        p = B.plan(SPEC, BASE_ARCH)
        B.build(p)
    return p.entry


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh, not yet existing cache root for this test."""
    root = tmp_path / "cache"
    _reset(monkeypatch, root)
    return root


@pytest.fixture
def compiles(monkeypatch) -> list:
    """Records every real nvcc build done in this process."""
    calls = []
    real = B._compile

    def counting(p, tmp, verbose):
        calls.append((p.spec.name, p.arch))
        return real(p, tmp, verbose)

    monkeypatch.setattr(B, "_compile", counting)
    return calls


def _copy_base(base_entry: Path, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    dest = root / base_entry.name
    shutil.copytree(base_entry, dest)
    return dest


def _entries(root: Path) -> list:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _env(root: Path, **extra) -> dict:
    env = dict(os.environ, XQA_JIT_CACHE_DIR=str(root), **extra)
    env.pop("XQA_JIT_NO_BUILD", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ----------------------------------------------------------------------------------- races


_RACER = r"""
import json, os, sys, time
import xqa_jit.build as b
from xqa_jit import DecodeSpec

real = b._compile
def counting(*a, **k):
    print("COMPILE", os.getpid(), flush=True)
    return real(*a, **k)
b._compile = counting
spec = DecodeSpec(head_dim=64, group=1)
b.plan(spec, "9.0a")                      # imports done before the race starts
open(sys.argv[1] + ".ready.%d" % os.getpid(), "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.002)
m = b.get_module(spec, "9.0a")
print("RESULT " + json.dumps({"sha": m.meta["sha256"], "created": m.meta["created"],
                              "path": str(m.path), "threads": m.info["threads"]}), flush=True)
"""


def test_concurrent_builders_build_once(cache, tmp_path):
    n = 4
    sig = tmp_path / "sig"
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(sig), str(go)], cwd=REPO,
                              env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(n)]
    try:
        deadline = time.monotonic() + 180
        while len(list(tmp_path.glob("sig.ready.*"))) < n:
            assert time.monotonic() < deadline, "racers did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        go.touch()  # all n ask for the same missing spec at once
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    stdout = "".join(o for o, _ in outs)
    assert stdout.count("COMPILE") == 1, stdout  # exactly one process ran nvcc
    results = [json.loads(line[len("RESULT "):]) for line in stdout.splitlines()
               if line.startswith("RESULT ")]
    assert len(results) == n
    assert len({json.dumps(r, sort_keys=True) for r in results}) == 1  # all loaded the same entry
    assert results[0]["threads"] > 0
    assert len(_entries(cache)) == 1
    assert list((cache / ".tmp").iterdir()) == []


_BUILDER = r"""
import xqa_jit.build as b
from xqa_jit import DecodeSpec
b.build(b.plan(DecodeSpec(head_dim=64, group=1), "9.0a"))
"""


def test_sigkilled_builder_leaves_no_lock_and_no_entry(cache, monkeypatch):
    p = B.plan(SPEC, ARCH)
    proc = subprocess.Popen([sys.executable, "-c", _BUILDER], cwd=REPO, env=_env(cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        ninja = []
        while not ninja:  # cpp_extension writes build.ninja right before running nvcc
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the builder never reached nvcc"
            ninja = list(cache.glob(".tmp/*/build.ninja"))
            time.sleep(0.02)
        time.sleep(0.7)
        tmp = ninja[0].parent
        assert not list(tmp.glob("*.so")), "nvcc finished before the kill; test is not meaningful"
        os.kill(proc.pid, signal.SIGKILL)  # the builder only; its nvcc may linger as an orphan
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        # nothing half-built is visible: no published entry, nothing that reads as one
        assert not p.entry.exists()
        assert _entries(cache) == []
        assert B.read_entry(p.entry, p.key) is None
        # the lock died with the builder: a new build starts at once and completes
        monkeypatch.setenv("XQA_JIT_LOCK_TIMEOUT", "20")
        t0 = time.monotonic()
        meta = B.build(p)
        assert time.monotonic() - t0 < 120
        assert meta["sha256"] == B.sha256_file(p.entry / B.LIB_NAME)
        assert B.get_module(SPEC, ARCH).info["threads"] > 0
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # orphaned ninja/nvcc of the killed builder
        except (ProcessLookupError, PermissionError):
            pass


def test_lock_timeout_names_the_holder(cache, monkeypatch):
    import filelock

    p = B.plan(SPEC, ARCH)
    lock_path = B._lock_path(p)
    lock_path.parent.mkdir(parents=True)
    holder = f"pid {os.getpid()} on test-host since 2025-01-01 00:00:00"
    lock = filelock.FileLock(str(lock_path))
    lock.acquire()
    try:
        lock_path.with_suffix(".holder").write_text(holder)
        monkeypatch.setenv("XQA_JIT_LOCK_TIMEOUT", "1")
        t0 = time.monotonic()
        with pytest.raises(XqaBuildError) as ei:
            B.build(p)
        waited = time.monotonic() - t0
    finally:
        lock.release()
    msg = str(ei.value)
    assert 0.9 <= waited < 15
    assert holder in msg and SPEC.name in msg and "XQA_JIT_LOCK_TIMEOUT" in msg
    assert str(lock_path) in msg


# ----------------------------------------------------------------------------------- loading


def test_complete_entry_loads_read_only_without_the_lock(base_entry, cache, monkeypatch):
    import filelock

    entry = _copy_base(base_entry, cache)

    def no_lock(*a, **k):
        raise AssertionError("the load path took the build lock")

    monkeypatch.setattr(filelock, "FileLock", no_lock)
    before = sorted(str(q) for q in cache.rglob("*"))
    os.chmod(entry, 0o555)
    os.chmod(cache, 0o555)
    try:
        if os.geteuid() != 0:  # as root chmod does not stop writes; the lock patch still holds
            with pytest.raises(OSError):
                (cache / "probe").write_text("x")
        m = B.get_module(SPEC, BASE_ARCH)
        assert m.info["threads"] > 0 and m.path == entry
    finally:
        os.chmod(cache, 0o755)
        os.chmod(entry, 0o755)
    assert sorted(str(q) for q in cache.rglob("*")) == before  # nothing written


def test_truncated_library_is_rebuilt_never_loaded(base_entry, cache, monkeypatch, compiles,
                                                   caplog):
    entry = _copy_base(base_entry, cache)
    lib = entry / B.LIB_NAME
    good_size = lib.stat().st_size
    os.truncate(lib, good_size // 2)
    monkeypatch.setenv("XQA_JIT_NO_BUILD", "1")
    with caplog.at_level("WARNING", logger="xqa_jit"):
        with pytest.raises(XqaNoBuildError):  # present but damaged: never handed out
            B.get_module(SPEC, BASE_ARCH)
    assert "corrupted" in caplog.text and str(entry) in caplog.text
    monkeypatch.delenv("XQA_JIT_NO_BUILD")
    m = B.get_module(SPEC, BASE_ARCH)
    assert compiles == [(SPEC.name, BASE_ARCH)]
    assert m.path == entry and lib.stat().st_size == m.meta["size"] > good_size // 2
    assert B.read_entry(entry, m.meta["key"]) is not None
    assert len(list((cache / ".trash").iterdir())) == 1  # the damaged entry was set aside


def test_corrupted_meta_is_rebuilt(base_entry, cache, compiles, caplog):
    entry = _copy_base(base_entry, cache)
    (entry / "meta.json").write_text('{"key": "abc", "sha256": ')
    with caplog.at_level("WARNING", logger="xqa_jit"):
        m = B.get_module(SPEC, BASE_ARCH)
    assert "unreadable" in caplog.text
    assert compiles == [(SPEC.name, BASE_ARCH)]
    assert json.loads((entry / "meta.json").read_text())["sha256"] == m.meta["sha256"]


def test_entry_for_another_arch_is_never_used(base_entry, cache, monkeypatch, compiles, caplog):
    old = _copy_base(base_entry, cache)
    p = B.plan(SPEC, ARCH)
    assert p.entry != old and p.key != json.loads((old / "meta.json").read_text())["key"]
    m = B.get_module(SPEC, ARCH)
    assert compiles == [(SPEC.name, ARCH)]  # a new build, into its own directory
    assert m.path == p.entry and m.meta["arch"] == ARCH
    assert json.loads((old / "meta.json").read_text())["arch"] == BASE_ARCH
    assert _entries(cache) == sorted([old.name, p.entry.name])

    # An entry whose recorded key is not the one asked for is ignored, even at the right path
    monkeypatch.setattr(B, "_MEMO", {})
    monkeypatch.setenv("XQA_JIT_NO_BUILD", "1")
    meta = json.loads((p.entry / "meta.json").read_text())
    meta["key"] = json.loads((old / "meta.json").read_text())["key"]
    (p.entry / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="xqa_jit"):
        with pytest.raises(XqaNoBuildError):
            B.get_module(SPEC, ARCH)
    assert "expected" in caplog.text
    # ... and so is another arch's complete entry planted under this arch's name
    shutil.rmtree(p.entry)
    shutil.copytree(old, p.entry)
    with pytest.raises(XqaNoBuildError):
        B.get_module(SPEC, ARCH)
    assert compiles == [(SPEC.name, ARCH)]


# ----------------------------------------------------------------------------------- permissions


def test_world_writable_root_is_refused(base_entry, cache, tmp_path, monkeypatch, compiles):
    cache.mkdir()
    os.chmod(cache, 0o777)
    with pytest.raises(XqaCacheError) as ei:
        B.build(B.plan(SPEC, ARCH))
    assert str(cache) in str(ei.value) and "writable by other users" in str(ei.value)
    assert compiles == []

    # an existing entry in a world-writable root is not loaded either (it could be planted)
    other = tmp_path / "cache2"
    _reset(monkeypatch, other)
    _copy_base(base_entry, other)
    os.chmod(other, 0o757)
    with pytest.raises(XqaCacheError):
        B.get_module(SPEC, BASE_ARCH)


_UMASK_BUILDER = r"""
import os
os.umask(0o077)
import xqa_jit.build as b
from xqa_jit import DecodeSpec
b.build(b.plan(DecodeSpec(head_dim=64, group=1), "9.0a"))
"""


def test_entries_honour_the_umask(tmp_path):
    root = tmp_path / "private" / "cache"
    r = subprocess.run([sys.executable, "-c", _UMASK_BUILDER], cwd=REPO, env=_env(root),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(_entries(root)) == 1
    paths = [root, *root.rglob("*")]
    loose = [f"{q} {stat.filemode(q.stat().st_mode)}" for q in paths
             if q.stat().st_mode & 0o077]
    assert loose == []
    entry = root / _entries(root)[0]
    assert stat.S_IMODE(entry.stat().st_mode) == 0o700
    assert stat.S_IMODE((entry / "meta.json").stat().st_mode) == 0o600


# ----------------------------------------------------------------------------------- failures


def test_no_build_names_the_missing_spec(cache, monkeypatch, compiles):
    monkeypatch.setenv("XQA_JIT_NO_BUILD", "1")
    with pytest.raises(XqaNoBuildError) as ei:
        B.get_module(SPEC, ARCH)
    assert SPEC.name in str(ei.value) and "warmup" in str(ei.value)
    assert compiles == []
    assert not (cache.exists() and _entries(cache))


def test_failed_build_reports_nvcc_output_and_source(cache, monkeypatch):
    marker = "xqa_jit_test_deliberately_broken"
    monkeypatch.setattr(B, "render", lambda spec: f"#error {marker}\nint main( {{\n")
    p = B.plan(SPEC, ARCH)
    with pytest.raises(XqaBuildError) as ei:
        B.build(p)
    msg = str(ei.value)
    assert SPEC.name in msg
    assert marker in msg and "error" in msg  # nvcc's diagnostic quotes the #error text
    m = re.search(r"rendered source: (\S+)", msg)
    assert m, msg
    src = Path(m.group(1))
    assert src.is_file() and marker in src.read_text()
    assert (src.parent / "build.log").is_file()
    assert not p.entry.exists() and _entries(cache) == []
