"""The class-conditional GPT: golden parity through the public loader, KV cache, CFG, sampling."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from tests.golden import load_npz, recipe_state_dict
from vfmtok_core.checkpoint import CheckpointError
from vfmtok_core.generate import filter_logits, generate, sample_token
from vfmtok_core.gpt import GPT, GPT_CONFIGS, gpt_config, rope_2d_table

# Parameter counts from the spec (vocab 16384, 1001 class rows).
SPEC_PARAMS = {
    "GPT-B": 110_888_448,
    "GPT-L": 342_910_976,
    "GPT-XL": 774_699_520,
    "GPT-XXL": 1_410_972_672,
    "GPT-2B": 2_188_389_120,
    "GPT-3B": 3_096_659_200,
}


@pytest.fixture(scope="module")
def golden_gpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt") / "GPT-B-300e.pt"
    sd = recipe_state_dict("gpt_b")
    torch.save({"model": sd, "ema": sd, "steps": 1, "args": argparse.Namespace(gpt_model="GPT-B")}, path)
    return GPT.from_pretrained(str(path), size="GPT-B")


@pytest.fixture(scope="module")
def golden_io():
    inputs = load_npz("inputs")
    return torch.from_numpy(inputs["labels"]), torch.from_numpy(load_npz("expected_tokenizer")["codes"])


@pytest.fixture(scope="module")
def tiny():
    return GPT.from_config("GPT-tiny", seed=0, vocab_size=1024)


def _randomised(model: GPT, seed: int = 1) -> GPT:
    """The zero-initialised output layer makes every logit equal; give it weights for decoding tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.output.weight.copy_(torch.randn(model.output.weight.shape, generator=g) * 0.5)
    return model


@pytest.mark.parametrize("size", sorted(SPEC_PARAMS))
def test_parameter_counts_match_spec(size):
    with torch.device("meta"):
        model = GPT(gpt_config(size))
    assert sum(p.numel() for p in model.parameters()) == SPEC_PARAMS[size]
    assert len(model.state_dict()) == 4 + 7 * model.config.n_layer


