"""CLIP: config and presets, byte tokenisation, the fused model against the reference backend (logits
and every parameter gradient by the tolerance rule), every op call through fastlm.ops, the symmetric
loss, the clamped temperature, retrieval and zero-shot on known similarities, the pairs jsonl and
its errors, the similarity plot, and a short training run that beats chance on held-out pairs."""

import copy

import pytest
import torch
from conftest import DEVICE, kernel_backends
from test_vit import OpCounter

import fastlm
from fastlm import vision
from fastlm.models import CLIP, CLIP_PRESETS, CLIPConfig, GPTConfig, ViTConfig
from fastlm.models.clip import EOT, MAX_LOGIT_SCALE, PAD, contrastive_loss, plot_similarity
from fastlm.testing import GRAD_FACTOR_ATTENTION, assert_close

BACKENDS = kernel_backends()
TINY = dict(
    vision=dict(image_size=8, patch_size=4, n_layer=2, n_head=2, n_embd=32),
    text=dict(block_size=12, n_layer=2, n_head=2, n_embd=32, positions="rotary"),
    embed_dim=16,
)


def _model(**kw):
    torch.manual_seed(0)
    return CLIP(CLIPConfig(**{**TINY, **kw})).to(DEVICE)


def test_presets_and_config_errors():
    assert set(CLIP_PRESETS) == {"tiny", "vit-b16"}
    cfg = CLIPConfig.from_preset("vit-b16")
    assert cfg.vision.num_classes == 0 and cfg.text.causal and cfg.text.block_size == 77
    with torch.device("meta"):
        # OpenAI's ViT-B/16: 149.6M, 25.3M of them its 49408-token embedding; ours embeds 258 byte ids
        assert 124e6 < CLIP(cfg).num_params() < 125e6
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        CLIPConfig.from_preset("rn50")
    with pytest.raises(ValueError, match="must be causal"):
        CLIPConfig(**{**TINY, "text": {**TINY["text"], "causal": False}})
    with pytest.raises(ValueError, match="init_logit_scale must lie in"):
        CLIPConfig(**TINY, init_logit_scale=5.0)
    with pytest.raises(TypeError, match="vision must be a ViTConfig"):
        CLIPConfig(**{**TINY, "vision": 3})
    assert isinstance(CLIPConfig(**TINY).vision, ViTConfig) and isinstance(CLIPConfig(**TINY).text, GPTConfig)


def test_tokenize_bytes_eot_pad_truncation():
    model = _model()
    ids = model.tokenize(["ab", "é", "x" * 30])
    assert ids.shape == (3, 12) and ids.dtype == torch.long
    assert ids[0].tolist() == [97, 98, EOT] + [PAD] * 9
    assert ids[1, :3].tolist() == [0xC3, 0xA9, EOT]
    assert ids[2].tolist() == [120] * 11 + [EOT]
    with pytest.raises(TypeError, match="list of strings"):
        model.tokenize([1, 2])
    with pytest.raises(ValueError, match="needs an EOT"):
        model.encode_text(torch.zeros(2, 12, dtype=torch.long, device=DEVICE))


def test_text_embedding_ignores_padding():
    """The EOT state of a causal encoder has not read the padding after it."""
    model = _model().eval()
    ids = model.tokenize(["a cat"]).to(DEVICE)
    other = ids.clone()
    other[0, -1] = 5
    with fastlm.use_backend("torch"):
        torch.testing.assert_close(model.encode_text(other), model.encode_text(ids), rtol=0, atol=0)
        changed = ids.clone()
        changed[0, 0] = 66
        assert not torch.allclose(model.encode_text(changed), model.encode_text(ids))


def _logits_and_grads(model, x, ids, g, backend):
    model.zero_grad(set_to_none=True)
    with fastlm.use_backend(backend):
        logits = model(x.to(model.logit_scale.dtype), ids)
    (logits * g.to(logits.dtype)).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_model_matches_reference(backend):
    """Same weights: logits_per_image and every parameter gradient (both encoders, both projections
    and the temperature) against the float64 reference by the tolerance rule."""
    model = _model()
    x = torch.randn(3, 3, 8, 8, device=DEVICE)
    ids = model.tokenize(["a red circle", "the digit 7", "ok"]).to(DEVICE)
    g = torch.randn(3, 3, device=DEVICE, dtype=torch.float64)
    out, grads = _logits_and_grads(model, x, ids, g, backend)
    base, base_grads = _logits_and_grads(copy.deepcopy(model), x, ids, g, "torch")
    truth, truth_grads = _logits_and_grads(copy.deepcopy(model).double(), x, ids, g, "torch")
    assert_close(out, truth, base, name="logits")
    assert set(grads) == set(truth_grads)
    for name in grads:
        assert grads[name] is not None, name
        assert_close(grads[name], truth_grads[name], base_grads[name], name=f"grad {name}", factor=GRAD_FACTOR_ATTENTION)


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_every_op_goes_through_fastlm_and_follows_use_backend(monkeypatch, backend):
    model = _model()
    counter = OpCounter(monkeypatch)
    L = 2
    with fastlm.use_backend(backend):
        _, loss = model(torch.randn(2, 3, 8, 8, device=DEVICE), model.tokenize(["a", "bc"]).to(DEVICE), return_loss=True)
        loss.backward()
    assert counter.count("layer_norm") == 2  # each encoder's first ln_1
    assert counter.count("add_layer_norm") == 2 * 2 * L
    assert counter.count("attention") == 2 * L
    assert counter.count("rotary") == L  # the text encoder's positions
    assert len(counter.calls) == 2 + 4 * L + 2 * L + L
    assert {b for _, b in counter.resolved} == {backend}, counter.resolved


