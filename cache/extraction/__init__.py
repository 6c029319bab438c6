"""The teacher's distribution at each position: output head, chunked top-k, tail samples.

``heads`` (``resolve_head``: the lm_head apart from the body, checked against the model's own
logits; also used by the student's chunked loss), ``topk`` and ``block_topk`` (exact top-k with
the float32 normaliser), ``tail_sampling`` (unbiased draws from the mass outside the top-k).
"""
