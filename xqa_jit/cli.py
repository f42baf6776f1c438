"""``cache_tool.py`` / ``xqa-jit-cache``: warm, inspect, verify, ship and clear the kernel cache.

    warmup [SPEC ...] [--config FILE.json] [--model HF_CONFIG.json] [--kv-dtype fp8] [--spec-len N]
           [--tp N] [--jobs N] [--arch 9.0a]    build in parallel (no GPU needed)
    list                                        spec, arch, size, build time, age
    info SPEC                                   meta.json of the entries for a spec
    verify                                      every entry loads and matches its checksum
    clear [--older-than DAYS]                   remove entries (and dead build directories)
    export FILE.tar [--arch A] [PATTERN ...]    complete, intact entries only
    import FILE.tar                             checked, then published atomically one by one
    render SPEC ... --out DIR                   CUDA source only, no build

SPEC is a spec name (``decode_qbf16_kvbf16_d128_g4``) or its JSON form. Builds run in separate
processes ("spawn": torch's cpp_extension is not thread-safe and a forked CUDA context is unusable);
each one goes through ``xqa_jit.build.build``, so its lock, atomic publish and checksums apply.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import time
import uuid
from pathlib import Path, PurePosixPath

from . import build as _build
from .spec import SpecError, _SpecBase

ENTRY_FILES = (_build.SRC_NAME, _build.LIB_NAME, "meta.json")
_ENTRY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class _Fail(Exception):
    """A user-facing failure: message printed, exit status 1."""


def _err(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _setup_logging(verbose: bool):
    """xqa_jit's logger to stderr: warnings always (corrupt entries, lock waits); with -v also the
    one-line build start/end messages of build.py. Returns a function that undoes it."""
    log = logging.getLogger("xqa_jit")
    old_level = log.level
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(h)
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    # "No CUDA runtime is found": expected on the GPU-less hosts warmup is meant for
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

    def undo() -> None:
        log.removeHandler(h)
        log.setLevel(old_level)

    return undo


# ----------------------------------------------------------------------------- formatting


def _size(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _age(seconds) -> str:
    s = max(0.0, float(seconds))
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.0f} h"
    return f"{s / 86400:.0f} d"


# ----------------------------------------------------------------------------- entries


def _entry_dirs(root: Path) -> list:
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if not d.name.startswith(".") and d.is_dir())


def _read_meta(d: Path):
    """(meta, None) or (None, problem) without checking the library."""
    try:
        meta = json.loads((d / "meta.json").read_text())
    except FileNotFoundError:
        return None, "no meta.json"
    except (OSError, ValueError) as e:
        return None, f"unreadable meta.json ({e})"
    if not isinstance(meta, dict):
        return None, "meta.json is not an object"
    return meta, None


def _expected_dirname(meta: dict) -> str:
    return f"{meta.get('name')}-sm{str(meta.get('arch', '')).replace('.', '')}-" \
           f"{str(meta.get('key', ''))[:16]}"


def _check_entry(d: Path):
    """(meta, spec, None) for a complete, self-consistent, intact entry; else (meta, None, why)."""
    meta, why = _read_meta(d)
    if meta is None:
        return None, None, why
    if meta.get("lib", _build.LIB_NAME) != _build.LIB_NAME:
        return meta, None, f"meta.json names an unexpected library {meta.get('lib')!r}"
    if d.name != _expected_dirname(meta):
        return meta, None, f"directory name does not match meta.json ({_expected_dirname(meta)})"
    try:
        spec = _SpecBase.from_dict(meta.get("spec") or {})
    except (SpecError, TypeError) as e:
        return meta, None, f"meta.json holds an invalid spec ({e})"
    if spec.name != meta.get("name"):
        return meta, None, f"spec {spec.name} does not match name {meta.get('name')}"
    try:
        digest = _build.sha256_file(d / _build.LIB_NAME)
    except OSError as e:
        return meta, None, f"library missing ({e.strerror or e})"
    if digest != meta.get("sha256"):
        return meta, None, (f"library checksum {digest[:12]} differs from the recorded "
                            f"{str(meta.get('sha256'))[:12]} (truncated or altered)")
    return meta, spec, None


def _current_key(spec, arch: str):
    try:
        return _build.plan(spec, arch).key
    except Exception:  # noqa: BLE001 - an arch or template this version cannot plan
        return None


def _versions_text(meta: dict) -> str:
    return (f"xqa_jit {meta.get('xqa_jit')}, torch {meta.get('torch')}, "
            f"CUDA {meta.get('cuda')}")


def _lock_for(root: Path, entry_name: str):
    import filelock

    (root / ".locks").mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(str(root / ".locks" / f"{entry_name}.lock"))


def _remove_dir(root: Path, d: Path) -> None:
    """Entries disappear atomically: renamed into .trash first, then deleted."""
    trash = root / ".trash"
    trash.mkdir(exist_ok=True)
    dest = trash / f"{d.name}.{uuid.uuid4().hex[:8]}"
    os.rename(d, dest)
    shutil.rmtree(dest, ignore_errors=True)


def _parse_spec(text: str):
    try:
        return _SpecBase.parse(text)
    except (ValueError, TypeError) as e:  # SpecError is a ValueError, as is bad JSON
        raise SpecError(f"{text!r} is neither a spec name nor a spec's JSON: {e}") from None


# ----------------------------------------------------------------------------- warmup


def _specs_from_config_file(path: str) -> list:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SpecError(f"cannot read spec list {path}: {e}") from None
    if isinstance(data, dict):
        data = data["specs"] if "specs" in data else [data]
    if not isinstance(data, list):
        raise SpecError(f"{path}: expected a JSON list of spec objects or spec names")
    specs = []
    for i, item in enumerate(data):
        try:
            if isinstance(item, str):
                specs.append(_parse_spec(item))
            elif isinstance(item, dict):
                specs.append(_SpecBase.from_dict(item))
            else:
                raise SpecError(f"expected an object or a name, got {type(item).__name__}")
        except (SpecError, TypeError) as e:
            raise SpecError(f"{path}: spec #{i}: {e}") from None
    return specs


def _collect_specs(a) -> list:
    from .models import expand_specs, load_config, specs_for_model

    kv = ["auto"] + list(a.kv_dtype or [])
    given = [_parse_spec(s) for s in a.specs]
    for path in a.config or []:
        given += _specs_from_config_file(path)
    specs = expand_specs(given, kv_dtypes=kv, spec_len=a.spec_len)
    for path in a.model or []:
        try:
            cfg = load_config(path)
        except (OSError, ValueError) as e:
            raise SpecError(f"cannot read model config {path}: {e}") from None
        try:
            qd = [x for d in (a.dtype or ["both"]) for x in (("bf16", "fp16") if d == "both" else (d,))]
            specs += specs_for_model(cfg, kv_dtypes=kv, spec_len=a.spec_len, tp=a.tp, q_dtypes=qd,
                                     arch=_arches(getattr(a, "arch", None))[0])
        except (KeyError, TypeError) as e:
            raise SpecError(f"{path}: not a decoder config this tool understands (missing "
                            f"{e})") from None
    return list(dict.fromkeys(specs))


def _arches(values) -> list:
    if not values:
        return [_build.default_arch()]
    out = []
    for v in values:
        for a in v.split(","):
            if a.strip():
                n = _build.normalize_arch(a.strip())
                if n not in out:
                    out.append(n)
    return out


def _init_worker(root: str, verbose: bool) -> None:
    os.environ["XQA_JIT_CACHE_DIR"] = root
    os.environ.pop("XQA_JIT_NO_BUILD", None)
    _setup_logging(verbose)


def _warm_one(spec_json: str, arch: str) -> dict:
    """One build, in a worker process (or in-process with --jobs 1)."""
    spec = _SpecBase.parse(spec_json)
    t0 = time.perf_counter()
    res = {"name": spec.name, "arch": arch, "status": "built", "seconds": 0.0, "error": None}
    try:
        p = _build.plan(spec, arch)
        if _build.read_entry(p.entry, p.key) is not None:
            res["status"] = "cached"  # another process finished it meanwhile
        else:
            meta = _build.build(p)
            res["size"] = meta.get("size")
    except Exception as e:  # noqa: BLE001 - reported per spec; the other builds go on
        res["status"] = "FAILED"
        res["error"] = f"{type(e).__name__}: {e}"
    res["seconds"] = time.perf_counter() - t0
    return res


def _error_digest(text: str, most: int = 6) -> list:
    """The lines of a build error worth a terminal: what failed, where the source is, and the
    compiler's own error lines (the full log stays in .failed/<entry>/build.log)."""
    lines = text.splitlines()
    head = lines[:2]
    errs = [ln.strip() for ln in lines[2:] if re.search(r"\berror\b", ln, re.I)
            and not ln.lstrip().startswith(("Error building extension", "FAILED:"))]
    return head + errs[:most] + (["..."] if len(errs) > most else [])