def test_contrastive_loss_symmetry_and_values():
    torch.manual_seed(0)
    logits = torch.randn(5, 5, dtype=torch.float64)
    loss = contrastive_loss(logits)
    target = torch.arange(5)
    by_hand = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.t(), target)) / 2
    torch.testing.assert_close(loss.double(), by_hand.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(contrastive_loss(logits.t()), loss, rtol=1e-6, atol=0)  # symmetric in images and texts
    perm = torch.randperm(5)
    torch.testing.assert_close(contrastive_loss(logits[perm][:, perm]), loss, rtol=1e-6, atol=0)  # relabelling the pairs
    assert contrastive_loss(100 * torch.eye(5)) < 1e-6
    assert contrastive_loss(100 * torch.eye(5)[torch.tensor([1, 0, 2, 3, 4])]) > 10  # two pairs swapped
    with pytest.raises(ValueError, match="square"):
        contrastive_loss(torch.randn(3, 4))


def test_logit_scale_is_clamped():
    model = _model()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert float(model.scale().detach()) == MAX_LOGIT_SCALE
    model.scale().backward()
    assert float(model.logit_scale.grad) == 0.0  # no gradient pushes it further while clamped
    model.logit_scale.grad = None
    with torch.no_grad():
        model.logit_scale.fill_(1.0)
    model.scale().backward()
    torch.testing.assert_close(model.logit_scale.grad, torch.tensor(1.0, device=DEVICE).exp())


def test_retrieval_and_zero_shot_on_known_similarities(monkeypatch):
    """eval_top1 and zero_shot read the similarity matrix as documented (duplicates one candidate)."""
    model = _model()
    texts = ["b", "a", "b", "c"]  # distinct candidates sorted: a, b, c
    sim = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.0], [0.2, 0.3, 0.1], [0.9, 0.0, 0.1]])
    monkeypatch.setattr(model, "similarity", lambda images, candidates: sim if list(candidates) == ["a", "b", "c"] else None)
    assert model.eval_top1(torch.zeros(4, 3, 8, 8), texts) == 0.75  # the last image picks "a", not its "c"
    with pytest.raises(ValueError, match="as many captions as images"):
        model.eval_top1(torch.zeros(3, 3, 8, 8), texts)
    monkeypatch.setattr(model, "similarity", lambda images, prompts: sim if prompts == ["x a", "x b", "x c"] else None)
    probs = model.zero_shot(torch.zeros(4, 3, 8, 8), ["a", "b", "c"], template="x {}")
    torch.testing.assert_close(probs, torch.softmax(model.scale().detach() * sim, -1))
    with pytest.raises(ValueError, match="template must be"):
        model.zero_shot(torch.zeros(1, 3, 8, 8), ["a"], template="no slot")
    with pytest.raises(ValueError, match="class_names must be"):
        model.zero_shot(torch.zeros(1, 3, 8, 8), "abc")


