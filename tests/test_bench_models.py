"""`fastlm bench encoder_fwd --quick`: every implementation validates against the float64 encoder (a harness check)."""

from conftest import kernel_backends

BACKENDS = kernel_backends()


def test_encoder_fwd_runs_quick():
    from fastlm.bench import runner

    _, rows = runner.run(["encoder_fwd"], quick=True, backends=BACKENDS)
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
    ok = {r["impl"] for r in rows if r["status"] == "ok"}
    assert {"torch-eager"} | {f"fastlm-{b}" for b in BACKENDS} <= ok
    assert all(r["tflops"] > 0 for r in rows if r["status"] == "ok")
