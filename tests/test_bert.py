"""Hugging Face BERT directories as fastlm's post-norm GPT: hidden states, masked-LM logits and
gradients against transformers' BERT in float64 by the tolerance rule (reference and Triton
backends), the packed form per text, every checkpoint kind and weight naming, each refusal, a
wrong mapping caught, WordPiece tokenizers (vocab.txt and tokenizer.json) against HF's, and
``--task classify --init-from`` a BERT directory through training, resume and `fastlm classify`.
Post-norm GPTs also round-trip through fastlm checkpoints and generate with the KV caches."""

import copy
import json
import shutil
import types

import pytest
import torch
from test_task_mlm import OpCounter

import fastlm
from fastlm.cli import main
from fastlm.models import GPT, GPTConfig
from fastlm.tasks import get_task, load_task
from fastlm.testing import assert_close
from fastlm.tokenizer import EOS, Tokenizer
from fastlm.training import TrainConfig, load_model, save_checkpoint, train

transformers = pytest.importorskip("transformers", reason="the 'hf' test extra (pip install transformers)")

WORDS = {"fruit": "apple pear plum fig grape melon", "tool": "hammer saw drill wrench chisel pliers"}
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?"] + " ".join(WORDS.values()).split()
         + "the quick brown fox jump over lazy dog hello world a an is it ##s ##ed ##ing ##er".split()
         + [chr(c) for c in range(97, 123)] + ["##" + chr(c) for c in range(97, 123)])
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, WORLD! apples", "unknownword [CLS] fox",
         "a pear, a plum and a Drill", "", "jumped!!"]
KINDS = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification", "BertForPreTraining")
QUIET = dict(log=lambda *a: None)


def _hf(kind, seed=0, **kw):
    """A tiny random BERT with non-trivial norms, biases and token-type rows, and GELU inputs of
    order 1 (where erf and tanh GELU differ), so a mapping slip shows."""
    cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64, **kw)
    torch.manual_seed(seed)
    model = getattr(transformers, kind)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias") or "token_type" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("dense.weight") and ("intermediate" in name or "transform" in name):
                p.mul_(10)
    return model


def _write_vocab(path, **tokenizer_config):
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    if tokenizer_config:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """{kind: (directory, HF model)}: save_pretrained of each kind, with a vocab.txt."""
    out = {}
    for kind in KINDS:
        path = tmp_path_factory.mktemp(kind)
        model = _hf(kind)
        model.save_pretrained(path)
        _write_vocab(path)
        out[kind] = path, model
    return out


def _encoder(hf):
    return hf if isinstance(hf, transformers.BertModel) else hf.bert


def _truth_and_base(hf, fn):
    """fn(model) of the HF model in float64 (the truth) and in float32 (the noise floor)."""
    with torch.no_grad():
        return fn(copy.deepcopy(hf).double()), fn(hf)


def _check_hidden_and_logits(model, hf, ids, backend):
    with fastlm.use_backend(backend), torch.no_grad():
        h, logits = model.hidden_states(ids), model(ids)
    assert_close(h, *_truth_and_base(hf, lambda m: _encoder(m)(ids).last_hidden_state), name=f"hidden states ({backend})")
    if isinstance(hf, transformers.BertForMaskedLM):
        truth, base = _truth_and_base(hf, lambda m: m(ids).logits)
    elif isinstance(hf, transformers.BertForPreTraining):
        truth, base = _truth_and_base(hf, lambda m: m(ids).prediction_logits)
    else:  # no prediction head: the tied embedding's logits
        truth, base = _truth_and_base(hf, lambda m: (lambda e: e(ids).last_hidden_state @ e.embeddings.word_embeddings.weight.T)(_encoder(m)))
    assert_close(logits, truth, base, name=f"logits ({backend})")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["BertModel", "BertForMaskedLM"])
