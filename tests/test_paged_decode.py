"""Paged KV cache: decode_attention(block_table=...) and paged_kv_append against the contiguous cache.

Pages are shuffled over a pool larger than the batch needs; unused pages, the rows past each
length and the unused block-table entries hold NaN / garbage ids, so a wrong gather, a read past
L_b or a read of an unused entry shows. The truth is the reference in float64 on the contiguous
cache, the baseline the reference in the inputs' dtype (the tolerance rule); the CUDA paged kernel
runs the same tiles as the contiguous one, so there its result is also bit-identical to it.
paged_kv_append moves bytes: it is checked exactly (every cache element, NaN where nothing may be
written).
"""

import pytest
import torch
from conftest import DEVICE, kernel_backends

import fastlm
from fastlm.reference import attention as ref
from fastlm.testing import assert_close

BACKENDS = kernel_backends()
GARBAGE_PAGE = 10**6  # in unused block-table entries: never read


def _dtypes(backend):
    """fp32 and fp16; bf16 where the CUDA kernel runs it (the host tier; the Triton interpreter's
    bf16 is wrong, its bf16 path runs on fp32 copies and is covered by tests/test_decode_attention.py)."""
    return ("float32", "float16", "bfloat16") if backend == "cuda" else ("float32", "float16")


def _lens(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _paginate(cont, lens, page_size, spare, g):
    """cont (B, H, max_pages * page_size, D) -> (paged cache, block table): the pages of all
    sequences shuffled over B * max_pages + spare pages; the spare pages, the rows at or past L_b and
    the table entries past ceil(L_b / page_size) are poisoned."""
    B, _, S, _ = cont.shape
    max_pages = S // page_size
    num_pages = B * max_pages + spare
    table = torch.randperm(num_pages, generator=g)[: B * max_pages].view(B, max_pages).to(torch.int32)
    cache = _repaginate(cont, lens, table, num_pages)
    for b in range(B):
        table[b, -(-int(lens[b]) // page_size):] = GARBAGE_PAGE
    return cache, table.to(DEVICE)


def _contiguous_ref(q, kc, vc, lens, window):
    truth = ref.decode_attention(q.double(), kc.double(), vc.double(), lens, window=window)
    base = ref.decode_attention(q, kc, vc, lens, window=window)
    return truth, base


@pytest.mark.parametrize(("backend", "dtype"), [(b, d) for b in BACKENDS for d in _dtypes(b)])
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("shape", ["gqa", "mqa-window"])
def test_paged_decode_equals_contiguous(backend, page_size, dtype, shape):
    """Lengths 0, 1, a full page and a page + 1 (and a full table), GQA 2:1 with 2 new tokens,
    MQA with a left window and 3 new tokens; head dim 64 (the CUDA kernel's)."""
    g = torch.Generator().manual_seed(page_size * 7 + len(shape) + len(dtype))
    dt = getattr(torch, dtype)
    hq, hkv, sq, window = (4, 2, 2, None) if shape == "gqa" else (4, 1, 3, (page_size // 2, -1))
    B, D, max_pages = 5, 64, 3
    lens = _lens(0, 1, page_size, page_size + 1, max_pages * page_size)
    q = torch.randn(B, hq, sq, D, generator=g).to(DEVICE, dt)
    kc = torch.randn(B, hkv, max_pages * page_size, D, generator=g).to(DEVICE, dt)
    vc = torch.randn(B, hkv, max_pages * page_size, D, generator=g).to(DEVICE, dt)
    kp, table = _paginate(kc, lens, page_size, spare=4, g=g)
    vp = _repaginate(vc, lens, table, kp.shape[0])
    got = fastlm.ops.decode_attention(q, kp, vp, lens, block_table=table, window=window, backend=backend)
    truth, base = _contiguous_ref(q, kc, vc, lens, window)
    assert_close(got, truth, base, name="paged decode out")
    if backend == "cuda" and dtype != "float32":
        flat = fastlm.ops.decode_attention(q, kc, vc, lens, window=window, backend=backend)
        assert torch.equal(got, flat), "the CUDA paged kernel must give the contiguous kernel's bits"


def _repaginate(cont, lens, table, num_pages):
    """cont laid out in the pages of an existing table (same poisoning as _paginate)."""
    B, H, S, D = cont.shape
    ps = S // table.shape[1]
    cache = torch.full((num_pages, H, ps, D), float("nan"), dtype=cont.dtype)
    rows = torch.arange(S)
    for b in range(B):
        live = torch.where((rows < int(lens[b]))[None, :, None], cont[b].cpu(), float("nan"))
        for j in range(-(-int(lens[b]) // ps)):
            cache[int(table[b, j])] = live[:, j * ps : (j + 1) * ps]
    return cache.to(DEVICE)


def test_paged_reference_matches_per_sequence_loop():
    """The reference's gather against attention() of each sequence over its own pages."""
    g = torch.Generator().manual_seed(3)
    lens = _lens(17, 0, 32)
    kc, vc = torch.randn(3, 2, 48, 16, generator=g).double(), torch.randn(3, 2, 48, 16, generator=g).double()
    q = torch.randn(3, 4, 2, 16, generator=g).double()
    kp, table = _paginate(kc, lens, 16, spare=2, g=g)
    vp = _repaginate(vc, lens, table, kp.shape[0])
    got = ref.decode_attention(q, kp, vp, lens, block_table=table)
    for b, n in enumerate(lens.tolist()):
        want = ref.attention(q[b : b + 1], kc[b : b + 1, :, :n], vc[b : b + 1, :, :n], causal=True)
        torch.testing.assert_close(got[b : b + 1], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
@pytest.mark.parametrize("s_new", [1, 20])
def test_append_then_decode_equals_contiguous(backend, s_new):
    """paged_kv_append writes exactly the rows appending to a contiguous cache writes (every other
    element, NaN ones included, untouched), across page boundaries (lengths 0, 15, 16, 30 with 1 or
    20 new rows, page 16); then decode over L_b + S_new keys equals the contiguous cache's."""
    g = torch.Generator().manual_seed(s_new)
    dt = torch.float16
    B, hkv, hq, D, ps, max_pages = 4, 2, 4, 64, 16, 4
    lens = _lens(0, 15, 16, 30)
    kc = torch.randn(B, hkv, max_pages * ps, D, generator=g).to(DEVICE, dt)
    vc = torch.randn(B, hkv, max_pages * ps, D, generator=g).to(DEVICE, dt)
    _, table = _paginate(kc, lens + s_new, ps, spare=3, g=g)  # pages for the rows to come too
    num_pages = B * max_pages + 3
    kp, vp = _repaginate(kc, lens, table, num_pages), _repaginate(vc, lens, table, num_pages)
    k_new = torch.randn(B, s_new, hkv, D, generator=g).to(DEVICE, dt).transpose(1, 2)  # a strided view
    v_new = torch.randn(B, hkv, s_new, D, generator=g).to(DEVICE, dt)
    fastlm.ops.paged_kv_append(kp, vp, table, lens, k_new, v_new, backend=backend)
    assert lens.tolist() == [0, 15, 16, 30], "cache_seqlens is not updated"
    for b, n in enumerate(lens.tolist()):
        kc[b, :, n : n + s_new], vc[b, :, n : n + s_new] = k_new[b], v_new[b]
    new_lens = lens + s_new
    torch.testing.assert_close(kp, _repaginate(kc, new_lens, table, num_pages), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vp, _repaginate(vc, new_lens, table, num_pages), rtol=0, atol=0, equal_nan=True)
    q = torch.randn(B, hq, 1, D, generator=g).to(DEVICE, dt)
    got = fastlm.ops.decode_attention(q, kp, vp, new_lens, block_table=table, backend=backend)
    truth, base = _contiguous_ref(q, kc, vc, new_lens, None)
    assert_close(got, truth, base, name="decode after append")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_append_unaligned_rows_and_dtypes(backend, dtype):
    """Rows that are not 16-byte aligned (a view at an odd element offset: the CUDA element-copy
    path) and fp32 / bf16 caches: the same exact rows as the reference."""
    g = torch.Generator().manual_seed(11)
    dt = getattr(torch, dtype)
    B, hkv, D, ps, num_pages = 2, 3, 24, 32, 5
    table = torch.tensor([[3, 0], [1, 4]], dtype=torch.int32, device=DEVICE)
    lens = _lens(31, 0)
    big = torch.randn(B, hkv, 3, D + 1, generator=g).to(DEVICE, dt)
    k_new, v_new = big[..., 1:], big[..., :-1] * 2
    got = [torch.randn(num_pages, hkv, ps, D, generator=g).to(DEVICE, dt) for _ in range(2)]
    want = [t.clone() for t in got]
    fastlm.ops.paged_kv_append(*got, table, lens, k_new, v_new, backend=backend)
    ref.paged_kv_append(*want, table, lens, k_new, v_new)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_opcheck(backend):
    g = torch.Generator().manual_seed(5)
    lens = _lens(20, 3)
    kc, vc = torch.randn(2, 1, 32, 16, generator=g).to(DEVICE), torch.randn(2, 1, 32, 16, generator=g).to(DEVICE)
    kp, table = _paginate(kc, lens, 16, spare=1, g=g)
    vp = _repaginate(vc, lens, table, kp.shape[0])
    table = table.clamp(max=kp.shape[0] - 1)  # opcheck reruns the op on copies; keep every entry a page
    q = torch.randn(2, 2, 1, 16, generator=g).to(DEVICE)
    torch.library.opcheck(torch.ops.fastlm.decode_attention.default, (q, kp, vp, lens, 0.25, -1, -1, backend, table))
    k_new, v_new = torch.randn(2, 1, 2, 16, generator=g).to(DEVICE), torch.randn(2, 1, 2, 16, generator=g).to(DEVICE)
    torch.library.opcheck(torch.ops.fastlm.paged_kv_append.default,
                          (kp.nan_to_num(), vp.nan_to_num(), table, lens, k_new, v_new, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_step_torch_compile_fullgraph(backend):
    """append + decode in one compiled graph (no host read of the values: the checks that need one
    are skipped while compiling)."""
    def step(q, kp, vp, table, lens, k_new, v_new):
        fastlm.ops.paged_kv_append(kp, vp, table, lens, k_new, v_new, backend=backend)
        return fastlm.ops.decode_attention(q, kp, vp, lens + 1, block_table=table, backend=backend)

    g = torch.Generator().manual_seed(9)
    lens = _lens(16, 5)
    kc, vc = torch.randn(2, 1, 32, 16, generator=g).to(DEVICE), torch.randn(2, 1, 32, 16, generator=g).to(DEVICE)
    kp, table = _paginate(kc, lens + 1, 16, spare=1, g=g)
    vp = _repaginate(vc, lens + 1, table, kp.shape[0])
    q, k_new, v_new = (torch.randn(2, h, 1, 16, generator=g).to(DEVICE) for h in (2, 1, 1))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    kp2, vp2 = kp.clone(), vp.clone()
    got = compiled(q, kp, vp, table, lens, k_new, v_new)
    want = step(q, kp2, vp2, table, lens, k_new, v_new)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(kp, kp2, equal_nan=True)


def _error_inputs():
    q = torch.randn(2, 4, 1, 16, device=DEVICE)
    kp, vp = torch.randn(6, 2, 16, 16, device=DEVICE), torch.randn(6, 2, 16, 16, device=DEVICE)
    table = torch.tensor([[0, 1, GARBAGE_PAGE], [2, 3, 4]], dtype=torch.int32, device=DEVICE)
    return q, kp, vp, table, _lens(20, 40)


def test_paged_decode_errors():
    q, kp, vp, table, lens = _error_inputs()
    dec = fastlm.ops.decode_attention
    dec(q, kp, vp, lens, block_table=table)  # positive control: garbage in an entry sequence 0 never uses
    with pytest.raises(TypeError, match=r"block_table must be int32, got int64 \(use .int\(\)\)"):
        dec(q, kp, vp, lens, block_table=table.long())
    with pytest.raises(ValueError, match=r"block_table must have shape \[2, max_pages\].*got \[6\]"):
        dec(q, kp, vp, lens, block_table=table.flatten())
    with pytest.raises(ValueError, match=r"block_table must have shape \[2, max_pages\].*got \[1, 3\]"):
        dec(q, kp, vp, lens, block_table=table[:1])
    with pytest.raises(ValueError, match="block_table is on meta"):
        dec(q, kp, vp, lens, block_table=table.to("meta"))
    for ps in (24, 8, 512):
        with pytest.raises(ValueError, match=rf"page_size \(k_cache dim 2\) must be a power of two in \[16, 256\], got {ps}"):
            dec(q, torch.randn(6, 2, ps, 16), torch.randn(6, 2, ps, 16), lens, block_table=table)
    with pytest.raises(TypeError, match="k_cache dtype float16 != float32"):
        dec(q, kp.half(), vp, lens, block_table=table)
    with pytest.raises(ValueError, match=r"head dim of k_cache \(32\) != head dim of q / k_new \(16\)"):
        dec(q, torch.randn(6, 2, 16, 32), torch.randn(6, 2, 16, 32), lens, block_table=table)
    with pytest.raises(ValueError, match=r"k_cache shape \[6, 2, 16, 16\] != v_cache shape \[5, 2, 16, 16\]"):
        dec(q, kp, vp[:5], lens, block_table=table)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of key/value heads \(3\)"):
        dec(q, torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16), lens, block_table=table)
    with pytest.raises(ValueError, match="with block_table, k_cache must be 4-D"):
        dec(q, kp[0], vp[0], lens, block_table=table)
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, S_max=48\], got values in \[20, 49\]"):
        dec(q, kp, vp, _lens(20, 49), block_table=table)
    with pytest.raises(ValueError, match=r"block_table\[0, 2\] = 1000000 is not a page id in \[0, num_pages=6\)"):
        dec(q, kp, vp, _lens(33, 40), block_table=table)
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = -1 is not a page id"):
        dec(q, kp, vp, lens, block_table=torch.tensor([[0, 1, 5], [-1, 3, 4]], dtype=torch.int32))


def test_paged_kv_append_errors():
    _, kp, vp, table, lens = _error_inputs()
    kn, vn = torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16)
    app = fastlm.ops.paged_kv_append
    app(kp.clone(), vp.clone(), table, lens, kn, vn)  # positive control
    with pytest.raises(TypeError, match="k_cache dtype float16 != float32"):
        app(kp.half(), vp, table, lens, kn, vn)
    with pytest.raises(TypeError, match="v_new dtype float16 != k_new dtype float32"):
        app(kp, vp, table, lens, kn, vn.half())
    with pytest.raises(ValueError, match=r"k_new shape \[2, 2, 3, 16\] != v_new shape \[2, 2, 2, 16\]"):
        app(kp, vp, table, lens, kn, vn[:, :, :2])
    with pytest.raises(ValueError, match="k_cache has 2 key/value heads but k_new has 1"):
        app(kp, vp, table, lens, kn[:, :1], vn[:, :1])
    with pytest.raises(ValueError, match=r"head dim of k_cache \(16\) != head dim of q / k_new \(8\)"):
        app(kp, vp, table, lens, kn[..., :8], vn[..., :8])
    with pytest.raises(ValueError, match=r"cache_seqlens \+ S_new must lie in \[0, max_pages \* page_size = 48\] \(S_new = 3\), "
                                         r"got cache_seqlens in \[20, 46\]"):
        app(kp, vp, table, _lens(20, 46), kn, vn)
    with pytest.raises(ValueError, match=r"got cache_seqlens in \[-1, 40\]"):
        app(kp, vp, table, _lens(-1, 40), kn, vn)
    with pytest.raises(ValueError, match=r"block_table\[0, 2\] = 1000000 is not a page id"):
        app(kp, vp, table, _lens(31, 40), kn, vn)
    with pytest.raises(TypeError, match="block_table must be int32"):
        app(kp, vp, table.long(), lens, kn, vn)
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        app(kp, vp, table, lens.long(), kn, vn)
    with pytest.raises(ValueError, match=r"cache_seqlens must have shape \[2\]"):
        app(kp, vp, table, lens[:1], kn, vn)
    with pytest.raises(ValueError, match="page_size .* must be a power of two in \\[16, 256\\], got 24"):
        app(torch.randn(6, 2, 24, 16), torch.randn(6, 2, 24, 16), table, lens, kn, vn)
    with pytest.raises(ValueError, match="k_cache must have unit stride in the head dim"):
        app(torch.randn(6, 2, 16, 32)[..., ::2], vp, table, lens, kn, vn)
    with pytest.raises(ValueError, match="k_cache and v_cache must not share memory"):
        app(kp, kp, table, lens, kn, vn)
    with pytest.raises(ValueError, match="k_new must be 4-D"):
        app(kp, vp, table, lens, kn[0], vn[0])


@pytest.mark.parametrize("page_size", [16, 64, 256])
def test_paged_triton_production_configs(page_size):
    """The Triton kernels in the tiles a GPU runs (BLOCK_N 64 capped at the page size; BLOCK_S 64
    new rows per append program), under the interpreter."""
    from fastlm.triton._configs import gpu_configs

    g = torch.Generator().manual_seed(page_size)
    dt = torch.float16
    B, hq, hkv, D, max_pages = 2, 8, 1, 64, 2 if page_size < 256 else 1
    lens = _lens(page_size + 1 if page_size < 256 else 200, 3)
    kc = torch.randn(B, hkv, max_pages * page_size, D, generator=g).to(DEVICE, dt)
    vc = torch.randn(B, hkv, max_pages * page_size, D, generator=g).to(DEVICE, dt)
    kp, table = _paginate(kc, lens, page_size, spare=1, g=g)
    vp = _repaginate(vc, lens, table, kp.shape[0])
    k_new, v_new = (torch.randn(B, hkv, 2, D, generator=g).to(DEVICE, dt) for _ in range(2))
    q = torch.randn(B, hq, 2, D, generator=g).to(DEVICE, dt)
    with gpu_configs():
        fastlm.ops.paged_kv_append(kp, vp, table, lens - 2, k_new, v_new, backend="triton")
        got = fastlm.ops.decode_attention(q, kp, vp, lens, block_table=table, backend="triton")
    for b, n in enumerate(lens.tolist()):
        kc[b, :, n - 2 : n], vc[b, :, n - 2 : n] = k_new[b], v_new[b]
    truth, base = _contiguous_ref(q, kc, vc, lens, None)
    assert_close(got, truth, base, name="paged decode out (production configs)")