def test_golden_logits(golden_gpt, golden_io):
    exp = load_npz("expected_gpt")
    labels, codes = golden_io
    with torch.no_grad():
        logits = golden_gpt(labels, codes)
    assert logits.shape == (2, 256, 16384) and logits.dtype == torch.float32
    np.testing.assert_allclose(logits[:, exp["logit_positions"]].numpy(), exp["logits"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(logits.argmax(-1).numpy(), exp["argmax"])


@pytest.mark.parametrize("cfg_scale,key", [(1.0, "gen_cfg1_codes"), (4.0, "gen_cfg4_codes")])
def test_golden_greedy_generation(golden_gpt, golden_io, cfg_scale, key):
    labels, _ = golden_io
    out = generate(golden_gpt, labels, cfg_scale=cfg_scale, greedy=True)
    assert out.dtype == torch.int64 and out.shape == (2, 256)
    np.testing.assert_array_equal(out.numpy(), load_npz("expected_gpt")[key])


def test_rope_table_layout():
    table = rope_2d_table(16, 64, 10000.0)
    assert table.shape == (257, 32, 2)
    assert torch.all(table[0] == 0)  # class token: cos = sin = 0
    # position 1 + r*16 + c: first 16 pairs rotate with the row, last 16 with the column
    r, c = 3, 5
    row = table[1 + r * 16 + c]
    theta = 1.0 / 10000 ** (torch.arange(0, 32, 2).float() / 32)
    torch.testing.assert_close(row[:16, 0], torch.cos(r * theta))
    torch.testing.assert_close(row[16:, 1], torch.sin(c * theta))


def test_kv_cache_matches_full_forward(tiny):
    model = _randomised(GPT.from_config("GPT-tiny", seed=0, vocab_size=1024))
    labels = torch.tensor([3, 7])
    codes = torch.randint(0, 1024, (2, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(labels, codes)
        model.setup_cache(2)
        steps = [model.prefill(labels)]
        for pos in range(1, 256):
            steps.append(model.decode(codes[:, pos - 1], torch.tensor([pos])))
        model.clear_cache()
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_greedy_is_batch_size_invariant():
    model = _randomised(GPT.from_config("GPT-tiny", seed=0, vocab_size=1024))
    labels = torch.tensor([1, 500, 999])
    for cfg_scale in (1.0, 3.0):
        together = generate(model, labels, cfg_scale=cfg_scale, greedy=True)
        alone = torch.cat([generate(model, labels[i : i + 1], cfg_scale=cfg_scale, greedy=True) for i in range(3)])
        assert torch.equal(together, alone)


def test_cfg_free_runs_only_conditional_rows(monkeypatch):
    model = _randomised(GPT.from_config("GPT-tiny", seed=0, vocab_size=1024))
    batches = []
    real = model.setup_cache
    monkeypatch.setattr(model, "setup_cache", lambda b, dtype=None: (batches.append(b), real(b, dtype)))
    labels = torch.tensor([4, 5])
    generate(model, labels, cfg_scale=1.0, greedy=True)
    generate(model, labels, cfg_scale=1.5, greedy=True)
    assert batches == [2, 4]


def test_cfg_combines_conditional_and_null_logits():
    model = _randomised(GPT.from_config("GPT-tiny", seed=0, vocab_size=1024))
    labels = torch.tensor([4])
    with torch.no_grad():
        model.setup_cache(1)
        cond = model.prefill(labels)
        model.setup_cache(1)
        uncond = model.prefill(torch.tensor([model.config.null_class]))
        model.clear_cache()
    expected = (uncond + 2.5 * (cond - uncond)).argmax(-1)
    out = generate(model, labels, cfg_scale=2.5, greedy=True)
    assert out[0, 0] == expected[0]


def test_seeded_sampling_is_reproducible():
    model = _randomised(GPT.from_config("GPT-tiny", seed=0, vocab_size=1024))
    labels = torch.tensor([1, 2])

    def run(seed):
        return generate(model, labels, cfg_scale=2.0, top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    greedy = generate(model, labels, greedy=True)
    assert torch.equal(generate(model, labels, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)


def test_filter_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    probs = logits.softmax(-1)[0]  # [0.087, 0.644, 0.237, 0.032]
    assert probs[1] < 0.7
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[False, True, True, False]]  # the token crossing p is kept
    assert (~torch.isinf(filter_logits(logits, top_p=1e-6))).sum() == 1
    assert sample_token(logits, greedy=True).item() == 1


def test_training_mode_drops_classes_and_trains(tiny):
    model = GPT.from_config("GPT-tiny", seed=0, vocab_size=1024, class_dropout=1.0).train()
    labels = torch.tensor([1, 2])
    codes = torch.randint(0, 1024, (2, 256))
    null_only = model.cls_embedding(labels)
    assert torch.equal(null_only, model.cls_embedding.embedding_table.weight[[1000, 1000]])
    loss = torch.nn.functional.cross_entropy(model(labels, codes).flatten(0, 1), codes.flatten())
    loss.backward()
    assert model.tok_embeddings.weight.grad is not None
    model.eval()
    assert torch.equal(model.cls_embedding(labels), model.cls_embedding.embedding_table.weight[[1, 2]])


def test_forward_rejects_too_many_codes(tiny):
    with pytest.raises(ValueError, match="at most 256"):
        tiny(torch.tensor([0]), torch.zeros(1, 257, dtype=torch.long))


@pytest.mark.parametrize("layout", ["module", "state_dict", "raw", "prefixed_with_extras"])
def test_checkpoint_layouts(tmp_path, layout):
    src = GPT.from_config("GPT-tiny", seed=4)
    sd = src.state_dict()
    obj = {
        "module": {"module": sd},
        "state_dict": {"state_dict": sd},
        "raw": sd,
        "prefixed_with_extras": {
            **{f"_orig_mod.{k}": v for k, v in sd.items()},
            "freqs_cis": torch.zeros(257, 4, 2),
            "layers.0.attention.kv_cache.k_cache": torch.zeros(1),
        },
    }[layout]
    torch.save(obj, tmp_path / "g.pt")
    loaded = GPT.from_pretrained(str(tmp_path / "g.pt"), size="GPT-tiny")
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_size_mismatch_names_the_likely_size(tmp_path):
    torch.save({"ema": GPT.from_config("GPT-tiny").state_dict()}, tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="looks like GPT-tiny"):
        GPT.from_pretrained(str(tmp_path / "g.pt"), size="GPT-B")


def test_registry_and_validation():
    assert set(SPEC_PARAMS) | {"GPT-tiny"} == set(GPT_CONFIGS)
    assert gpt_config("GPT-3B").head_dim == 100 and gpt_config("GPT-2B").head_dim == 60
    with pytest.raises(KeyError, match="unknown GPT size"):
        gpt_config("GPT-Z")
    with pytest.raises(ValueError, match="square"):
        gpt_config("GPT-tiny", block_size=200)


def test_bf16_cast_keeps_rope_fp32_and_logits_close():
    model = _randomised(GPT.from_config("GPT-tiny", seed=0, vocab_size=1024))
    labels, codes = torch.tensor([1, 2]), torch.randint(0, 1024, (2, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(labels, codes)
        model.to(torch.bfloat16)
        assert model.rope.dtype == torch.float32 and model.tok_embeddings.weight.dtype == torch.bfloat16
        torch.testing.assert_close(model.rope, rope_2d_table(16, 16, 10000.0))
        low = model(labels, codes)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()
    out = generate(model, labels, greedy=True)  # the cache takes the weights' dtype
    assert out.shape == (2, 256)


@pytest.mark.slow
def test_compiled_decode_matches_eager():
    from vfmtok_core.generate import compiled_decode

    model = _randomised(GPT.from_config("GPT-tiny", seed=0, vocab_size=1024))
    labels = torch.tensor([1, 2])
    eager = generate(model, labels, cfg_scale=2.0, greedy=True)
    assert torch.equal(generate(model, labels, cfg_scale=2.0, greedy=True, decode_fn=compiled_decode(model)), eager)


def test_activation_checkpointing_gives_the_same_gradients_dropout_included():
    import torch

    from vfmtok_core.gpt import GPT

    grads = []
    for checkpointing in (False, True):
        model = GPT.from_config("GPT-tiny", seed=3, vocab_size=64).train()  # dropout 0.1 everywhere
        model.activation_checkpointing = checkpointing
        torch.manual_seed(7)
        labels, codes = torch.randint(0, 1000, (4,)), torch.randint(0, 64, (4, 256))
        torch.nn.functional.cross_entropy(model(labels, codes).flatten(0, 1), codes.flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_ema_update_is_the_per_tensor_lerp():
    import torch

    from vfmtok_core.gpt import GPT
    from vfmtok_core.training import EMA

    model = GPT.from_config("GPT-tiny", seed=0, vocab_size=64)
    ema = EMA(model, 0.9)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    for n, p in model.named_parameters():
        assert torch.allclose(ema.params[n], expected[n] + 0.1 * (p - expected[n]), atol=1e-7)


def test_model_flops_per_token_by_formula():
    from vfmtok_core.gpt import GPT
    from vfmtok_core.training import model_flops_per_token

    model = GPT.from_config("GPT-B", vocab_size=16384)
    cfg = model.config
    per_layer = 4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_hidden  # wqkv + wo, w1 w3 w2
    weights = cfg.n_layer * per_layer + cfg.dim * cfg.vocab_size  # and the output head
    assert model_flops_per_token(model, 256) == 6 * weights + 12 * cfg.n_layer * cfg.dim * 256