def test_hidden_states_and_logits_match_hugging_face(bert, kind, backend):
    """BertModel's last_hidden_state == hidden_states, BertForMaskedLM's logits == the GPT's, vs
    float64 by the tolerance rule; post-norm: 2 fused add_layer_norm per block, ln_e (and the mlm
    head's norm) as layer_norm, bidirectional attention."""
    path, hf = bert[kind]
    model = GPT.from_pretrained(path).eval()
    c = model.config
    assert (c.norm_placement, c.causal, c.gelu, c.norm_eps, c.block_size, c.n_embd) == ("post", False, "none", 1e-12, 64, 32)
    assert c.mlm_head == (kind == "BertForMaskedLM") and "ln_f" not in model.transformer
    assert (model.lm_head.bias is not None) == c.mlm_head and model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, len(VOCAB), (2, 13))
    _check_hidden_and_logits(model, hf, ids, backend)
    with pytest.MonkeyPatch.context() as mp:
        counter = OpCounter(mp)
        with fastlm.use_backend(backend), torch.no_grad():
            model(ids)
    assert counter.count("add_layer_norm") == 2 * c.n_layer and counter.count("layer_norm") == 1 + c.mlm_head
    assert counter.count("attention") == c.n_layer and counter.causal == [False] * c.n_layer


def _fold_undone(model, hf):
    model.transformer.wpe.weight -= _encoder(hf).embeddings.token_type_embeddings.weight[0]


def _key_value_swapped(model, hf):
    for p in (model.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.bias):
        C = model.config.n_embd
        p[C:] = torch.cat([p[2 * C:].clone(), p[C:2 * C].clone()])


def _tanh_gelu(model, hf):
    for block in model.transformer.h:
        block.mlp.approximate = "tanh"
    model.transformer.head.approximate = "tanh"


def _no_decoder_bias(model, hf):
    model.lm_head.bias.zero_()


def _norms_swapped(model, hf):
    b = model.transformer.h[1]
    b.ln_1.weight, b.ln_2.weight = b.ln_2.weight, b.ln_1.weight


