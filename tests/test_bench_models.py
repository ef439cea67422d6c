"""`fastlm bench encoder_fwd|vit_train --quick`: every implementation validates against float64 (harness checks)."""

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


def test_vit_train_runs_quick():
    """`fastlm bench vit_train --quick`: every implementation's training-step loss validates against float64."""
    from fastlm.bench import runner

    _, rows = runner.run(["vit_train"], quick=True, backends=BACKENDS)
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
    ok = {r["impl"] for r in rows if r["status"] == "ok"}
    assert {"torch-eager"} | {f"fastlm-{b}" for b in BACKENDS} <= ok
    assert all(r["tflops"] > 0 for r in rows if r["status"] == "ok")
