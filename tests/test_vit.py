"""The ViT: config and presets, image errors, the fused model against the reference backend (logits
and every parameter gradient by the tolerance rule), every op call through fastlm.ops, the 2-D
sinusoidal table, ImageFolder loading and its errors, the built-in glyph set, and a short training
run that beats chance on held-out glyphs."""

import copy
import math

import pytest
import torch
from conftest import DEVICE, kernel_backends

import fastlm
from fastlm import vision
from fastlm.models import VIT_PRESETS, ViT, ViTConfig
from fastlm.models.vit import sinusoidal_2d
from fastlm.testing import GRAD_FACTOR_ATTENTION, assert_close

BACKENDS = kernel_backends()
TINY = dict(image_size=8, patch_size=4, in_channels=3, num_classes=5, n_layer=2, n_head=2, n_embd=32)
VARIANTS = {
    "learned-cls": dict(),
    "sinusoidal-mean-rmsnorm": dict(positions="sinusoidal", pool="mean", norm="rmsnorm", bias=False),
}
OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "attention", "rotary", "embed_sinusoidal",
       "sinusoidal_position_encoding")


def _model(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return ViT(ViTConfig(**{**TINY, **kw})).to(device=DEVICE, dtype=dtype)


def test_presets_and_config_errors():
    assert set(VIT_PRESETS) == {"tiny", "vit-b16"}
    tiny = ViTConfig.from_preset("tiny")
    assert (tiny.image_size, tiny.patch_size, tiny.n_tokens) == (32, 4, 65)
    with torch.device("meta"):
        assert 86.5e6 < ViT(ViTConfig.from_preset("vit-b16")).num_params() < 86.6e6  # ViT-B/16 at 1000 classes: 86.6M
    assert ViTConfig.from_dict(tiny.to_dict()) == tiny
    with pytest.raises(ValueError, match="unknown ViT preset 'vit-h'; presets: tiny, vit-b16"):
        ViTConfig.from_preset("vit-h")
    for bad, match in [(dict(image_size=10), "multiple of patch_size"), (dict(positions="rotary"), "positions must be"),
                       (dict(pool="max"), "pool must be"), (dict(n_head=3), "multiple of n_head"),
                       (dict(positions="sinusoidal", n_embd=34, n_head=2), "multiple of 4"), (dict(num_classes=-1), "num_classes >= 0")]:
        with pytest.raises(ValueError, match=match):
            ViTConfig(**{**TINY, **bad})
    with pytest.raises(TypeError, match="image_size must be an integer"):
        ViTConfig(**{**TINY, "image_size": 8.0})
    with pytest.raises(ValueError, match="unknown field"):
        ViTConfig.from_dict({**TINY, "colour": 1})


def test_image_errors_and_positive_control():
    model = _model()
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    assert model(x).shape == (2, 5)
    assert model.features(x).shape == (2, 32) and model.hidden_states(x).shape == (2, 5, 32)
    with pytest.raises(TypeError, match="floating-point tensor"):
        model(torch.zeros(2, 3, 8, 8, dtype=torch.uint8, device=DEVICE))
    with pytest.raises(ValueError, match=r"shape \(B, 3, 8, 8\).*got \[2, 1, 8, 8\]"):
        model(torch.randn(2, 1, 8, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"shape \(B, 3, 8, 8\).*got \[2, 3, 12, 12\]"):
        model(torch.randn(2, 3, 12, 12, device=DEVICE))
    with pytest.raises(ValueError, match=r"got \[3, 8, 8\]"):
        model(torch.randn(3, 8, 8, device=DEVICE))
    with pytest.raises(ValueError, match="no head"):
        _model(num_classes=0)(x)


def test_sinusoidal_2d_rows_and_columns():
    """Row r * grid + c of the table is [PE(r), PE(c)], each over dim / 2 channels."""
    grid, dim = 3, 8
    table = sinusoidal_2d(grid, dim, device=DEVICE).cpu().double()
    i = torch.arange(dim // 2)
    inv = 10000.0 ** (-(2 * (i // 2)).double() / (dim // 2))
    for r in range(grid):
        for c in range(grid):
            pe = [torch.where(i % 2 == 0, (p * inv).sin(), (p * inv).cos()) for p in (r, c)]
            torch.testing.assert_close(table[r * grid + c], torch.cat(pe), rtol=0, atol=1e-6)


def _logits_and_grads(model, x, g, backend):
    model.zero_grad(set_to_none=True)
    with fastlm.use_backend(backend):
        logits = model(x.to(next(model.parameters()).dtype))
    (logits * g.to(logits.dtype)).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_model_matches_reference(variant, backend):
    """Same weights: the kernel model's logits and every parameter gradient against the float64
    reference, within 2x (logits) / 3x (gradients, through attention's backward) of the float32
    reference's own error, plus atol."""
    model = _model(**VARIANTS[variant])
    x = torch.randn(3, 3, 8, 8, device=DEVICE)
    g = torch.randn(3, 5, device=DEVICE, dtype=torch.float64)
    out, grads = _logits_and_grads(model, x, g, backend)
    base, base_grads = _logits_and_grads(copy.deepcopy(model), x, g, "torch")
    truth, truth_grads = _logits_and_grads(copy.deepcopy(model).double(), x, g, "torch")
    assert_close(out, truth, base, name="logits")
    assert set(grads) == set(truth_grads)
    for name in grads:
        assert grads[name] is not None, name
        assert_close(grads[name], truth_grads[name], base_grads[name], name=f"grad {name}", factor=GRAD_FACTOR_ATTENTION)


class OpCounter:
    """Wraps fastlm.ops functions and fastlm.backend.resolve: which ops ran, on which backend."""

    def __init__(self, monkeypatch):
        self.calls, self.resolved = [], []
        for name in OPS:
            fn = getattr(fastlm.ops, name)
            monkeypatch.setattr(fastlm.ops, name, self._wrap(name, fn))
        resolve = fastlm.backend.resolve
        monkeypatch.setattr(fastlm.backend, "resolve", lambda b, d, op=None: self.resolved.append((op, resolve(b, d, op))) or self.resolved[-1][1])

    def _wrap(self, name, fn):
        def wrapped(*a, **k):
            self.calls.append(name)
            return fn(*a, **k)

        return wrapped

    def count(self, name):
        return self.calls.count(name)


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_op_goes_through_fastlm_and_follows_use_backend(monkeypatch, variant, backend):
    kw = VARIANTS[variant]
    model = _model(**kw)
    counter = OpCounter(monkeypatch)
    L = TINY["n_layer"]
    with fastlm.use_backend(backend):
        model(torch.randn(2, 3, 8, 8, device=DEVICE)).sum().backward()
    rms = kw.get("norm") == "rmsnorm"
    assert counter.count("rms_norm" if rms else "layer_norm") == 1  # the first block's ln_1
    assert counter.count("add_rms_norm" if rms else "add_layer_norm") == 2 * L  # ln_2, the next ln_1, ln_f
    assert counter.count("attention") == L
    assert counter.count("sinusoidal_position_encoding") == (1 if kw.get("positions") == "sinusoidal" else 0)
    assert len(counter.calls) == 1 + 2 * L + L + (kw.get("positions") == "sinusoidal")
    assert {b for _, b in counter.resolved} == {backend}, counter.resolved


def test_attention_is_bidirectional():
    """Changing the last patch changes the CLS token's state (a causal mask would hide it)."""
    model = _model().eval()
    x = torch.randn(1, 3, 8, 8, device=DEVICE)
    y = x.clone()
    y[..., 4:, 4:] += 1.0
    with fastlm.use_backend("torch"):
        assert not torch.allclose(model.hidden_states(x)[:, 0], model.hidden_states(y)[:, 0])


# ---- data -----------------------------------------------------------------------------------------


def test_image_folder_round_trip_and_resize(tmp_path):
    data = vision.glyph_images(6, 12, classes="ab", seed=3)
    vision.save_image_folder(data, tmp_path)
    (tmp_path / "b" / "notes.txt").write_text("not an image")  # ignored: not an image extension
    from PIL import Image

    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a" / "big.bmp")  # another size: resized
    back = vision.image_folder(tmp_path, image_size=12)
    assert back.classes == ["a", "b"] and back.images.shape == (7, 3, 12, 12)
    assert back.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert back.images.min() >= -1 and back.images.max() <= 1
    torch.testing.assert_close(back.images[:3], data.images[data.labels == 0], rtol=0, atol=1 / 127.5 + 1e-6)  # 8-bit PNG
    torch.testing.assert_close(back.images[3], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 12, 12), rtol=0, atol=0)
    assert vision.image_folder(tmp_path, image_size=8, channels=1).images.shape == (7, 1, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vision.image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class sub-folders"):
        vision.image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(ValueError, match="class 'cat' has no images"):
        vision.image_folder(tmp_path)
    (tmp_path / "cat" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"unreadable image .*x\.png"):
        vision.image_folder(tmp_path)
    with pytest.raises(ValueError, match="channels must be 1"):
        vision.image_folder(tmp_path, channels=4)


def test_split_and_glyphs():
    data = vision.glyph_images(50, 16, seed=1)
    assert data.images.shape == (50, 3, 16, 16) and data.classes == list("0123456789")
    assert data.labels.bincount().tolist() == [5] * 10
    torch.testing.assert_close(vision.glyph_images(50, 16, seed=1).images, data.images, rtol=0, atol=0)  # seeded
    assert not torch.equal(vision.glyph_images(50, 16, seed=2).images, data.images)
    train, held = data.split(0.2, seed=0)
    assert (len(train), len(held)) == (40, 10)
    assert not set(map(tuple, train.images.flatten(1).tolist())) & set(map(tuple, held.images.flatten(1).tolist()))
    with pytest.raises(ValueError, match="val_fraction must lie in"):
        data.split(1.0)
    with pytest.raises(ValueError, match="at least 2 items"):
        data.subset([0]).split(0.5)
    with pytest.raises(ValueError, match="at least 2 distinct"):
        vision.glyph_images(4, classes="aa")


def test_training_beats_chance():
    """300 steps on 3000 built-in glyphs (10 classes, 16 x 16): held-out accuracy well above the 10% of chance."""
    cfg = ViTConfig(image_size=16, patch_size=4, n_layer=2, n_head=4, n_embd=64, num_classes=10)
    seen = []
    with fastlm.use_backend("torch"):
        result = vision.train_vit(cfg, vision.glyph_images(3000, 16), steps=300, batch_size=64, lr=3e-3, eval_every=150,
                                  callback=lambda step, m: seen.append((step, m)))
    assert result["eval_accuracy"] > 0.3, result["eval_accuracy"]
    assert len(seen) == 300 and "eval_accuracy" in seen[149][1] and "eval_accuracy" not in seen[0][1]
    assert all(math.isfinite(m["loss"]) for _, m in seen)
    assert sum(result["losses"][-30:]) < sum(result["losses"][:30])


def test_vit_task_trains_checkpoints_and_predicts(tmp_path):
    """`fastlm train --task vit` through the trainer on an ImageFolder: eval_accuracy in metrics.jsonl,
    an accuracy plot, a checkpoint that load_task rebuilds (classes from task.json), predict on files;
    batches are a function of (seed, position) only."""
    from fastlm.tasks import get_task, load_task
    from fastlm.training import TrainConfig, read_metrics, train

    vision.save_image_folder(vision.glyph_images(40, 16, classes="xo", seed=4), tmp_path / "data")
    tc = TrainConfig(task="vit", data=[str(tmp_path / "data")], model=dict(image_size=16, n_layer=1, n_embd=32, n_head=2),
                     steps=4, batch_size=8, eval_interval=2, eval_iters=2, log_interval=2, out=str(tmp_path / "out"),
                     progress=False, backend="torch", device="cpu", val_fraction=0.25)
    summary = train(tc, log=lambda *a: None)
    assert set(summary["eval"]) == {"eval_loss", "eval_accuracy"}
    assert [r["step"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")[0] if "eval_accuracy" in r] == [2, 4]
    assert (tmp_path / "out" / "accuracy.png").is_file()
    task, model = load_task(tmp_path / "out", expect="vit")
    assert task.classes == ["o", "x"] and model.config.num_classes == 2 and model.config.image_size == 16
    files = sorted((tmp_path / "data" / "x").iterdir())[:2]
    preds = task.predict(model, files)
    assert len(preds) == 2 and all(p["label"] in ("o", "x") and abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in preds)

    def batches():
        t = get_task("vit")({})
        t.model = t.new_model(tc, print)
        t.load_data(tc, print)
        return t.batch(5, 4)

    a, b = batches(), batches()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="not a ViT preset"):
        train(TrainConfig(task="vit", preset="gpt2", out=str(tmp_path / "x"), progress=False, device="cpu"))
    with pytest.raises(FileNotFoundError, match="not an ImageFolder directory"):
        train(TrainConfig(task="vit", data=[str(tmp_path / "none")], out=str(tmp_path / "x"), progress=False, device="cpu"))


def test_task_set_parsing_is_typed_by_the_configs():
    """--set for the vision tasks: ViTConfig fields (vit); vision.X / text.X / embed_dim (clip)."""
    from fastlm.tasks.clip import CLIPTask
    from fastlm.tasks.vit import ViTTask

    assert ViTTask.parse_sets(["image_size=16", "positions=sinusoidal", "bias=false", "dropout=0.1"]) == dict(
        image_size=16, positions="sinusoidal", bias=False, dropout=0.1)
    assert CLIPTask.parse_sets(["vision.patch_size=2", "text.causal=true", "embed_dim=32"]) == {
        "vision.patch_size": 2, "text.causal": True, "embed_dim": 32}
    with pytest.raises(ValueError, match="'colour' is not a ViTConfig field"):
        ViTTask.parse_sets(["colour=red"])
    with pytest.raises(ValueError, match="invalid literal"):
        ViTTask.parse_sets(["image_size=big"])
    with pytest.raises(ValueError, match="expected true or false"):
        CLIPTask.parse_sets(["text.bias=maybe"])
    with pytest.raises(ValueError, match="KEY vision.FIELD, text.FIELD"):
        CLIPTask.parse_sets(["depth=3"])


def test_cli_train_vit_takes_vit_config_sets(tmp_path, capsys):
    """`fastlm train --task vit --set image_size=16 ...`: --set is typed by ViTConfig for the vision
    tasks (GPTConfig for the others); an unknown field is a clear exit-2 error."""
    from fastlm.cli import main
    from fastlm.tasks import load_task

    vision.save_image_folder(vision.glyph_images(24, 16, classes="xo", seed=2), tmp_path / "data")
    common = ["train", "--task", "vit", "--data", str(tmp_path / "data"), "--steps", "2", "--batch-size", "4",
              "--eval-interval", "2", "--eval-iters", "1", "--device", "cpu", "--backend", "torch", "--no-progress"]
    sets = ["--set", "image_size=16", "--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2"]
    assert main(common + sets + ["--out", str(tmp_path / "out")]) == 0
    _, model = load_task(tmp_path / "out", expect="vit")
    assert (model.config.image_size, model.config.n_layer, model.config.n_embd) == (16, 1, 32)
    assert main(common + ["--set", "colour=red", "--out", str(tmp_path / "bad")]) == 2
    assert "'colour' is not a ViTConfig field" in capsys.readouterr().err


def test_the_vit_task_trains_with_its_own_batch_and_steps_unless_told(tmp_path, monkeypatch):
    """TrainConfig.for_task and `fastlm train --task vit`: settings left out take the task's
    train_defaults (vit: batch 64, 300 steps; at the language model's 16 the tiny ViT sat at
    chance), then TrainConfig's; given ones win; --resume takes the checkpoint's, not the task's."""
    import fastlm.training
    from fastlm.cli import main
    from fastlm.training import TrainConfig

    vit = TrainConfig.for_task("vit")
    assert (vit.batch_size, vit.steps, vit.lr, vit.weight_decay) == (64, 300, TrainConfig.lr, TrainConfig.weight_decay)
    assert (TrainConfig.for_task("vit", batch_size=8, steps=5).batch_size, TrainConfig.for_task("vit", steps=5).steps) == (8, 5)
    assert TrainConfig.for_task("lm") == TrainConfig() and TrainConfig.for_task("clip").batch_size == TrainConfig.batch_size
    assert TrainConfig.for_task("vit", resume=True).batch_size == TrainConfig.batch_size
    with pytest.raises(ValueError, match="is not a task"):
        TrainConfig.for_task("nope")

    seen = []
    monkeypatch.setattr(fastlm.training, "train", lambda tc: seen.append(tc) or {"interrupted": False})
    for argv, want in ((["--task", "vit"], (64, 300, 1e-3, 0.1)), (["--task", "vit", "--batch-size", "4", "--lr", "3e-4"], (4, 300, 3e-4, 0.1)),
                       (["--task", "mlm", "--weight-decay", "0"], (16, 500, 1e-3, 0.0)), (["--task", "vit", "--resume"], (16, 500, 1e-3, 0.1))):
        assert main(["train", *argv, "--out", str(tmp_path / "o")]) == 0
        assert (seen[-1].task, seen[-1].batch_size, seen[-1].steps, seen[-1].lr, seen[-1].weight_decay) == (argv[1], *want)