@pytest.mark.parametrize("slip", [_fold_undone, _key_value_swapped, _tanh_gelu, _no_decoder_bias, _norms_swapped],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_wrong_mapping_breaks_the_equality(bert, slip):
    """The comparison above catches each mapping slip (so its pass means something)."""
    path, hf = bert["BertForMaskedLM"]
    model = GPT.from_pretrained(path).eval()
    ids = torch.randint(0, len(VOCAB), (2, 13))
    with torch.no_grad():
        slip(model, hf)
    with pytest.raises(AssertionError, match="exceeds"):
        _check_hidden_and_logits(model, hf, ids, "torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_texts_each_equal_hugging_face_alone(bert, backend):
    """cu_seqlens: each text of the packed batch gets HF's hidden states and logits of the text
    run alone (float64 truth, the rule), and the GPT's own unpacked result."""
    path, hf = bert["BertForMaskedLM"]
    model = GPT.from_pretrained(path).eval()
    lengths = [5, 13, 1, 8]
    seqs = [torch.randint(0, len(VOCAB), (1, n)) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with fastlm.use_backend(backend), torch.no_grad():
        h = model.hidden_states(torch.cat(seqs, 1), cu_seqlens=cu)[0]
        logits = model(torch.cat(seqs, 1), cu_seqlens=cu)[0]
        alone = [model(s)[0] for s in seqs]
    for i, s in enumerate(seqs):
        a, b = int(cu[i]), int(cu[i + 1])
        assert_close(h[a:b], *_truth_and_base(hf, lambda m, s=s: m.bert(s).last_hidden_state[0]), name=f"text {i} hidden")
        assert_close(logits[a:b], *_truth_and_base(hf, lambda m, s=s: m(s).logits[0]), name=f"text {i} logits")
        # packed runs attention_varlen, alone ops.attention: other kernels, other fp32 summation order, so
        # they agree to fp32 rounding, not bit for bit (measured: 6e-8 on logits up to 0.5, both backends)
        torch.testing.assert_close(logits[a:b], alone[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_match_hugging_face(bert, backend):
    """The masked-LM loss (ignore_index -100) and its gradients for the word embeddings (tied to the
    decoder), a fused c_attn (query, key, value), ln_e, the positions and the decoder bias, vs HF
    float64 by the rule; a key/value slip in c_attn breaks it."""
    path, hf = bert["BertForMaskedLM"]
    model = GPT.from_pretrained(path)
    ids = torch.randint(0, len(VOCAB), (2, 13))
    targets = torch.randint(0, len(VOCAB), (2, 13)).masked_fill(torch.rand(2, 13) < 0.5, -100)
    model.zero_grad()
    with fastlm.use_backend(backend):
        loss = model(ids, targets)[1]
        loss.backward()

    def grads(m):
        m.zero_grad()
        with torch.enable_grad():
            out = m(ids, labels=targets).loss
            out.backward()
        e, layer = m.bert.embeddings, m.bert.encoder.layer[1].attention.self
        return {"loss": out.detach(), "wte": e.word_embeddings.weight.grad, "ln_e": e.LayerNorm.weight.grad,
                "wpe": e.position_embeddings.weight.grad, "bias": m.cls.predictions.bias.grad,
                "c_attn": torch.cat([layer.query.weight.grad, layer.key.weight.grad, layer.value.weight.grad])}

    truth, base = grads(copy.deepcopy(hf).double()), grads(copy.deepcopy(hf))
    t = model.transformer
    ours = {"loss": loss.detach(), "wte": t.wte.weight.grad, "ln_e": t.ln_e.weight.grad, "wpe": t.wpe.weight.grad,
            "bias": model.lm_head.bias.grad, "c_attn": t.h[1].attn.c_attn.weight.grad}
    # the gradients of this tiny model are as small as 2e-3: in units of the largest true entry, the
    # rule's fixed atol (1e-5) binds at the same relative size for every gradient instead of passing
    # a small one outright; the 2x-torch part of the rule is unchanged by the common scale
    for name, g in ours.items():
        scale = float(truth[name].abs().max())
        assert_close(g / scale, truth[name] / scale, base[name] / scale, name=f"{name} grad ({backend})")
    with torch.no_grad():
        _key_value_swapped(model, hf)
    model.zero_grad()
    with fastlm.use_backend(backend):
        model(ids, targets)[1].backward()
    scale = float(truth["c_attn"].abs().max())
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close(t.h[1].attn.c_attn.weight.grad / scale, truth["c_attn"] / scale, base["c_attn"] / scale)


@pytest.mark.parametrize("kind", KINDS)
def test_every_checkpoint_kind_loads(bert, kind):
    """With or without the bert. prefix; the pooler, NSP head and classifier are ignored; the
    prediction head exactly where cls.predictions is."""
    from safetensors.torch import load_file

    path, hf = bert[kind]
    names = set(load_file(str(path / "model.safetensors")))
    assert any(n.startswith("bert.") for n in names) == (kind != "BertModel")
    model = GPT.from_pretrained(path).eval()
    assert model.config.mlm_head == any(n.startswith("cls.predictions.") for n in names) == (kind in ("BertForMaskedLM", "BertForPreTraining"))
    _check_hidden_and_logits(model, hf, torch.randint(0, len(VOCAB), (1, 9)), "torch")


def test_a_legacy_pytorch_model_bin_loads(bert, tmp_path):
    """pytorch_model.bin with LayerNorm gamma/beta names, the position_ids buffer and the tied
    decoder weight and bias written out: the same GPT as the safetensors directory; with
    tie_word_embeddings false the decoder weight is lm_head's own."""
    path, hf = bert["BertForMaskedLM"]
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v.clone()
          for k, v in hf.state_dict().items()}
    sd["bert.embeddings.position_ids"] = torch.arange(64)[None]
    sd["cls.predictions.decoder.weight"] = hf.bert.embeddings.word_embeddings.weight.detach().clone()
    sd["cls.predictions.decoder.bias"] = hf.cls.predictions.bias.detach().clone()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    shutil.copy(path / "config.json", tmp_path)
    a, b = GPT.from_pretrained(tmp_path).state_dict(), GPT.from_pretrained(path).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    sd["cls.predictions.decoder.weight"] = torch.randn_like(sd["cls.predictions.decoder.weight"])
    torch.save(sd, tmp_path / "pytorch_model.bin")
    untied = GPT.from_pretrained(tmp_path)
    assert not untied.config.tie_embeddings and untied.lm_head.weight is not untied.transformer.wte.weight
    assert torch.equal(untied.lm_head.weight, sd["cls.predictions.decoder.weight"]) and torch.equal(untied.transformer.wte.weight, b["transformer.wte.weight"])


def _edit_weights(path, fn):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "model.safetensors"))
    fn(sd)
    save_file(sd, str(path / "model.safetensors"))


@pytest.mark.parametrize("config,weights,message", [
    (dict(hidden_act="relu"), None, r"hidden_act 'relu' is not supported \(gelu, gelu_new or gelu_pytorch_tanh\)"),
    (dict(position_embedding_type="relative_key"), None, r"position_embedding_type 'relative_key' is not supported \(absolute\)"),
    (dict(is_decoder=True), None, "is_decoder is true: fastlm reads BERT encoders"),
    (dict(intermediate_size=96), None, r"intermediate_size 96 must be 4 x hidden_size \(128\): fastlm's MLP is 4x"),
    (dict(num_hidden_layers=5000), None, r"sizes beyond fastlm's limits: n_layer=5000 \(at most 1024\)"),
    (dict(vocab_size=None), None, r"config.json: GPTConfig: vocab_size must be an integer, got None"),
    (dict(vocab_size="drop"), None, r"config.json has no 'vocab_size'"),
    (dict(vocab_size=len(VOCAB) + 3), None, r"weights do not match config.json"),
    (None, lambda sd: sd.pop("bert.encoder.layer.1.output.LayerNorm.bias"), r"missing \['transformer.h.1.ln_2.bias'\]"),
    (None, lambda sd: sd.pop("bert.encoder.layer.0.attention.self.key.weight"), r"transformer.h.0.attn.c_attn.query.weight without its key and value"),
    (None, lambda sd: sd.pop("bert.embeddings.token_type_embeddings.weight"), r"missing 'embeddings.token_type_embeddings.weight'"),
    (None, lambda sd: sd.update({"qa_outputs.weight": torch.zeros(2, 32)}), r"unexpected \['qa_outputs.weight'\]"),
    (None, lambda sd: sd.update({"bert.encoder.layer.0.crossattention.self.query.weight": torch.zeros(32, 32)}),
     r"unexpected \['encoder.layer.0.crossattention.self.query.weight'\]"),
])
def test_refusals_are_clear_errors(bert, tmp_path, config, weights, message):
    shutil.copytree(bert["BertForMaskedLM"][0], tmp_path / "d")
    path = tmp_path / "d"
    GPT.from_pretrained(path)  # the unedited copy loads
    if config:
        hf = json.loads((path / "config.json").read_text())
        for k, v in config.items():
            if v == "drop":
                del hf[k]
            else:
                hf[k] = v
        (path / "config.json").write_text(json.dumps(hf))
    if weights:
        _edit_weights(path, weights)
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(path)


def test_config_fields_and_checkpoint_round_trip(tmp_path):
    """norm_placement / mlm_head: validated; "pre" keeps today's module names; a post-norm GPT with
    the mlm head saves and loads through a fastlm checkpoint (config.json holds both, and an old
    config.json without them loads with the defaults)."""
    tiny = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)
    with pytest.raises(ValueError, match="norm_placement must be 'pre' or 'post', got 'mid'"):
        GPTConfig(**tiny, norm_placement="mid")
    with pytest.raises(ValueError, match="mlm_head .* needs causal=False, got causal=True"):
        GPTConfig(**tiny, mlm_head=True)
    with pytest.raises(TypeError, match="mlm_head must be true or false, got 'yes'"):
        GPTConfig(**tiny, causal=False, mlm_head="yes")
    pre = set(GPT(GPTConfig(**tiny)).state_dict())
    assert "transformer.ln_f.weight" in pre and not any(k.startswith(("transformer.ln_e", "transformer.head")) for k in pre)
    assert "lm_head.bias" not in pre
    torch.manual_seed(0)
    cfg = GPTConfig(**tiny, causal=False, norm_placement="post", mlm_head=True, norm="rmsnorm", positions="rotary")
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert {"transformer.ln_e.weight", "transformer.head.c_fc.weight", "transformer.head.ln.weight", "lm_head.bias"} <= set(model.state_dict())
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in GPTConfig(**tiny).to_dict().items() if k not in ("norm_placement", "mlm_head")}
    assert GPTConfig.from_dict(old) == GPTConfig(**tiny)
    save_checkpoint(tmp_path, model, None, None, {"step": 0})
    stored = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    assert stored["norm_placement"] == "post" and stored["mlm_head"] is True
    for loaded in (load_model(tmp_path), GPT.from_pretrained(tmp_path)):
        assert loaded.config == cfg
        ids = torch.randint(0, 50, (2, 9))
        with torch.no_grad():
            assert torch.equal(loaded(ids), model(ids))