def _cmd_warmup(a) -> int:
    specs = _collect_specs(a)
    if not specs:
        raise SpecError("nothing to build: give spec names, --config FILE.json or --model "
                        "CONFIG.json")
    arches = _arches(a.arch)
    root = _build.cache_root()
    _build.check_root_safe(root)
    os.environ.pop("XQA_JIT_NO_BUILD", None)  # warming up is building
    n = len(specs) * len(arches)
    _err(f"warmup: {len(specs)} spec(s) x {', '.join('sm_' + x for x in arches)} -> {root}")
    t0 = time.perf_counter()
    results, todo = [], []

    def progress(r: dict) -> None:
        results.append(r)
        tail = f"{r['seconds']:.1f} s" if r["status"] != "cached" else "(in cache)"
        _err(f"[{len(results)}/{n}] {r['status']:<6} {r['name']} sm_{r['arch']} {tail}")
        if r["error"]:
            _err("    " + "\n    ".join(_error_digest(r["error"])))

    for arch in arches:
        for s in specs:
            try:
                p = _build.plan(s, arch)
            except Exception as e:  # noqa: BLE001 - e.g. a template this version lacks
                progress({"name": s.name, "arch": arch, "status": "FAILED", "seconds": 0.0,
                          "error": f"{type(e).__name__}: {e}"})
                continue
            if _build.read_entry(p.entry, p.key) is not None:
                progress({"name": s.name, "arch": arch, "status": "cached", "seconds": 0.0,
                          "error": None})
            else:
                todo.append((s.to_json(), arch))
    jobs = max(1, min(a.jobs or (os.cpu_count() or 1), len(todo) or 1))
    if todo and jobs == 1:
        for sj, arch in todo:
            progress(_warm_one(sj, arch))
    elif todo:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(str(root), a.verbose)) as pool:
            futs = {pool.submit(_warm_one, sj, arch): (sj, arch) for sj, arch in todo}
            try:
                for f in as_completed(futs):
                    try:
                        progress(f.result())
                    except Exception as e:  # noqa: BLE001 - a worker that died (e.g. OOM)
                        sj, arch = futs[f]
                        progress({"name": _SpecBase.parse(sj).name, "arch": arch,
                                  "status": "FAILED", "seconds": 0.0,
                                  "error": f"{type(e).__name__}: {e}"})
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    wall = time.perf_counter() - t0
    count = {k: sum(r["status"] == k for r in results) for k in ("built", "cached", "FAILED")}
    build_s = sum(r["seconds"] for r in results if r["status"] == "built")
    print(f"warmup: {n} kernel(s) for {', '.join('sm_' + x for x in arches)} in {wall:.1f} s wall "
          f"({count['built']} built, {count['cached']} cached, {count['FAILED']} failed; "
          f"{build_s:.1f} s of builds on {jobs} job(s)); cache: {root}", flush=True)
    if count["FAILED"]:
        print(f"warmup: failed builds keep their source and log in {root / '.failed'}")
        return 1
    return 0


