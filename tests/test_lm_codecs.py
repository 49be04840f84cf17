"""Sparse codecs of a causal LM's next-token distributions, on a tiny random GPT-2."""
from __future__ import annotations

import numpy as np
import pytest

from kd.lm.codecs import (CodecSpec, cross_entropy_estimate, encode_sampled, encode_topk, fidelity, id_dtype,
                          log_softmax, rebuild_topk, row_rng, sampled_weights, topk_probs)

VOCAB = 300


@pytest.fixture(scope="module")
def teacher_logits() -> np.ndarray:
    """[positions, vocab] logits of a tiny random GPT-2 whose embedding has 4 padded rows."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB + 4, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    # A sharper, more LM-like distribution than the random init gives.
    with torch.no_grad():
        model.lm_head.weight.mul_(15)
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        return model(input_ids=ids).logits.flatten(0, 1).numpy()


def test_id_dtype_is_the_narrowest_that_holds_the_vocab():
    assert id_dtype(256) == np.uint8 and id_dtype(257) == np.uint16
    assert id_dtype(65536) == np.uint16 and id_dtype(65537) == np.uint32


def test_topk_kept_ids_match_the_teacher_and_the_tail_mass_is_exact(teacher_logits):
    spec = CodecSpec(mode="topk", vocab_size=VOCAB, k=8)
    enc = encode_topk(teacher_logits, spec)
    assert enc["ids"].dtype == np.uint16 and enc["logprobs"].dtype == np.float16
    logp, lse = log_softmax(teacher_logits[:, :VOCAB])  # padded rows never count
    p = np.exp(logp)
    ids = enc["ids"].astype(np.int64)
    assert ids.max() < VOCAB
    np.testing.assert_array_equal(ids, np.argsort(-p, axis=-1, kind="stable")[:, :8])
    kept, tail = topk_probs(enc["logprobs"], VOCAB)
    np.testing.assert_allclose(kept, np.take_along_axis(p, ids, -1), rtol=2e-3, atol=1e-6)
    true_tail = 1 - np.take_along_axis(p, ids, -1).sum(-1)
    np.testing.assert_allclose(tail, true_tail, atol=5e-3)
    # The log-normaliser brings back the raw logits of the kept ids.
    raw = enc["logprobs"].astype(np.float64) + enc["log_normalizer"][:, None]
    np.testing.assert_allclose(raw, np.take_along_axis(teacher_logits, ids, -1), atol=0.05)
    np.testing.assert_allclose(enc["log_normalizer"], lse, rtol=1e-6)


def test_topk_at_another_temperature_scales_the_kept_ids_exactly(teacher_logits):
    spec = CodecSpec(mode="topk", vocab_size=VOCAB, k=64, value_dtype="float32")
    enc = encode_topk(teacher_logits, spec)
    kept, tail = topk_probs(enc["logprobs"], VOCAB, temperature=2.0)
    logp_t, _ = log_softmax(teacher_logits[:, :VOCAB] / 2.0)
    truth = np.take_along_axis(np.exp(logp_t), enc["ids"].astype(np.int64), -1)
    # Ratios among kept ids are exact at any temperature; the total is exact up to the tail model.
    np.testing.assert_allclose(kept / kept[:, :1], truth / truth[:, :1], rtol=1e-5)
    np.testing.assert_allclose(kept.sum(-1) + tail, 1.0, rtol=1e-9)
    np.testing.assert_allclose(tail, 1 - truth.sum(-1), atol=0.05)


def test_rebuilt_topk_is_a_distribution_closer_with_larger_k(teacher_logits):
    kls = []
    for k in (8, 64):
        spec = CodecSpec(mode="topk", vocab_size=VOCAB, k=k)
        full = rebuild_topk(encode_topk(teacher_logits, spec), VOCAB)
        np.testing.assert_allclose(full.sum(-1), 1.0, atol=1e-3)
        kls.append(fidelity(teacher_logits, spec)["kl"])
    assert 0 <= kls[1] < kls[0]
    assert CodecSpec(mode="topk", vocab_size=VOCAB, k=8).payload_bytes() == 8 * 4 + 4


def test_sampled_draws_are_seeded_per_row(teacher_logits):
    spec = CodecSpec(mode="sampled", vocab_size=VOCAB, k=12, store_logprobs=True)
    a = encode_sampled(teacher_logits, spec, row_rng(0, "doc-1"))
    b = encode_sampled(teacher_logits, spec, row_rng(0, "doc-1"))
    c = encode_sampled(teacher_logits, spec, row_rng(0, "doc-2"))
    assert all(np.array_equal(x, y) for x, y in zip(a["ids"], b["ids"]))
    assert not all(np.array_equal(x, y) for x, y in zip(a["ids"], c["ids"]))
    assert all(int(n.sum()) == 12 and n.dtype == np.uint8 for n in a["counts"])
    assert all(i.dtype == np.uint16 and i.max() < VOCAB for i in a["ids"])
    logp, _ = log_softmax(teacher_logits[:, :VOCAB])
    for p, (ids, lp) in enumerate(zip(a["ids"], a["logprobs"])):
        np.testing.assert_allclose(lp, logp[p, ids.astype(np.int64)], atol=2e-2)


def test_sampled_estimator_mean_converges_to_the_full_cross_entropy_and_kl(teacher_logits):
    import torch

    spec = CodecSpec(mode="sampled", vocab_size=VOCAB, k=12)
    logp, _ = log_softmax(teacher_logits[:, :VOCAB])
    p = np.exp(logp)
    torch.manual_seed(1)
    student_logp = torch.log_softmax(torch.randn(p.shape, dtype=torch.float64) * 2, -1).numpy()
    full_ce = -(p * student_logp).sum(-1)
    entropy = -(p * logp).sum(-1)
    draws = 3000
    estimates = np.zeros((draws, p.shape[0]))
    rng = np.random.default_rng(0)
    for d in range(draws):
        enc = encode_sampled(teacher_logits, spec, rng)
        estimates[d] = [cross_entropy_estimate(i, c, student_logp[pos]) for pos, (i, c) in
                        enumerate(zip(enc["ids"], enc["counts"]))]
    mean = estimates.mean(0)
    sem = estimates.std(0) / np.sqrt(draws)
    assert np.all(np.abs(mean - full_ce) < 5 * sem + 1e-3)
    # KL = CE - H(p): the same estimate less the teacher entropy converges to the full KL.
    full_kl = full_ce - entropy
    np.testing.assert_allclose((mean - entropy).mean(), full_kl.mean(), rtol=0.02)
    # One draw of 12 is not a good approximation (that is not its job) but its mean is.
    assert np.abs(estimates[0] - full_ce).mean() > np.abs(mean - full_ce).mean()


def test_sampled_weights_at_another_temperature_need_logprobs():
    counts = np.array([6, 4, 2], dtype=np.uint8)
    np.testing.assert_allclose(sampled_weights(counts), [0.5, 1 / 3, 1 / 6])
    with pytest.raises(ValueError, match="store_logprobs"):
        sampled_weights(counts, None, temperature=2.0)
    w = sampled_weights(counts, np.log(np.array([0.5, 0.3, 0.2])), temperature=2.0)
    assert w.sum() == pytest.approx(1.0) and w[2] > 1 / 6  # a higher T flattens towards rare ids


def test_sampled_fidelity_and_bytes_at_equal_budget(teacher_logits):
    sampled = fidelity(teacher_logits, CodecSpec(mode="sampled", vocab_size=VOCAB, k=12))
    assert sampled["payload_bytes_per_token"] <= 12 * 3
    assert np.isfinite(sampled["kl"]) and sampled["kl"] > 0
