"""The MiniLM classification case: its generated data, and 4-bit loading that keeps the new head whole."""

from __future__ import annotations

from lorabench.kinds.classify import CONFIGS, HEAD, add_lora, load_classifier, model_path, review_sentiment


def _adjective(text: str, nouns_and_fillers: set[str]) -> str:
    words = text.rstrip(".!").replace(",", "").split()
    return next(w for w in words if w not in nouns_and_fillers)


def test_eval_sentences_use_adjectives_never_trained_on():
    from lorabench.kinds import classify

    train, eval_ = review_sentiment()
    fillers = set(classify._NOUNS) | {w for t in classify._TEMPLATES for w in t.replace(",", "").split()}
    train_adjectives = {_adjective(t, fillers) for t in train["text"]}
    eval_adjectives = {_adjective(t, fillers) for t in eval_["text"]}
    assert train_adjectives and eval_adjectives and not train_adjectives & eval_adjectives
    assert not set(train["text"]) & set(eval_["text"])
    for split in (train, eval_):
        share = sum(split["label"]) / len(split)
        assert 0.4 <= share <= 0.6  # balanced: chance is about 50%


def test_qlora_loads_the_encoder_in_4bit_but_not_the_new_head():
    import bitsandbytes as bnb
    import torch

    qlora = next(c for c in CONFIGS if c.quant == "nf4")
    model, _, _ = load_classifier(qlora, model_path())
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)
    head = getattr(model, HEAD)
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    adapted = add_lora(model, qlora)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(HEAD in n for n in trainable)
    assert not any("word_embeddings" in n for n in trainable)