POST_VARIANTS = {"learned-layernorm": dict(), "rotary-rmsnorm-gqa": dict(positions="rotary", norm="rmsnorm", n_kv_head=1)}


@pytest.mark.parametrize("variant", list(POST_VARIANTS))
def test_a_causal_post_norm_gpt_generates_with_both_caches(variant):
    """The KV-cache paths of a post-norm GPT: greedy tokens with the static cache (same-length
    prompts) and the paged cache (a ragged batch, prefilled packed) equal recomputing the sequence."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=24, n_layer=2, n_head=2, n_embd=32, norm_placement="post",
                          **POST_VARIANTS[variant])).eval()
    with torch.no_grad():  # large weights and norm gains near 1: well-separated, varied greedy picks
        for name, p in model.named_parameters():
            p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.3)

    def recompute(prompt, n):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        return seq[len(prompt):]

    with fastlm.use_backend("torch"):
        for prompts, packed in (([[5, 17, 3, 9], [6, 2, 11, 40]], 0), ([[5, 17, 3, 60, 42, 7, 1], [63], [8, 9, 10]], 2)):
            with pytest.MonkeyPatch.context() as mp:
                counter = OpCounter(mp)
                out = model.generate(prompts, 6, temperature=0)
            assert counter.count("attention_varlen") == packed and counter.count("decode_attention") >= 5 * 2
            assert out == [recompute(p, 6) for p in prompts]
            assert any(len(set(o)) > 1 for o in out), "the test needs varied tokens"


def _hf_tokenizer(path):
    return transformers.BertTokenizerFast.from_pretrained(str(path))


@pytest.mark.parametrize("lower", [True, False])
def test_wordpiece_tokenizers_match_hugging_face(tmp_path, lower):
    """vocab.txt (do_lower_case from tokenizer_config.json, default true) and HF's tokenizer.json
    give HF's ids without special tokens; [CLS]/[SEP] ids; eos falls back to [SEP]."""
    (tmp_path / "vocab").mkdir()
    _write_vocab(tmp_path / "vocab", **({} if lower else {"do_lower_case": False}))
    hf = _hf_tokenizer(tmp_path / "vocab")
    hf.save_pretrained(tmp_path / "json")
    assert (tmp_path / "json" / "tokenizer.json").is_file() and not (tmp_path / "json" / "vocab.txt").exists()
    want = [hf(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert any(1 not in w and len(w) > 2 for w in want), "the test needs texts the vocabulary covers"
    for d in ("vocab", "json"):
        tok = Tokenizer.load(tmp_path / d)
        assert [tok.encode(t) for t in TEXTS] == tok.encode_batch(TEXTS) == want
        assert (tok.cls_id, tok.sep_id, tok.eos_id, tok.vocab_size) == (hf.cls_token_id, hf.sep_token_id, hf.sep_token_id, len(VOCAB))
    other = tmp_path / "other"
    other.mkdir()
    _write_vocab(other, do_lower_case=not lower)
    assert [Tokenizer.load(other).encode(t) for t in TEXTS] != want  # lowercasing is read, not assumed


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_classify_frames_a_text_as_hugging_face_does(bert, tmp_path, pooling):
    """ClassifyTask.encode on a BERT tokenizer: [CLS] text [SEP], truncated to the context as HF's
    truncation does; a byte-level BPE tokenizer keeps its end-of-text framing."""
    task = get_task("classify")(None)
    hf = _hf_tokenizer(bert["BertModel"][0])
    task.pooling, task.tokenizer = pooling, Tokenizer.load(bert["BertModel"][0])
    for T in (64, 6):
        task.model = types.SimpleNamespace(config=types.SimpleNamespace(block_size=T))
        assert task.encode(TEXTS) == hf(TEXTS, truncation=True, max_length=T)["input_ids"]
    bpe = Tokenizer.train([" ".join(TEXTS)] * 4, 300)
    assert bpe.cls_id is None and bpe.sep_id is None and bpe.eos_id == bpe.tk.token_to_id(EOS)
    task.tokenizer = bpe
    ids = bpe.encode(TEXTS[0])[:5]
    want = {"cls": [bpe.eos_id, *ids], "last": [*ids, bpe.eos_id], "mean": bpe.encode(TEXTS[0])[:6]}[pooling]
    assert task.encode(TEXTS[:1]) == [want]


def _records(n=48):
    out = []
    for i in range(n):
        label = ["fruit", "tool"][i % 2]
        words = WORDS[label].split()
        out.append({"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 5)), "label": label})
    return out


def _tc(data, out, init, **kw):
    base = dict(task="classify", data=[str(data)], init_from=str(init), steps=4, batch_size=8, warmup=1, eval_interval=2,
                eval_iters=2, log_interval=1, out=str(out), progress=False, backend="torch", device="cpu", val_fraction=0.2)
    return TrainConfig(**{**base, **kw})


def test_classify_init_from_a_bert_directory_trains_resumes_and_predicts(bert, tmp_path, capsys, monkeypatch):
    """`fastlm train --task classify --init-from <BERT dir>` (the Python API): the backbone starts as
    the BERT, pooling cls on [CLS]; the checkpoint stores the post-norm config; resume is exact and
    `fastlm classify --checkpoint` gives the loaded model's predictions."""
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(tmp_path / "cache"))
    init = bert["BertForMaskedLM"][0]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    task = get_task("classify")(None)
    torch.manual_seed(0)
    with fastlm.use_backend("torch"):
        task.model = task.new_model(_tc(data, tmp_path / "o", init), print)
    ref = GPT.from_pretrained(init).state_dict()
    assert task.pooling == "cls" and all(torch.equal(v, ref[k]) for k, v in task.model.backbone.state_dict().items())
    full = train(_tc(data, tmp_path / "full", init), **QUIET)
    train(_tc(data, tmp_path / "split", init, steps=2, decay_steps=4), **QUIET)
    rest = train(_tc(data, tmp_path / "split", init, resume=True), **QUIET)
    assert rest["start_step"] == 2 and rest["eval"] == full["eval"] and "eval_accuracy" in rest["eval"]
    stored = json.loads((tmp_path / "split" / "checkpoint" / "config.json").read_text())["backbone"]
    assert (stored["norm_placement"], stored["mlm_head"], stored["causal"]) == ("post", True, False)
    task, model = load_task(tmp_path / "split", expect="classify")
    _, other = load_task(tmp_path / "full")
    assert model.config.norm_placement == "post" and task.tokenizer.cls_id == VOCAB.index("[CLS]")
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
    texts = ["apple fig", "saw drill pliers"]
    want = task.predict(model, texts)
    assert want == load_task(tmp_path / "full")[0].predict(other, texts)
    capsys.readouterr()
    assert main(["classify", "--checkpoint", str(tmp_path / "split"), "--text", texts[0], "--text", texts[1], "--json",
                 "--backend", "torch"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == [w["label"] for w in want]
    for r, w in zip(rows, want, strict=True):
        assert r["probabilities"] == pytest.approx(w["probabilities"])


def test_sft_refuses_a_bert_directory(bert, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "apple", "response": "fruit"}) + "\n")
    with pytest.raises(ValueError, match=r"a bidirectional model \(causal=False\) cannot generate; sft needs a causal one"):
        train(_tc(data, tmp_path / "o", bert["BertModel"][0], task="sft"), **QUIET)