# ----------------------------------------------------------------------------- list / info


def _cmd_list(a) -> int:
    root = _build.cache_root()
    rows, now, total = [], time.time(), 0
    for d in _entry_dirs(root):
        meta, why = _read_meta(d)
        if meta is None:
            rows.append({"spec": d.name, "arch": "?", "size": None, "build_seconds": None,
                         "age_s": now - d.stat().st_mtime, "problem": why, "path": str(d)})
            continue
        total += int(meta.get("size") or 0)
        rows.append({"spec": meta.get("name", d.name), "arch": meta.get("arch", "?"),
                     "size": meta.get("size"), "build_seconds": meta.get("build_seconds"),
                     "age_s": now - float(meta.get("created") or d.stat().st_mtime),
                     "problem": None, "path": str(d)})
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"# {root}: {len(rows)} entr{'y' if len(rows) == 1 else 'ies'}, {_size(total)}")
    if not rows:
        return 0
    w = max(len("SPEC"), *(len(r["spec"]) for r in rows))
    print(f"{'SPEC':<{w}}  {'ARCH':<5} {'SIZE':>10} {'BUILD':>8} {'AGE':>7}")
    for r in sorted(rows, key=lambda r: (r["spec"], r["arch"])):
        bs = f"{r['build_seconds']:.1f} s" if r["build_seconds"] is not None else "-"
        size = _size(r["size"]) if r["size"] is not None else "-"
        line = f"{r['spec']:<{w}}  {r['arch']:<5} {size:>10} {bs:>8} {_age(r['age_s']):>7}"
        print(line + (f"  [{r['problem']}]" if r["problem"] else ""))
    return 0


