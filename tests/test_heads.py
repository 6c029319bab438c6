"""The body/head split reproduces the model's own logits, and refuses when it cannot."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from kdcache.cache.extraction.heads import body_of, resolve_head


def test_split_equals_model_forward(tiny_teacher_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 17))
    head = resolve_head(model, input_ids)
    assert head is not None
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        actual = head.logits(body_of(model)(input_ids=input_ids).last_hidden_state)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_postprocessed_logits_are_detected_or_refused(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (1, 9))
    original_forward = model.forward

    def capped_forward(*args, **kwargs):  # an architecture that post-processes its logits
        output = original_forward(*args, **kwargs)
        output.logits = torch.tanh(output.logits / 3.0) * 3.0
        return output

    model.forward = capped_forward
    assert resolve_head(model, input_ids) is None  # unknown post-processing: fall back
    model.config.final_logit_softcapping = 3.0  # known post-processing: handled exactly
    head = resolve_head(model, input_ids)
    assert head is not None and head.softcap == 3.0
