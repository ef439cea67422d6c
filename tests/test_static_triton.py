"""The compile tier for Triton: every default config a launcher picks, compiled by the real Triton
compiler for sm_90a and sm_80 (no GPU needed), with its resources and SASS gated.

Each (op, arch) is compiled once per session in a subprocess without TRITON_INTERPRET and with a
fresh Triton cache (a cached artifact could hide an error), shared by the xdist workers through a
file lock; the tests below read its rows. `make static-check` runs the exhaustive variant (every
autotune candidate, the full product of sizes, dtypes and flags).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import HAS_GPU
from filelock import FileLock

from fastlm.audit import sass, triton_kernels

pytestmark = [
    pytest.mark.skipif(sass.have_tools() is not None, reason=f"compile tier unavailable: {sass.have_tools()}"),
    pytest.mark.skipif(HAS_GPU, reason="the compile tier runs in CPU CI; on a GPU the kernels themselves run"),
]

OPS = list(triton_kernels.OPS)
ARCHS = [90, 80]


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    # xdist workers share their session's directory (basetemp's parent); without xdist the parent
    # outlives the session and would hand a later run stale rows, so each session keeps its own.
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "static-triton"
    root.mkdir(exist_ok=True)

    def get(op: str, cc: int) -> list[sass.Row]:
        path = root / f"{op}-{cc}.json"
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
                env["TRITON_CACHE_DIR"] = str(root / f"cache-{op}-{cc}")
                res = subprocess.run(
                    [sys.executable, "-m", "fastlm.audit", op, f"--arch={cc}", "--source=triton", "--jobs=1", "--quiet",
                     f"--json={path}.tmp"],
                    env=env, capture_output=True, text=True, timeout=1200,
                )
                assert res.returncode == 0, f"fastlm audit {op} --arch {cc} failed:\n{res.stderr[-4000:]}"
                os.replace(f"{path}.tmp", path)
        return [sass.Row(**d) for d in json.loads(path.read_text())]

    return get


@pytest.mark.parametrize("cc", ARCHS, ids=lambda c: sass.ARCHS[c])
@pytest.mark.parametrize("op", OPS)
def test_every_default_config_passes_the_gates(compiled, op, cc):
    """Compiles; no spill or stack frame; shared memory within the target; tensor-core instructions
    in matrix kernels; a 128-bit global load in memory-bound kernels (aligned inputs)."""
    rows = compiled(op, cc)
    assert rows, f"no {op} plans"
    bad = [f"{r.kernel} [{r.config}]: {'; '.join(v)}" for r in rows if (v := sass.violations(r))]
    assert not bad, f"{len(bad)} of {len(rows)} {op} rows on {sass.ARCHS[cc]} break a gate:\n" + "\n".join(bad)


def test_every_triton_kernel_is_planned():
    """No @triton.jit kernel of fastlm.triton escapes the compile tier."""
    import importlib
    import pkgutil

    import fastlm.triton as pkg

    kernels = set()
    for m in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"fastlm.triton.{m.name}")
        for name, obj in vars(mod).items():
            if type(obj).__name__ == "JITFunction" and name.endswith("_kernel") and obj.__module__ == mod.__name__:
                kernels.add(f"{mod.__name__}.{name}")
    planned = {f"{p.kernel.__module__}.{p.kernel.__name__}" for p in triton_kernels.plans()}
    assert kernels - planned == set(), f"kernels with no compile plan: {sorted(kernels - planned)}"


def test_covering_design_covers_every_pair():
    axes = [(1, 2, 3, 4, 5), ("a", "b", "c"), ("x", "y", "z")]
    chosen = triton_kernels._cover(*axes)
    for i in range(3):
        for j in range(i + 1, 3):
            assert {(c[i], c[j]) for c in chosen} == {(a, b) for a in axes[i] for b in axes[j]}
    assert len(chosen) < 5 * 3 * 3


# ---- regressions of defects only a compiler shows ---------------------------------------------------


@pytest.mark.parametrize("cc", ARCHS, ids=lambda c: sass.ARCHS[c])
def test_sampling_compiles_int32_max_regression(compiled, cc):
    """INT32_MAX was a plain global read inside @triton.jit: a NameError for every GPU target (the
    interpreter accepted it), so sample(), generate and make demo failed on any GPU."""
    rows = compiled("sampling", cc)
    assert rows and all(r.error is None for r in rows), [r.error for r in rows if r.error]


@pytest.mark.parametrize("cc", ARCHS, ids=lambda c: sass.ARCHS[c])
def test_sampling_ieee_division_regression(compiled, cc):
    """x / T compiled to div.full.f32 (approximate), so Triton and CUDA/reference tokens could differ."""
    rows = compiled("sampling", cc)
    assert all("div." not in (r.error or "") for r in rows), [r.error for r in rows if r.error]


@pytest.mark.parametrize("cc", ARCHS, ids=lambda c: sass.ARCHS[c])
def test_attention_head_dim_specialised_regression(compiled, cc):
    """HEAD_DIM in do_not_specialize kept the kernels from proving alignment: Q/O and masked K/V went
    through 2-byte loads and head dims that are not powers of two lost cp.async."""
    rows = [r for r in compiled("attention", cc) if r.kernel not in ("_bwd_preprocess_kernel", "_attn_fwd_tma_kernel")]
    for r in rows:
        assert r.sass["LDG.16"] == 0, f"{r.kernel} [{r.config}]: 2-byte global loads {r.sass['LDG.16']}"
        if not r.config.endswith(" s1"):  # a single-stage config has no pipeline to feed
            assert r.sass["LDGSTS"] > 0, f"{r.kernel} [{r.config}]: no cp.async"
    assert any(r.config.startswith("D=80") for r in rows) and any(r.config.startswith("D=96") for r in rows)


def test_attention_fwd_tma_loads_through_tma(compiled):
    """On sm_90a the TMA forward loads Q, K, V by UTMALDG (no pointer loads of them: no LDGSTS, no
    128-bit LDG) in every head-dim row and dtype it serves, without spills. sm_80 has no TMA plan:
    the launcher keeps the pointer kernel there (uses_tma)."""
    rows = [r for r in compiled("attention", 90) if r.kernel == "_attn_fwd_tma_kernel"]
    assert {r.config.split()[0] for r in rows} >= {"D=64", "D=128", "D=256"}
    assert {r.config.split()[1] for r in rows} == {"fp16", "bf16", "fp32"}
    for r in rows:
        assert r.error is None, f"[{r.config}]: {r.error}"
        assert r.sass["UTMALDG"] > 0, f"[{r.config}]: no TMA load"
        assert r.sass["LDGSTS"] == 0 and r.sass["LDG.128"] == 0, f"[{r.config}]: pointer loads beside TMA"
        assert not sass.spills(r), f"[{r.config}]: spills ({r.local} B local, {r.stack} B stack)"
    assert not [r for r in compiled("attention", 80) if r.kernel == "_attn_fwd_tma_kernel"]


@pytest.mark.parametrize("cc", ARCHS, ids=lambda c: sass.ARCHS[c])
def test_decode_cp_async_regression(compiled, cc):
    """The decode split kernel got no cp.async (and 247 registers) while HEAD_DIM was unspecialised,
    and BLOCK_D 256 ran single-stage (one K/V tile in flight). Every config now streams K/V through
    a cp.async ring; the only global loads beside it are Q's 128-bit rows and the scalar length
    (paged: and the scalar page ids, one per key tile; ALiBi: and the rows' scalar slopes)."""
    rows = [r for r in compiled("decode_attention", cc) if r.kernel == "_decode_split_kernel"]
    assert any(r.config.startswith("D=256") for r in rows) and any(" paged " in r.config for r in rows)
    for r in rows:
        assert r.sass["LDGSTS"] > 0, f"[{r.config}]: no cp.async"
        assert r.sass["LDG.128"] > 0, f"[{r.config}]: no 128-bit load of Q"
        narrow = {k: r.sass[k] for k in ("LDG.64", "LDG.32", "LDG.16", "LDG.8") if r.sass[k]}
        if " paged " in r.config or "alibi" in r.config:
            assert set(narrow) == {"LDG.32"}, f"[{r.config}]: narrow global loads beside the length, page ids, slopes: {narrow}"
        else:
            assert narrow == {"LDG.32": 1}, f"[{r.config}]: narrow global loads beside the length: {narrow}"


@pytest.mark.parametrize("cc", ARCHS, ids=lambda c: sass.ARCHS[c])
def test_fp32_attention_on_tensor_cores_regression(compiled, cc):
    """fp32 attention compiled to FMA dots with 32 registers and 33-44 KB of spill per thread; up to
    BLOCK_D 128 it now runs 3xTF32 on tensor cores (fp32-level accuracy), and above it IEEE FMA dots
    on tiles that do not spill (an exemption of the tensor-core gate only, with its reason); so does
    the dK/dV kernel with dropout at D = 128, where every 3xTF32 tile spills."""
    rows = [r for r in compiled("attention", cc) + compiled("decode_attention", cc) if " fp32" in r.config and r.kind == "matrix"]
    assert rows
    for r in rows:
        assert not sass.spills(r), f"{r.kernel} [{r.config}]: spills ({r.stack} B stack)"
        dkdv_dropout = (r.kernel == "_attn_bwd_dkdv_kernel" and r.config.startswith("D=128 fp32")
                        and any(f" {o} " in r.config for o in ("dropout", "all")))
        if r.config.startswith("D=256") or dkdv_dropout:
            assert sass.exempt(r, "tensor-cores") and not sass.violations(r), r.config
            continue
        assert r.sass["HGMMA"] + r.sass["HMMA"] > 0, f"{r.kernel} [{r.config}]: no tensor-core instruction"


def test_info_states_fp32_attention_cost():
    from fastlm import info

    assert any("3xTF32" in n and "slower" in n for n in info.collect()["notes"])


def test_audit_cli_reexecs_with_the_same_options():
    """`fastlm audit` under TRITON_INTERPRET=1 re-runs itself without it, with the same options."""
    from fastlm import audit
    from fastlm.cli import build_parser

    argv = ["audit", "attention", "rotary", "--arch", "80", "--source", "triton", "--all-configs", "--jobs", "3",
            "--json", "x.json", "--check", "--quiet"]
    args = build_parser().parse_args(argv)
    again = audit._parser().parse_args(audit._argv(args))
    for k in ("op", "arch", "source", "all_configs", "jobs", "json", "write_reports", "check", "quiet"):
        assert getattr(again, k) == getattr(args, k), k


@pytest.mark.parametrize("cc", ARCHS, ids=lambda c: sass.ARCHS[c])
def test_long_row_norms_gated_regression(compiled, cc):
    """Rows over 16384 read x three times (LayerNorm) and the backward did a read-modify-write of
    its partials. N = 32768 and 65536 now compile in every long-row kernel with 128-bit loads and no
    spill, and the long-row dx kernel streams the next row's x and dy through cp.async (LDGSTS)."""
    rows = [r for r in compiled("layer_norm", cc) if r.config.startswith(("N=32768 ", "N=65536 "))]
    kernels = {"_layer_norm_fwd_kernel", "_layer_norm_bwd_dots_kernel", "_layer_norm_bwd_dx_kernel"}
    for n in ("N=32768 ", "N=65536 "):
        assert {r.kernel for r in rows if r.config.startswith(n)} == kernels, n
    for r in rows:
        assert r.error is None and not sass.spills(r), f"{r.kernel} [{r.config}]: {r.error or 'spills'}"
        assert r.sass["LDG.128"] + r.sass["LDGSTS.128"] > 0, f"{r.kernel} [{r.config}]: no 128-bit load"
        if r.kernel == "_layer_norm_bwd_dx_kernel":
            assert r.sass["LDGSTS"] > 0, f"[{r.config}]: the next row is not prefetched"