def _matching(root: Path, text: str) -> list:
    """Entries whose spec name equals the parsed SPEC, else matches it as a glob/substring."""
    try:
        name = _parse_spec(text).name
        pattern = None
    except SpecError:
        name, pattern = None, text if any(c in text for c in "*?[") else f"*{text}*"
    out = []
    for d in _entry_dirs(root):
        meta, _ = _read_meta(d)
        n = (meta or {}).get("name") or d.name
        if (name is not None and n == name) or (pattern and fnmatch.fnmatchcase(n, pattern)):
            out.append(d)
    return out


def _cmd_info(a) -> int:
    root = _build.cache_root()
    found = _matching(root, a.spec)
    if not found:
        try:
            spec = _parse_spec(a.spec)
            p = _build.plan(spec, _arches(a.arch)[0])
            _err(f"info: no entry for {spec.name}; a build for sm_{p.arch} would go to {p.entry}")
        except SpecError:
            _err(f"info: no entry matches {a.spec!r} in {root}")
        return 1
    for d in found:
        meta, spec, why = _check_entry(d)
        info = {"path": str(d), "intact": why is None}
        if why:
            info["problem"] = why
        if spec is not None:
            info["current"] = _current_key(spec, meta["arch"]) == meta.get("key")
        print(json.dumps({**info, "meta": meta}, indent=1, sort_keys=False))
    return 0


# ----------------------------------------------------------------------------- verify


def _cmd_verify(a) -> int:
    root = _build.cache_root()
    dirs = _entry_dirs(root)
    bad = stale = 0
    for d in dirs:
        meta, spec, why = _check_entry(d)
        if why is None:
            try:  # the library must load and answer xqa_info (no GPU needed)
                _build.Module(spec, meta["arch"], d, meta)
            except Exception as e:  # noqa: BLE001 - any load failure is a verification failure
                why = f"does not load: {type(e).__name__}: {e}"
        if why is not None:
            bad += 1
            print(f"FAIL  {d.name}: {why}")
            continue
        note = ""
        if _current_key(spec, meta["arch"]) != meta.get("key"):
            stale += 1
            note = f"  (stale: built with {_versions_text(meta)}; this installation ignores it)"
        print(f"ok    {meta['name']} sm_{meta['arch']}{note}")
    print(f"verify: {len(dirs)} entr{'y' if len(dirs) == 1 else 'ies'} in {root}: "
          f"{len(dirs) - bad} ok ({stale} stale), {bad} failed")
    return 1 if bad else 0


