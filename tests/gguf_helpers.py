"""GGUF files written in the tests with the `gguf` package: a tiny Llama over SmolLM2's vocabulary, vocabulary-only
files and files of architectures transformers cannot load."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rerank_core.model_refs import embedded_gguf_file

HIDDEN, LAYERS, FEED_FORWARD, HEADS, KV_HEADS = 32, 2, 64, 4, 2


@functools.cache
def smol_tokenizer_fields() -> dict[str, Any]:
    """The embedded GGUF's tokenizer metadata (vocabulary, merges, template), read once per test session."""
    import gguf

    reader = gguf.GGUFReader(embedded_gguf_file())
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


def write_tiny_gguf(path: Path, *, seed: int = 0, architecture: str = "llama", vocab_only: bool = False) -> Path:
    """A two-layer Llama in F32 (or only its vocabulary) as llama.cpp lays it out."""
    import gguf

    fields = smol_tokenizer_fields()
    vocab = len(fields["tokenizer.ggml.tokens"])
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name(f"tiny-{seed}")
    writer.add_block_count(LAYERS)
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FEED_FORWARD)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"])
    writer.add_token_list(fields["tokenizer.ggml.tokens"])
    writer.add_token_types(fields["tokenizer.ggml.token_type"])
    writer.add_token_merges(fields["tokenizer.ggml.merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(fields["tokenizer.chat_template"])
    if not vocab_only:
        generator = torch.Generator().manual_seed(seed)

        def weight(*shape: int) -> np.ndarray:
            return (torch.randn(*shape, generator=generator) * 0.05).numpy().astype(np.float32)

        kv = HIDDEN // HEADS * KV_HEADS
        writer.add_tensor("token_embd.weight", weight(vocab, HIDDEN))
        for block in range(LAYERS):
            for name, shape in (("attn_q", (HIDDEN, HIDDEN)), ("attn_k", (kv, HIDDEN)), ("attn_v", (kv, HIDDEN)),
                                ("attn_output", (HIDDEN, HIDDEN)), ("ffn_gate", (FEED_FORWARD, HIDDEN)),
                                ("ffn_up", (FEED_FORWARD, HIDDEN)), ("ffn_down", (HIDDEN, FEED_FORWARD))):
                writer.add_tensor(f"blk.{block}.{name}.weight", weight(*shape))
            writer.add_tensor(f"blk.{block}.attn_norm.weight", np.ones(HIDDEN, np.float32))
            writer.add_tensor(f"blk.{block}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
