"""CPU tests of cache_tool.py (xqa_jit.cli) and of xqa_jit.models (HF config -> specs).

The model tests use inline excerpts of real config.json files. The CLI tests share one warmed cache
(a real parallel warmup of one cheap spec for two arches) and work on copies of it.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

import xqa_jit.build as B
from xqa_jit import DecodeSpec, MlaSpec, SpecError
from xqa_jit import cli
from xqa_jit.models import rope_llama_ok, specs_for_model

SPEC = DecodeSpec(head_dim=64, group=1)
ARCHES = ("9.0a", "8.0")

# ----------------------------------------------------------------------------------- configs

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "rope_scaling": None,
    "rope_theta": 500000.0, "torch_dtype": "bfloat16", "vocab_size": 128256,
}
LLAMA31_8B = dict(LLAMA3_8B, rope_scaling={
    "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192, "rope_type": "llama3"})
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "bfloat16",
}
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "head_dim": 64,
    "hidden_size": 2880, "num_attention_heads": 64, "num_key_value_heads": 8,
    "num_hidden_layers": 24, "layer_types": ["sliding_attention", "full_attention"] * 12,
    "sliding_window": 128, "rope_theta": 150000,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                     "original_max_position_embeddings": 4096, "rope_type": "yarn",
                     "truncate": False},
    "quantization_config": {"quant_method": "mxfp4"}, "torch_dtype": "bfloat16",
}
GEMMA2_9B = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "head_dim": 256,
    "hidden_size": 3584, "num_attention_heads": 16, "num_key_value_heads": 8,
    "num_hidden_layers": 42, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
    "query_pre_attn_scalar": 256, "rope_theta": 10000.0, "sliding_window": 4096,
    "cache_implementation": "hybrid", "torch_dtype": "float32",
}
GEMMA3_27B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
    "torch_dtype": "bfloat16",
    "text_config": {"model_type": "gemma3_text", "head_dim": 128, "hidden_size": 5376,
                    "num_attention_heads": 32, "num_key_value_heads": 16,
                    "num_hidden_layers": 62, "query_pre_attn_scalar": 168,
                    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152},
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "hidden_size": 7168, "num_attention_heads": 128, "num_key_value_heads": 128,
    "num_hidden_layers": 61, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "torch_dtype": "bfloat16",
}
QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
    "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28,
    "max_window_layers": 28, "sliding_window": 131072, "use_sliding_window": False,
    "rope_theta": 1000000.0, "torch_dtype": "bfloat16",
}


def D(**kw) -> DecodeSpec:
    return DecodeSpec(**kw)


# ----------------------------------------------------------------------------------- models


def test_llama3_8b():
    assert specs_for_model(LLAMA3_8B) == [D(head_dim=128, group=4),
                                          D(head_dim=128, group=4, rope=True)]


def test_llama3_8b_fp8_and_spec_len():
    specs = specs_for_model(LLAMA3_8B, kv_dtypes=("auto", "fp8"), spec_len=4)
    assert len(specs) == 8 and len(set(specs)) == 8
    assert {(s.kv_dtype, s.q_len, s.rope) for s in specs} == {
        (kv, lq, r) for kv in ("bf16", "e4m3") for lq in (1, 4) for r in (False, True)}
    assert not any(s.tree for s in specs)  # spec-len variants are causal
    with pytest.raises(SpecError, match="1..16"):
        specs_for_model(LLAMA3_8B, spec_len=17)


def test_llama31_rope_type_is_never_inferred():
    assert not rope_llama_ok(LLAMA31_8B)
    assert specs_for_model(LLAMA31_8B) == [D(head_dim=128, group=4)]
    for t in ("yarn", "dynamic", "longrope", "llama3"):
        assert not rope_llama_ok(dict(LLAMA3_8B, rope_scaling={"rope_type": t, "factor": 2.0}))
    assert rope_llama_ok(dict(LLAMA3_8B, rope_scaling={"type": "linear", "factor": 2.0}))
    assert not rope_llama_ok(dict(LLAMA3_8B, partial_rotary_factor=0.5))


def test_mistral_7b_every_layer_slides():
    assert specs_for_model(MISTRAL_7B) == [D(head_dim=128, group=4, window=True),
                                           D(head_dim=128, group=4, window=True, rope=True)]
    v02 = dict(MISTRAL_7B, sliding_window=None)
    assert specs_for_model(v02) == [D(head_dim=128, group=4), D(head_dim=128, group=4, rope=True)]


def test_gpt_oss_20b():
    # yarn rope: no ROPE_LLAMA; mxfp4 weights do not make the KV cache FP8
    assert specs_for_model(GPT_OSS_20B) == [
        D(head_dim=64, group=8, sinks="per_head"),
        D(head_dim=64, group=8, sinks="per_head", window=True)]


def test_gemma2_9b(caplog):
    with caplog.at_level("WARNING", logger="xqa_jit"):
        specs = specs_for_model(GEMMA2_9B)
    assert "soft-capping" in caplog.text
    assert specs == [D(head_dim=256, group=2, window=w, rope=r)
                     for w in (False, True) for r in (False, True)]  # float32 -> bf16 q


def test_gemma3_text_config_and_linear_rope():
    assert specs_for_model(GEMMA3_27B) == [D(head_dim=128, group=2, window=w, rope=r)
                                           for w in (False, True) for r in (False, True)]


def test_deepseek_v3_mla():
    # fp8 weights, bf16 cache; on sm_90a the TMA kernel (v3) for pages of 8+ tokens and the wgmma
    # kernel (v2) for smaller pages, for a 16-bit and an FP8 cache alike
    assert specs_for_model(DEEPSEEK_V3) == [MlaSpec(num_heads=128, impl="v3"),
                                            MlaSpec(num_heads=128, impl="v2")]
    assert specs_for_model(DEEPSEEK_V3, kv_dtypes=("auto", "fp8"), spec_len=4) == [
        MlaSpec(num_heads=128, impl="v3"), MlaSpec(num_heads=128, impl="v2"),
        MlaSpec(num_heads=128, kv_dtype="e4m3", impl="v3"), MlaSpec(num_heads=128, kv_dtype="e4m3", impl="v2")]
    assert specs_for_model(DEEPSEEK_V3, tp=8) == [MlaSpec(num_heads=16, impl="v3"),
                                                  MlaSpec(num_heads=16)]  # v1 for pages under 8
    assert specs_for_model(DEEPSEEK_V3, tp=8, kv_dtypes=("fp8",)) == [
        MlaSpec(num_heads=16, kv_dtype="e4m3", impl="v3"), MlaSpec(num_heads=16, kv_dtype="e4m3")]
    assert specs_for_model(DEEPSEEK_V3, arch="8.0") == [MlaSpec(num_heads=128)]  # no wgmma


def test_qwen2_7b():
    assert specs_for_model(QWEN2_7B) == [D(head_dim=128, group=7),
                                         D(head_dim=128, group=7, rope=True)]
    swa = dict(QWEN2_7B, use_sliding_window=True, max_window_layers=14)
    assert {s.window for s in specs_for_model(swa)} == {False, True}


def test_dtypes_tp_and_unsupported():
    fp16 = specs_for_model(dict(LLAMA3_8B, torch_dtype="float16"))
    assert {s.q_dtype for s in fp16} == {"fp16"} and {s.kv_dtype for s in fp16} == {"fp16"}
    assert specs_for_model(dict(LLAMA3_8B, dtype="float16", torch_dtype=None))[0].q_dtype == "fp16"
    declared = dict(LLAMA3_8B, quantization_config={
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"}})
    assert {s.kv_dtype for s in specs_for_model(declared)} == {"bf16", "e4m3"}
    llama70 = dict(LLAMA3_8B, hidden_size=8192, num_attention_heads=64)
    assert {s.group for s in specs_for_model(llama70, tp=8)} == {8}
    assert {s.group for s in specs_for_model(llama70, tp=16)} == {4}  # KV heads replicated
    with pytest.raises(SpecError, match="head_dim"):
        specs_for_model({"hidden_size": 2560, "num_attention_heads": 32,
                         "model_type": "phi"})  # head_dim 80
    with pytest.raises(SpecError, match="kv_lora_rank"):
        specs_for_model(dict(DEEPSEEK_V3, kv_lora_rank=256))


def test_cli_collects_specs_from_model_config_and_names(tmp_path):
    model = tmp_path / "config.json"
    model.write_text(json.dumps(LLAMA3_8B))
    specs_file = tmp_path / "specs.json"
    specs_file.write_text(json.dumps([{"head_dim": 64, "group": 1},
                                      {"kind": "mla", "num_heads": 16},
                                      "decode_qfp16_kvfp16_d256_g8_win"]))
    a = cli._parser().parse_args(["warmup", "--model", str(tmp_path), "--config", str(specs_file),
                                  "--kv-dtype", "fp8", "--spec-len", "2", "--dtype", "auto"])
    specs = cli._collect_specs(a)
    assert len(specs) == len(set(specs))
    assert D(head_dim=64, group=1, kv_dtype="e4m3", q_len=2) in specs
    assert MlaSpec(num_heads=16, kv_dtype="e4m3") in specs
    assert D(q_dtype="fp16", kv_dtype="fp16", head_dim=256, group=8, window=True, q_len=2) in specs
    assert D(head_dim=128, group=4, kv_dtype="e4m3", q_len=2, rope=True) in specs
    assert sum(isinstance(s, DecodeSpec) and s.head_dim == 128 for s in specs) == 8
    # by default --model covers both 16-bit q dtypes (a bf16 checkpoint served in fp16 too)
    both = cli._collect_specs(cli._parser().parse_args(["warmup", "--model", str(tmp_path)]))
    assert D(q_dtype="fp16", kv_dtype="fp16", head_dim=128, group=4) in both
    assert D(q_dtype="bf16", kv_dtype="bf16", head_dim=128, group=4) in both
    assert len(both) == 4  # {bf16, fp16} x {plain, rope}


def _run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_cli_rejects_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv("XQA_JIT_CACHE_DIR", str(tmp_path / "cache"))
    rc, _, err = _run("warmup", "decode_qbf16_kvbf16_d64_g1", "--spec-len", "17", "--arch", "9.0a")
    assert rc == 2 and "1..16" in err
    rc, _, err = _run("warmup", "decode_qbf16_kvbf16_d80_g1", "--arch", "9.0a")
    assert rc == 2 and "head_dim" in err
    rc, _, err = _run("warmup", "--arch", "9.0a")
    assert rc == 2 and "nothing to build" in err
    assert not (tmp_path / "cache").exists()


def test_render_writes_source_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("XQA_JIT_CACHE_DIR", str(tmp_path / "cache"))
    rc, out, _ = _run("render", SPEC.name, '{"head_dim": 128, "group": 8, "rope": true}',
                      "--out", str(tmp_path / "src"))
    assert rc == 0
    names = sorted(f.name for f in (tmp_path / "src").iterdir())
    assert names == sorted([f"{SPEC.name}.cu", "decode_qbf16_kvbf16_d128_g8_rope.cu"])
    assert out.split() == [str(tmp_path / "src" / f"{SPEC.name}.cu"),
                           str(tmp_path / "src" / "decode_qbf16_kvbf16_d128_g8_rope.cu")]
    assert "xqa_launch" in (tmp_path / "src" / f"{SPEC.name}.cu").read_text()
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- CLI, real builds


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    """A parallel warmup (spawned workers) of SPEC for two arches; then a second, cached one."""
    root = tmp_path_factory.mktemp("warm") / "cache"
    cfg = root.parent / "specs.json"
    cfg.write_text(json.dumps([SPEC.to_dict()]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XQA_JIT_CACHE_DIR", str(root))
        mp.setattr(B, "_MEMO", {})
        t0 = time.perf_counter()
        first = _run("warmup", "--config", str(cfg), "--jobs", "2", "--arch", ",".join(ARCHES))
        wall = time.perf_counter() - t0
        second = _run("warmup", "--config", str(cfg), "--jobs", "2", "--arch", ",".join(ARCHES))
    return root, first, second, wall


@pytest.fixture
def cache(warmed, tmp_path, monkeypatch) -> Path:
    """A private copy of the warmed cache (entries only)."""
    root = tmp_path / "cache"
    root.mkdir()
    for d in cli._entry_dirs(warmed[0]):
        shutil.copytree(d, root / d.name)
    monkeypatch.setenv("XQA_JIT_CACHE_DIR", str(root))
    monkeypatch.setattr(B, "_MEMO", {})
    monkeypatch.setattr(B, "_CHECKED_ROOTS", set())
    return root


@pytest.mark.build
def test_warmup_parallel_then_cached(warmed):
    root, (rc, out, err), (rc2, out2, err2), wall = warmed
    assert rc == 0, err
    assert "2 built, 0 cached, 0 failed" in out and "2 job(s)" in out and "s wall" in out
    for i in (1, 2):
        assert f"[{i}/2] built" in err
    assert SPEC.name in err and "sm_8.0" in err and "sm_9.0a" in err
    assert rc2 == 0 and "0 built, 2 cached" in out2
    metas = [json.loads((d / "meta.json").read_text()) for d in cli._entry_dirs(root)]
    assert sorted(m["arch"] for m in metas) == sorted(ARCHES)
    assert all(m["name"] == SPEC.name for m in metas)


@pytest.mark.build
def test_list_info_verify(cache):
    rc, out, _ = _run("list")
    assert rc == 0 and out.count(SPEC.name) == 2 and "9.0a" in out and "8.0" in out
    assert "KiB" in out and "BUILD" in out and "AGE" in out
    rc, out, _ = _run("list", "--json")
    rows = json.loads(out)
    assert {r["arch"] for r in rows} == set(ARCHES) and all(r["size"] > 0 for r in rows)
    rc, out, _ = _run("info", SPEC.name)
    assert rc == 0
    docs = [json.loads(x) for x in out.replace("}\n{", "}\x00{").split("\x00")]
    assert len(docs) == 2 and all(d["intact"] and d["current"] for d in docs)
    assert {d["meta"]["arch"] for d in docs} == set(ARCHES)
    rc, out, _ = _run("info", "d64_g1")  # a pattern matches too
    assert rc == 0 and out.count('"path"') == 2
    rc, _, err = _run("info", "decode_qbf16_kvbf16_d256_g2")
    assert rc == 1 and "no entry" in err
    rc, out, _ = _run("verify")
    assert rc == 0 and "2 ok" in out and "0 failed" in out


@pytest.mark.build
def test_verify_fails_on_damaged_entries(cache):
    a, b = cli._entry_dirs(cache)
    lib = a / B.LIB_NAME
    os.truncate(lib, lib.stat().st_size // 2)
    (b / "meta.json").write_text("{")
    (cache / "stray").mkdir()  # an entry directory without meta.json
    rc, out, _ = _run("verify")
    assert rc == 1
    assert f"FAIL  {a.name}: library checksum" in out
    assert f"FAIL  {b.name}: unreadable meta.json" in out
    assert "FAIL  stray: no meta.json" in out and "3 failed" in out


@pytest.mark.build
def test_export_import_round_trip(cache, tmp_path, monkeypatch):
    (cache / "broken").mkdir()  # never exported
    tar_path = tmp_path / "warm.tar"
    rc, out, err = _run("export", str(tar_path))
    assert rc == 0 and "2 entries" in out and "broken" in err
    with tarfile.open(tar_path) as tf:
        names = sorted(tf.getnames())
    assert len(names) == 6 and all(n.count("/") == 1 for n in names)
    assert not any("broken" in n or n.startswith(".") for n in names)

    other = tmp_path / "fleet"
    monkeypatch.setenv("XQA_JIT_CACHE_DIR", str(other))
    rc, out, _ = _run("import", str(tar_path))
    assert rc == 0 and "2 imported" in out and "0 stale" in out
    rc, out, _ = _run("import", str(tar_path))
    assert rc == 0 and "2 already present" in out
    assert list((other / ".tmp").iterdir()) == []
    rc, out, _ = _run("verify")
    assert rc == 0 and "2 ok" in out
    monkeypatch.setenv("XQA_JIT_NO_BUILD", "1")  # imported entries are used as they are
    assert B.get_module(SPEC, "9.0a").info["threads"] > 0


def _tar(path: Path, members) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data, kind in members:
            ti = tarfile.TarInfo(name)
            if kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, data
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return path


@pytest.mark.build
def test_import_refuses_traversal_links_and_bad_checksums(cache, tmp_path, monkeypatch):
    entry = cli._entry_dirs(cache)[0]
    files = {f: (entry / f).read_bytes() for f in cli.ENTRY_FILES}
    good = [(f"{entry.name}/{f}", data, "file") for f, data in files.items()]
    target = tmp_path / "fleet"
    monkeypatch.setenv("XQA_JIT_CACHE_DIR", str(target))
    for bad in ([("../evil.so", b"x", "file")], [("/tmp/evil.so", b"x", "file")],
                [(f"{entry.name}/../../evil.so", b"x", "file")],
                [(f"{entry.name}/kernel.so", "/etc/passwd", "sym")]):
        tar = _tar(tmp_path / "bad.tar", good[:2] + bad)
        rc, _, err = _run("import", str(tar))
        assert rc == 1 and "refusing archive" in err
        assert not target.exists() or cli._entry_dirs(target) == []
    assert not (tmp_path / "evil.so").exists()

    altered = dict(files)
    altered["kernel.so"] = files["kernel.so"][:-1] + bytes([files["kernel.so"][-1] ^ 1])
    tar = _tar(tmp_path / "altered.tar",
               [(f"{entry.name}/{f}", d, "file") for f, d in altered.items()])
    rc, out, err = _run("import", str(tar))
    assert rc == 1 and "checksum" in err and "1 rejected" in out
    renamed = _tar(tmp_path / "renamed.tar", [(f"decode_x-sm90a-0000/{f}", d, "file")
                                              for f, d in files.items()])
    rc, _, err = _run("import", str(renamed))
    assert rc == 1 and "does not match" in err
    assert cli._entry_dirs(target) == [] and list((target / ".tmp").iterdir()) == []


@pytest.mark.build
def test_clear(cache):
    import filelock

    rc, out, _ = _run("clear", "--older-than", "1")
    assert rc == 0 and "removed 0 entries" in out and len(cli._entry_dirs(cache)) == 2
    first = cli._entry_dirs(cache)[0]
    meta = json.loads((first / "meta.json").read_text())
    meta["created"] -= 3 * 86400  # built three days ago
    (first / "meta.json").write_text(json.dumps(meta))
    rc, out, _ = _run("clear", "--older-than", "2")
    assert rc == 0 and "removed 1 entry" in out
    assert [d.name for d in cli._entry_dirs(cache)] != [first.name]
    assert len(cli._entry_dirs(cache)) == 1
    # a dead builder's directory goes; a live builder's (its lock held) stays
    (cache / ".tmp").mkdir()
    dead = cache / ".tmp" / "decode_a-sm90a-0123456789abcdef.999999.deadbeef"
    live = cache / ".tmp" / "decode_b-sm90a-0123456789abcdef.1.cafef00d"
    dead.mkdir()
    live.mkdir()
    (cache / ".locks").mkdir(exist_ok=True)
    lock = filelock.FileLock(str(cache / ".locks" / "decode_b-sm90a-0123456789abcdef.lock"))
    with lock:
        rc, out, _ = _run("clear")
    assert rc == 0 and "removed 1 entry" in out and "1 dead build directory" in out
    assert not dead.exists() and live.exists()
    assert cli._entry_dirs(cache) == []


@pytest.mark.build
def test_warmup_reports_a_failed_build(tmp_path, monkeypatch):
    monkeypatch.setenv("XQA_JIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(B, "render", lambda spec: "#error cache_tool_test_broken\n")
    rc, out, err = _run("warmup", SPEC.name, "--arch", "9.0a", "--jobs", "1")
    assert rc == 1 and "1 failed" in out and ".failed" in out
    assert "[1/1] FAILED" in err and "rendered source:" in err
    assert "cache_tool_test_broken" in err  # nvcc's own error line
    assert (tmp_path / "cache" / ".failed").is_dir()


def test_warmup_refuses_world_writable_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    root.mkdir()
    os.chmod(root, 0o777)
    monkeypatch.setenv("XQA_JIT_CACHE_DIR", str(root))
    monkeypatch.setattr(B, "_CHECKED_ROOTS", set())
    rc, _, err = _run("warmup", SPEC.name, "--arch", "9.0a")
    assert rc == 1 and "writable by other users" in err