def test_similarity_is_cosine_and_plot(tmp_path):
    model = _model()
    x = torch.randn(3, 3, 8, 8, device=DEVICE)
    texts = ["a red circle", "a blue square"]
    with fastlm.use_backend("torch"):
        sim = model.similarity(x, texts)
        u = model.encode_image(x, normalize=False)
        w = model.encode_text(model.tokenize(texts).to(DEVICE), normalize=False)
        torch.testing.assert_close(sim, torch.nn.functional.cosine_similarity(u[:, None], w[None], dim=-1), rtol=1e-5, atol=1e-6)
        path = plot_similarity(model, x, texts, tmp_path / "sim.png")
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_pairs_round_trip_and_errors(tmp_path):
    data = vision.shape_pairs(4, 12, seed=2)
    assert data.texts == ["a red circle", "a green circle", "a blue circle", "a yellow circle"]
    vision.save_pairs(data, tmp_path / "pairs.jsonl")
    back = vision.image_pairs(tmp_path / "pairs.jsonl", image_size=12)
    assert back.texts == data.texts
    torch.testing.assert_close(back.images, data.images, rtol=0, atol=1 / 127.5 + 1e-6)
    assert len(vision.shape_pairs(90, 8, kinds=("digit",)).texts) == 90
    assert vision.shape_pairs(60, 8).texts[20] == "the digit 0 in red"

    bad = tmp_path / "bad.jsonl"
    for lines, match in [
        (['{"image": "images/00000.png"}'], r"bad.jsonl:1: 'text' must be a non-empty string"),
        (['{"image": "images/00000.png", "text": "ok"}', "[1]"], r"bad.jsonl:2: expected an object"),
        (["{oops"], r"bad.jsonl:1: not JSON"),
        (['{"image": "images/none.png", "text": "ok"}'], r"bad.jsonl:1: unreadable image"),
        (["", "  "], "no pairs"),
    ]:
        bad.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=match):
            vision.image_pairs(bad, image_size=12)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vision.image_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="kinds must be"):
        vision.shape_pairs(2, kinds=("animal",))


def test_caption_batches_hold_distinct_captions():
    texts = ["a", "b", "a", "c", "b", "a"]
    batches = vision.caption_batches(texts, 8, torch.Generator().manual_seed(0))
    for _ in range(20):
        idx = next(batches).tolist()
        assert sorted(texts[i] for i in idx) == ["a", "b", "c"]


def test_training_beats_chance():
    """200 steps on built-in shape pairs (20 distinct captions, 16 x 16): held-out image-to-text
    top-1 well above the 5% of chance, and zero-shot colour+shape classification of the same images."""
    cfg = CLIPConfig(vision=dict(image_size=16, patch_size=4, n_layer=2, n_head=4, n_embd=64),
                     text=dict(block_size=16, n_layer=2, n_head=4, n_embd=64), embed_dim=64)
    data = vision.shape_pairs(2000, 16, kinds=("shape",))
    with fastlm.use_backend("torch"):
        result = vision.train_clip(cfg, data, steps=200, lr=3e-3)
        assert result["eval_top1"] > 0.3, result["eval_top1"]
        _, held = data.split(0.2, seed=0)
        names = sorted({t.removeprefix("a ") for t in held.texts})
        probs = result["model"].zero_shot(held.images, names, template="a {}")
    truth = torch.tensor([names.index(t.removeprefix("a ")) for t in held.texts])
    assert float((probs.argmax(-1) == truth).float().mean()) > 0.3
    assert sum(result["losses"][-20:]) < sum(result["losses"][:20])


def test_clip_task_trains_checkpoints_and_plots(tmp_path):
    """`fastlm train --task clip` through the trainer on a pairs jsonl: eval_top1 in metrics.jsonl,
    out/similarity.png, a checkpoint that load_task rebuilds; batches hold distinct captions."""
    from fastlm.tasks import get_task, load_task
    from fastlm.training import TrainConfig, read_metrics, train

    vision.save_pairs(vision.shape_pairs(40, 16, kinds=("shape",)), tmp_path / "pairs.jsonl")
    model = {"vision.image_size": 16, "vision.n_layer": 1, "vision.n_embd": 32, "vision.n_head": 2,
             "text.n_layer": 1, "text.n_embd": 32, "text.n_head": 2, "text.block_size": 16, "embed_dim": 16}
    tc = TrainConfig(task="clip", data=[str(tmp_path / "pairs.jsonl")], model=model, steps=4, batch_size=8, eval_interval=2,
                     eval_iters=2, log_interval=2, out=str(tmp_path / "out"), progress=False, backend="torch", device="cpu",
                     val_fraction=0.25)
    summary = train(tc, log=lambda *a: None)
    assert set(summary["eval"]) == {"eval_loss", "eval_top1"} and 0 <= summary["eval"]["eval_top1"] <= 1
    assert [r["step"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")[0] if "eval_top1" in r] == [2, 4]
    assert (tmp_path / "out" / "similarity.png").is_file() and (tmp_path / "out" / "accuracy.png").is_file()
    _, loaded = load_task(tmp_path / "out", expect="clip")
    assert loaded.config.text.block_size == 16 and loaded.config.embed_dim == 16

    t = get_task("clip")({})
    t.model = t.new_model(tc, print)
    t.load_data(tc, print)
    _, ids = t.batch(3, 8)
    assert len({tuple(r) for r in ids.tolist()}) == 8
    with pytest.raises(ValueError, match="--set depth: a CLIP setting is"):
        train(TrainConfig(task="clip", model={"depth": 2}, out=str(tmp_path / "x"), progress=False, device="cpu"))