# ----------------------------------------------------------------------------- clear


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _cmd_clear(a) -> int:
    import filelock

    root = _build.cache_root()
    if not root.is_dir():
        print(f"clear: {root} does not exist; nothing to do")
        return 0
    _build.check_root_safe(root)
    limit = None if a.older_than is None else a.older_than * 86400.0
    now = time.time()
    removed = busy = freed = 0
    for d in _entry_dirs(root):
        meta, _ = _read_meta(d)
        created = float((meta or {}).get("created") or d.stat().st_mtime)
        if limit is not None and now - created <= limit:
            continue
        lock = _lock_for(root, d.name)
        try:  # an entry being rebuilt right now is left to its builder
            lock.acquire(timeout=0)
        except filelock.Timeout:
            busy += 1
            continue
        try:
            _remove_dir(root, d)
            removed += 1
            freed += int((meta or {}).get("size") or 0)
        finally:
            lock.release()
    dead = 0
    tmp = root / ".tmp"
    for d in sorted(tmp.iterdir()) if tmp.is_dir() else []:
        parts = d.name.rsplit(".", 2)  # <entry>.<pid>.<rand> or import.<pid>.<rand>
        if parts[0] == "import":
            alive = len(parts) == 3 and parts[1].isdigit() and _pid_alive(int(parts[1]))
        else:
            lock = _lock_for(root, parts[0])
            try:  # a builder holds its entry's lock as long as its build directory exists
                lock.acquire(timeout=0)
                lock.release()
                alive = False
            except filelock.Timeout:
                alive = True
        if not alive:
            shutil.rmtree(d, ignore_errors=True)
            dead += 1
    for sub in (".trash", ".failed"):
        for d in sorted((root / sub).iterdir()) if (root / sub).is_dir() else []:
            if sub == ".failed" and limit is not None and now - d.stat().st_mtime <= limit:
                continue
            shutil.rmtree(d, ignore_errors=True)
    print(f"clear: removed {removed} entr{'y' if removed == 1 else 'ies'} ({_size(freed)}) "
          f"and {dead} dead build director{'y' if dead == 1 else 'ies'} from {root}"
          + (f"; {busy} being built, left alone" if busy else ""))
    return 0


# ----------------------------------------------------------------------------- export / import


def _tar_mode(path: str, write: bool) -> str:
    if not write:
        return "r:*"
    return "w:gz" if path.endswith((".tar.gz", ".tgz")) else "w"


