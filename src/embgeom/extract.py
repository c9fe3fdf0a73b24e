"""One forward pass per batch gives the hidden states of every layer of every stack."""
from __future__ import annotations

import torch


def decoder_inputs(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Teacher forcing: the decoder reads the document shifted right by one token."""
    cfg = model.config
    start = getattr(cfg, "decoder_start_token_id", None)
    if start is None:
        start = getattr(cfg, "pad_token_id", None) or 0
    shifted = input_ids.new_empty(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1]
    shifted[:, 0] = start
    return shifted


def forward_hidden(model, input_ids, attention_mask, is_encoder_decoder: bool, single_stack: str = "main"):
    """Run the model once and return {stack: tuple of (B, T, d) hidden states}.

    Layer 0 is the embedding output, layer l the output of block l, in the order of
    Hugging Face `output_hidden_states`. Encoder-decoder models give two stacks; the
    decoder is teacher-forced on the same tokens (shifted right) with the same mask.
    """
    if is_encoder_decoder:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_inputs(model, input_ids),
            decoder_attention_mask=attention_mask,
            output_hidden_states=True,
            use_cache=False,
        )
        return {"encoder": out.encoder_hidden_states, "decoder": out.decoder_hidden_states}
    kwargs = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)
    return {single_stack: out.hidden_states}
