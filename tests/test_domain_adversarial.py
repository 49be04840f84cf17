"""Adversarial feature adaptation in the train stage (Xu & Yang 2017; `domain_adversarial`):
the reversed gradient, the reversal schedule, plan-time checks, and a student whose features on
its training text and on unlabeled target-domain text become indistinguishable (no Ray)."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from kd.domain_adversarial import DomainAdversary, FeatureTap, feature_layer, ganin_lambda
from pipeline.testing import make_artifact, make_context
from stages.train import TrainStage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POS = ["a warm funny film", "the cast is terrific", "an absolute joy", "smart and beautiful"]
NEG = ["a dull mess", "the plot makes no sense", "painfully boring", "the worst acting"]
# Another domain: captions, none of the reviews' words.
TARGET = ["two dogs run on grass", "people walk down a street", "a child holds red balloons",
          "men ride bicycles near water", "birds fly over boats", "kids climb rocks outside"]
LABEL_MD = {"kdpipe.task": "classification", "kdpipe.label_names": '["neg", "pos"]',
            "kdpipe.logit_columns": '["logits"]'}


def test_the_reversal_schedule_follows_ganin():
    assert ganin_lambda(0.0) == 0.0
    assert ganin_lambda(0.5) == pytest.approx(2 / (1 + torch.exp(torch.tensor(-5.0)).item()) - 1)
    assert ganin_lambda(1.0) == pytest.approx(0.99991, abs=1e-5)
    assert ganin_lambda(2.0) == ganin_lambda(1.0) and ganin_lambda(-1.0) == 0.0
    values = [ganin_lambda(p / 10) for p in range(11)]
    assert values == sorted(values)


def test_the_features_get_the_discriminators_gradient_reversed_and_scaled():
    """One backward pass: the discriminator's weights descend the domain loss at full strength;
    the features receive -weight x lambda x the gradient that would descend it."""
    from kd.adversarial import discriminator_loss

    torch.manual_seed(0)
    adversary = DomainAdversary(feature_dim=4, hidden_dim=8, weight=0.5, schedule="constant")
    source = torch.randn(6, 4, requires_grad=True)
    target = torch.randn(6, 4, requires_grad=True)
    loss, parts = adversary(source, target, progress=0.3)
    with torch.no_grad():  # the share of the 12 rows the discriminator puts on the right side
        disc = adversary.discriminator
        right = int((disc(source) > 0).sum()) + int((disc(target) <= 0).sum())
    assert parts["discriminator_accuracy"] == right / 12
    loss.backward()
    reversed_grads = (source.grad.clone(), target.grad.clone())
    disc_grads = [p.grad.clone() for p in adversary.discriminator.parameters()]

    # The same loss without reversal: what plain descent would send to the features.
    s, t = source.detach().requires_grad_(), target.detach().requires_grad_()
    adversary.zero_grad()
    discriminator_loss(adversary.discriminator, s, t).backward()
    assert torch.allclose(reversed_grads[0], -0.5 * s.grad) and torch.allclose(reversed_grads[1], -0.5 * t.grad)
    assert all(torch.allclose(a, p.grad) for a, p in zip(disc_grads, adversary.discriminator.parameters()))
    assert parts["reversal"] == 0.5 and parts["domain_loss"] == pytest.approx(loss.item())

    adversary.schedule = "ganin"
    source.grad = None
    adversary(source, target, progress=0.0)[0].backward()
    assert torch.count_nonzero(source.grad) == 0  # lambda(0) = 0: the student is left alone at first
    assert adversary.strength(1.0) == pytest.approx(0.5 * ganin_lambda(1.0))


@pytest.mark.parametrize("kind", ["bilstm", "cnn", "transformer"])
def test_every_student_type_exposes_its_features_at_the_output_layer(kind):
    from kd.students.common import WordVocab
    from stages.train import _student_module

    vocab = WordVocab.build(POS + NEG, max_size=100)
    meta = {"num_labels": 2, "pair": False, "max_length": 16,
            "hyperparameters": {"embedding_dim": 8, "hidden_dim": 8, "mlp_dim": 8, "num_filters": 4,
                                "filter_sizes": [2], "dropout": 0.0,
                                "hf_config": {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                                              "num_attention_heads": 2, "intermediate_size": 32,
                                              "max_position_embeddings": 32}}}
    module = _student_module(kind).create(meta=meta, tokenizer=vocab).eval()
    tap = FeatureTap(feature_layer(module))
    logits = module(**module.collate(module.tokenize_rows(POS[:3], None)))
    features = tap.take()
    assert features.shape == (3, module.feature_dim())
    assert not torch.allclose(features[0], features[1])  # one vector per sentence
    with pytest.raises(RuntimeError, match="did not run"):
        tap.take()  # taken once per forward pass
    tap.close()
    module(**module.collate(module.tokenize_rows(POS[:1], None)))
    assert tap.features is None and logits.shape == (3, 2)


def _arts(tmp_path):
    texts = [f"{t} {i}" for i in range(6) for t in POS + NEG]
    labels = [1 if (j % 8) < 4 else 0 for j in range(len(texts))]
    ids = [f"r{i:03d}" for i in range(len(texts))]
    data = make_artifact(tmp_path / "data", pa.table({"id": ids, "text": texts, "label": labels}),
                         rows_per_shard=16, metadata={"kdpipe.label_names": '["neg", "pos"]'})
    logits = [[-2.0, 2.0] if y else [2.0, -2.0] for y in labels]
    labels_art = make_artifact(tmp_path / "labels", pa.table({"id": ids, "logits": pa.array(logits, pa.list_(pa.float32(), 2))}),
                               rows_per_shard=16, metadata=LABEL_MD)
    target = [f"{t} {i}" for i in range(8) for t in TARGET]
    unlabeled = make_artifact(tmp_path / "unlabeled", pa.table({"id": [f"u{i:03d}" for i in range(len(target))],
                                                                 "caption": target}), rows_per_shard=20)
    return data, labels_art, unlabeled


def _config(**adversarial):
    return TrainStage.Config(student={"type": "bilstm", "embedding_dim": 16, "hidden_dim": 16, "mlp_dim": 16,
                                      "dropout": 0.0},
                             losses={"ce": 0.0, "mse": 1.0}, epochs=20, lr=3e-3, batch_size=8,
                             domain_adversarial={"column": "caption", "hidden_dim": 16, "lr": 3e-3, **adversarial})


def test_the_reversed_gradient_drives_the_discriminator_towards_chance(tmp_path):
    """Reviews (teacher logits) vs captions (unlabeled, no word in common). With weight 0 the
    discriminator only watches: it separates the domains perfectly and for good. With the reversed
    gradient the student's features on the two domains become alike: the discriminator falls to
    chance and stays well below the control (the minimax oscillates, as GRL training does), while
    the student fits the teacher as closely."""
    data, labels, unlabeled = _arts(tmp_path)
    runs = {}
    for name, weight in (("control", 0.0), ("adapted", 1.0)):
        ctx = make_context(tmp_path / name, inputs={"data": [data], "labels": [labels], "unlabeled": [unlabeled]})
        summary = TrainStage(config=_config(weight=weight)).run(ctx)
        metrics = json.loads((ctx.out_dir / "metrics.json").read_text())
        accuracy = [h["discriminator_accuracy"] for h in metrics["history"]]
        runs[name] = {"accuracy": accuracy, "late": sum(accuracy[10:]) / 10, "mse": metrics["history"][-1]["mse"]}
        assert summary["discriminator_accuracy_last"] == metrics["discriminator_accuracy_last"] == round(accuracy[-1], 4)
    control, adapted = runs["control"], runs["adapted"]
    assert control["late"] >= 0.95  # the second half of training
    assert adapted["accuracy"][2] >= 0.85  # the domains start apart (the reversal ramps up from 0)
    assert min(adapted["accuracy"]) <= 0.55 and adapted["late"] <= control["late"] - 0.2
    assert control["mse"] < 0.01 and adapted["mse"] < 0.01


def test_a_rerun_resumes_student_and_discriminator_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    data, labels, unlabeled = _arts(tmp_path)
    ctx = make_context(tmp_path / "run", inputs={"data": [data], "labels": [labels], "unlabeled": [unlabeled]})
    cfg = _config(weight=1.0).model_copy(update={"epochs": 3})
    first = TrainStage(config=cfg).run(ctx)
    weights = load_file(str(ctx.out_dir / "student" / "model.safetensors"))
    again = TrainStage(config=cfg).run(ctx)
    assert first["resumed_from_epoch"] is None and again["resumed_from_epoch"] == 3
    resumed = load_file(str(ctx.out_dir / "student" / "model.safetensors"))
    assert weights.keys() == resumed.keys() and all(torch.equal(weights[k], resumed[k]) for k in weights)
    assert again["discriminator_accuracy_last"] == first["discriminator_accuracy_last"]


def test_plan_time_problems_name_the_fix():
    def problems(cfg, cols):
        return [(p.loc, p.message) for p in TrainStage(config=cfg).validate(input_columns=cols)]

    base = {"data": [["id", "text", "label"]], "labels": [["id", "logits"]]}
    assert [loc for loc, _ in problems(_config(), base)] == ["inputs.unlabeled"]
    assert [loc for loc, _ in problems(_config(), {**base, "unlabeled": [["id", "text"]]})] == ["inputs.unlabeled"]
    assert "domain_adversarial.column" in problems(_config(), {**base, "unlabeled": [["id", "text"]]})[0][1]
    assert problems(_config(), {**base, "unlabeled": [["id", "caption"]]}) == []
    plain = TrainStage.Config(losses={"ce": 0.0, "mse": 1.0})
    assert [loc for loc, _ in problems(plain, {**base, "unlabeled": [["id", "text"]]})] == ["inputs.unlabeled"]
    paired = _config().model_copy(update={"student_pair_column": "text_pair"})
    assert "config.domain_adversarial" in [loc for loc, _ in problems(paired, {**base, "unlabeled": [["id", "caption"]]})]


def test_the_manifest_plans(tmp_path, sentiment_tsv):
    from pipeline.graph import build_graph
    from pipeline.manifest import load_manifest

    multi30k = tmp_path / "multi30k"
    multi30k.mkdir()
    (multi30k / "train.en").write_text("a dog runs .\na cat sleeps .\n", encoding="utf-8")
    repo = __import__("pathlib").Path(__file__).resolve().parent.parent
    graph = build_graph(load_manifest(repo / "manifests" / "domain-adversarial.yaml", overrides={
        "sst2_train": str(sentiment_tsv), "sst2_dev": str(sentiment_tsv), "multi30k": str(multi30k)}))
    adapted = graph.nodes["student_adapted"]
    assert adapted.inputs["unlabeled"] == ["sst2"] and adapted.stage.config.domain_adversarial.weight == 0.3
    assert graph.nodes["student_watch"].stage.config.domain_adversarial.weight == 0.0
