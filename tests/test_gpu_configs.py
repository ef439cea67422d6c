"""The production tile configs under the interpreter: the default GPU config of every table row of
the attention forward, both backward kernels and decode, run on small ragged shapes.

The rest of the suite runs the launchers' small interpreter configs; inside
fastlm.triton._configs.gpu_configs() the launchers pick exactly what they pick on a GPU without
autotuning, so the masks, loop bounds and block boundaries of the real tiles are checked here (the
compile tier checks that those configs compile, without spills). fp32 and fp16 (the interpreter's
bf16 is broken: testing.md), every output and every gradient by the tolerance rule.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HAS_GPU

import fastlm
from fastlm.reference import attention as ref
from fastlm.testing import GRAD_FACTOR_ATTENTION, assert_all_written, assert_close, poison_like
from fastlm.triton import attention as A
from fastlm.triton import decode_attention as DA
from fastlm.triton._configs import gpu_configs, small_configs

pytestmark = pytest.mark.skipif(HAS_GPU, reason="on a GPU the whole suite already runs the production configs")

# (head dim, BLOCK_D row): one head dim per table row, the 128 row through an uneven head dim
ROWS = [(64, 64), (96, 128), (256, 256)]


def test_gpu_configs_switches_the_launchers():
    assert small_configs()
    with gpu_configs():
        assert not small_configs()
        assert DA.config(128, 8, torch.float16)["BLOCK_N"] != 16
    assert small_configs()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("D,bd", ROWS, ids=[f"D{d}" for d, _ in ROWS])
@pytest.mark.parametrize("mask", ["full", "causal", "window"])
def test_attention_production_configs(D, bd, dtype, mask, monkeypatch):
    monkeypatch.setenv("FASTLM_AUTOTUNE", "0")
    fp32 = dtype == torch.float32
    cfg = {k: A.default_config(k, bd, fp32, D == bd) for k in ("fwd", "dkdv", "dq")}
    # ragged: more than one query block and one key block of the largest tile, not a multiple of either
    sq = cfg["fwd"]["BLOCK_M"] + cfg["dq"]["BLOCK_M"] // 2 + 3
    sk = max(cfg["dkdv"]["BLOCK_N"], cfg["fwd"]["BLOCK_N"]) + 29
    causal = mask == "causal"
    window = (40, 7) if mask == "window" else (-1, -1)
    B, Hq, Hkv = 1, 2, 1
    q = torch.randn(B, Hq, sq, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, Hkv, sk, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, Hkv, sk, D, device=DEVICE, dtype=dtype)
    do = torch.randn(B, Hq, sq, D, device=DEVICE, dtype=dtype)

    def run(impl, ts):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        out = impl(*ts)
        out.backward(do.to(out.dtype))
        return out, [t.grad for t in ts]

    kw = dict(causal=causal, window=window)
    with gpu_configs():
        out, grads = run(lambda *t: fastlm.ops.attention(*t, backend="triton", **kw), (q, k, v))
    t_out, t_grads = run(lambda *t: ref.attention(*t, causal=causal, window=window), [t.double() for t in (q, k, v)])
    b_out, b_grads = run(lambda *t: ref.attention(*t, causal=causal, window=window), (q, k, v))
    assert_close(out, t_out, b_out, name=f"out {cfg['fwd']}")
    for g, tg, bg, n in zip(grads, t_grads, b_grads, "qkv", strict=True):
        assert_close(g, tg, bg, name=f"d{n} {cfg['dkdv'] if n != 'q' else cfg['dq']}", factor=GRAD_FACTOR_ATTENTION)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("D", [64, 96, 256])
@pytest.mark.parametrize("group,sq,window", [(1, 1, -1), (4, 3, -1), (2, 16, 100)], ids=["mha", "gqa4-sq3", "gqa2-sq16-window"])
def test_decode_production_configs(D, dtype, group, sq, window):
    with gpu_configs():
        cfg = DA.config(D, group * sq, dtype)
    B, Hkv, S = 3, 2, 2 * cfg["BLOCK_N"] + 37
    Hq = Hkv * group
    q = torch.randn(B, Hq, sq, D, device=DEVICE, dtype=dtype)
    kc = torch.randn(B, Hkv, S, D, device=DEVICE, dtype=dtype)
    vc = torch.randn(B, Hkv, S, D, device=DEVICE, dtype=dtype)
    lens = torch.tensor([S, cfg["BLOCK_N"] + 5, sq], dtype=torch.int32, device=DEVICE)
    out, lse = poison_like(q), torch.full((B, Hq, sq), float("nan"), device=DEVICE)
    with gpu_configs():
        DA.decode_attention_fwd(q, kc, vc, lens, D**-0.5, window, -1, out, lse, num_splits=3)
    assert_all_written(out, "out")
    t_out, t_lse = ref.decode_attention(q.double(), kc.double(), vc.double(), lens, window=(window, -1), return_lse=True)
    b_out, b_lse = ref.decode_attention(q, kc, vc, lens, window=(window, -1), return_lse=True)
    assert_close(out, t_out, b_out, name=f"out {cfg}")
    assert_close(lse, t_lse.float(), b_lse.float(), name="lse", dtype=torch.float32)