def _cmd_export(a) -> int:
    root = _build.cache_root()
    arches = set(_arches(a.arch)) if a.arch else None
    out = Path(a.file)
    part = out.with_name(f".{out.name}.{os.getpid()}.partial")
    n = skipped = 0

    def clean(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.mode = 0o755 if ti.isdir() or ti.name.endswith(".so") else 0o644
        return ti

    try:
        with tarfile.open(part, _tar_mode(a.file, True)) as tf:
            for d in _entry_dirs(root):
                meta, spec, why = _check_entry(d)
                if why is not None:
                    _err(f"export: skipping {d.name}: {why}")
                    skipped += 1
                    continue
                if arches and meta["arch"] not in arches:
                    continue
                if a.patterns and not any(fnmatch.fnmatchcase(meta["name"], p)
                                          for p in a.patterns):
                    continue
                for f in ENTRY_FILES:
                    if (d / f).is_file():
                        tf.add(str(d / f), arcname=f"{d.name}/{f}", filter=clean)
                n += 1
        os.replace(part, out)  # a half-written archive never carries the final name
    finally:
        if part.exists():
            part.unlink()
    print(f"export: {n} entr{'y' if n == 1 else 'ies'} -> {out}"
          + (f" ({skipped} broken, skipped)" if skipped else ""))
    return 0


def _plan_import(members) -> dict:
    """Group members by entry; refuse the archive on any path traversal, link or device."""
    groups: dict = {}
    for m in members:
        raw = m.name
        pp = PurePosixPath(raw)
        parts = [p for p in pp.parts if p not in ("", ".")]
        if raw.startswith(("/", "\\")) or pp.is_absolute() or ".." in parts or "\\" in raw \
                or (parts and ":" in parts[0]):
            raise _Fail(f"import: refusing archive: member {raw!r} escapes the cache directory")
        if m.issym() or m.islnk():
            raise _Fail(f"import: refusing archive: member {raw!r} is a link "
                        f"(to {m.linkname!r})")
        if not (m.isfile() or m.isdir()):
            raise _Fail(f"import: refusing archive: member {raw!r} is not a regular file")
        if m.isdir():
            continue
        if len(parts) != 2 or parts[1] not in ENTRY_FILES or not _ENTRY_RE.match(parts[0]):
            _err(f"import: ignoring {raw!r} (not <entry>/{{{','.join(ENTRY_FILES)}}})")
            continue
        groups.setdefault(parts[0], {})[parts[1]] = m
    return groups


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # mode & ~umask
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _cmd_import(a) -> int:
    root = _build.cache_root()
    root.mkdir(parents=True, exist_ok=True)
    _build.check_root_safe(root)
    for sub in (".locks", ".tmp", ".trash"):
        (root / sub).mkdir(exist_ok=True)
    try:
        tf = tarfile.open(a.file, _tar_mode(a.file, False))
    except (OSError, tarfile.TarError) as e:
        raise _Fail(f"import: cannot read {a.file}: {e}") from None
    counts = {"imported": 0, "present": 0, "failed": 0, "stale": 0}
    with tf:
        groups = _plan_import(tf.getmembers())  # every member checked before anything is written
        for name, files in sorted(groups.items()):
            missing = [f for f in ("meta.json", _build.LIB_NAME) if f not in files]
            if missing:
                _err(f"import: {name}: incomplete entry (missing {', '.join(missing)}); skipped")
                counts["failed"] += 1
                continue
            base = root / ".tmp" / f"import.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            try:
                os.makedirs(base / name, mode=0o777)
                for fname, m in files.items():
                    data = tf.extractfile(m).read()
                    _write_new(base / name / fname, data, 0o755 if fname.endswith(".so") else 0o644)
                meta, spec, why = _check_entry(base / name)
                if why is not None:
                    _err(f"import: {name}: {why}; skipped")
                    counts["failed"] += 1
                    continue
                status = _publish(root, base / name, meta)
                counts[status] += 1
                if _current_key(spec, meta["arch"]) != meta["key"]:
                    counts["stale"] += 1
                    _err(f"import: note: {name} was built with {_versions_text(meta)}; this "
                         f"installation will not use it")
            finally:
                shutil.rmtree(base, ignore_errors=True)
    print(f"import: {counts['imported']} imported, {counts['present']} already present, "
          f"{counts['failed']} rejected, {counts['stale']} stale -> {root}")
    return 1 if counts["failed"] else 0


def _publish(root: Path, src: Path, meta: dict) -> str:
    """Rename a checked entry into place under its build lock (never over a builder's work)."""
    dest = root / src.name
    lock = _lock_for(root, src.name)
    _build._acquire(lock, root / ".locks" / f"{src.name}.holder", meta["name"])
    try:
        current = _build.read_entry(dest, meta["key"])
        if current is not None and current.get("sha256") == meta["sha256"]:
            return "present"
        if dest.exists():  # a corrupt or different entry: set aside, never merged into
            os.rename(dest, root / ".trash" / f"{dest.name}.{uuid.uuid4().hex[:8]}")
        os.rename(src, dest)
        return "imported"
    finally:
        lock.release()


# ----------------------------------------------------------------------------- render


def _cmd_render(a) -> int:
    from .render import render

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    arch = _build.normalize_arch(a.arch[0].split(",")[0]) if a.arch else None
    for text in a.specs:
        spec = _parse_spec(text)
        path = out / f"{spec.name}.cu"
        path.write_text(render(spec))
        print(path)
    flags = list(_build.NVCC_FLAGS) + (_build.arch_flags(arch) if arch else ["-gencode=..."])
    _err(f"render: nvcc flags used by builds: {' '.join(flags)}")
    return 0


# ----------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cache_tool.py",
                                 description="Manage the xqa_jit kernel cache "
                                             "(root: $XQA_JIT_CACHE_DIR, else ~/.cache/xqa_jit).")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def arch_opt(p, help_):
        p.add_argument("--arch", action="append", metavar="ARCH", help=help_)

    w = sub.add_parser("warmup", help="build every listed spec in parallel (no GPU needed)")
    w.add_argument("specs", nargs="*", metavar="SPEC", help="spec names or JSON")
    w.add_argument("--config", action="append", metavar="FILE.json",
                   help="JSON list of spec objects or spec names")
    w.add_argument("--model", action="append", metavar="CONFIG.json",
                   help="a Hugging Face config.json (or its directory): the specs that model needs")
    w.add_argument("--kv-dtype", action="append", choices=("auto", "fp8", "e4m3", "e5m2"),
                   help="also build FP8 KV-cache variants (fp8 = e4m3); auto: the model's own")
    w.add_argument("--dtype", action="append", choices=("auto", "fp16", "bf16", "both"),
                   help="q dtypes to build for --model (default both: engines run bf16 checkpoints "
                        "in fp16 and vice versa; 'auto' = the config's dtype)")
    w.add_argument("--spec-len", type=int, metavar="N",
                   help="also build q_len=N (causal speculative decoding) variants, N <= 16")
    w.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallelism for --model (heads per GPU); default 1")
    w.add_argument("--jobs", "-j", type=int, metavar="N", help="parallel builds (default: CPUs)")
    arch_opt(w, "target arch, e.g. 9.0a or 8.0 (repeat or comma-separate for several); "
                "default: this GPU, else TORCH_CUDA_ARCH_LIST's last, else 9.0a")
    w.add_argument("--verbose", "-v", action="store_true", help="log each build's start and end")
    w.set_defaults(func=_cmd_warmup)

    lp = sub.add_parser("list", help="entries: spec, arch, size, build time, age")
    lp.add_argument("--json", action="store_true")
    lp.set_defaults(func=_cmd_list)

    ip = sub.add_parser("info", help="meta.json of the entries matching a spec name or pattern")
    ip.add_argument("spec", metavar="SPEC")
    arch_opt(ip, "arch for the 'would be built at' hint")
    ip.set_defaults(func=_cmd_info)

    vp = sub.add_parser("verify", help="every entry loads and matches its recorded checksum")
    vp.set_defaults(func=_cmd_verify)

    cp = sub.add_parser("clear", help="remove entries")
    cp.add_argument("--older-than", type=float, metavar="DAYS",
                    help="only entries built more than DAYS days ago")
    cp.set_defaults(func=_cmd_clear)

    ep = sub.add_parser("export", help="tar of complete, intact entries")
    ep.add_argument("file", metavar="FILE.tar")
    ep.add_argument("patterns", nargs="*", metavar="PATTERN", help="spec-name globs to include")
    arch_opt(ep, "only entries for this arch")
    ep.set_defaults(func=_cmd_export)

    mp = sub.add_parser("import", help="import an exported tar (checked, published atomically)")
    mp.add_argument("file", metavar="FILE.tar")
    mp.set_defaults(func=_cmd_import)

    rp = sub.add_parser("render", help="write the CUDA source of specs (no build)")
    rp.add_argument("specs", nargs="+", metavar="SPEC")
    rp.add_argument("--out", required=True, metavar="DIR")
    arch_opt(rp, "arch whose nvcc flags to print")
    rp.set_defaults(func=_cmd_render)
    return ap


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    undo = _setup_logging(getattr(a, "verbose", False))
    try:
        return int(a.func(a) or 0)
    except _Fail as e:
        _err(str(e))
        return 1
    except BrokenPipeError:  # `cache_tool.py info X | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (SpecError, ValueError) as e:
        _err(f"{a.cmd}: error: {e}")
        return 2
    except (_build.XqaCacheError, _build.XqaBuildError, OSError) as e:
        _err(f"{a.cmd}: error: {e}")
        return 1
    except KeyboardInterrupt:
        _err(f"{a.cmd}: interrupted")
        return 130
    finally:
        undo()


if __name__ == "__main__":
    sys.exit(main())
