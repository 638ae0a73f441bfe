"""Scoring forward passes in bf16 that stay close to fp32: fp32 residual stream and head, prepacked matmuls."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple

import torch

__all__ = ["each_row_at", "mixed_precision"]

# A shorter shared prefix is attended through the caller's cache: below it the two flash calls and their join cost
# more than the mask saves. 20 rotations of one user, the ways interleaved in one process, cache -> apart: the bundled
# sample's 137-token prefix 1.04 -> 1.08 s; MovieLens users' ~250 tokens 1.94 -> 1.98 s, ~480 tokens 2.59 -> 2.22 s,
# 1,213 tokens 3.96 -> 3.14 s.
_MIN_PREFIX_ATTENDED_APART = 320


def _cached_on(module: torch.nn.Module, attribute: str, make: Any,
               sources: tuple[torch.nn.Module, ...] | None = None) -> torch.Tensor:
    """A copy derived from the weights of `sources` (default: `module`), kept on `module` and made again when one
    of them is replaced or edited."""
    weights = [source.weight for source in (sources or (module,))]
    version = tuple((weight.data_ptr(), weight._version) for weight in weights)
    cached = getattr(module, attribute, None)
    if cached is None or cached[0] != version:
        cached = (version, make(*(weight.detach() for weight in weights)))
        setattr(module, attribute, cached)
    return cached[1]


def each_row_at(batch: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The index that picks one position per row of `batch` (rows first, then positions, one per row): in one place,
    because the last layer, its attention and the head each read the rows' last positions and must agree."""
    return torch.arange(batch.shape[0], device=batch.device), positions.to(batch.device)


def _fp32_projection(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    # bf16 logits are off by ~0.1 at magnitudes ~20, enough to move letter probabilities by 0.03; the last
    # position's projection in fp32 costs one matrix-vector product (12 seed prompts: 0.0170 -> 0.0098).
    weight = _cached_on(head, "_rerank_fp32_weight", lambda weight: weight.float())
    bias = None if head.bias is None else head.bias.float()
    return torch.nn.functional.linear(hidden.float(), weight, bias)


def _packed_projection(linear: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(hidden, _packed(linear), None, "none", [], "")


def _packed(linear: torch.nn.Linear) -> torch.Tensor:
    # oneDNN reorders a plain bf16 weight into its blocked (AMX/VNNI) layout on every call; reordered once,
    # the MLP's 576x1536 matmuls of a 250-token prompt ran 1.3-2x faster (single thread), bit for bit the same.
    return _cached_on(linear, "_rerank_packed_weight", torch.ops.mkldnn._reorder_linear_weight)


def _prepacked_matmuls_available(dtype: torch.dtype) -> bool:
    return (dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextmanager
def _forward_replaced(module: torch.nn.Module, forward: Any) -> Iterator[None]:
    """`module` computes `forward` instead of its own until the block ends (an instance attribute, then deleted).

    A module of a split model already has accelerate's forward (moving inputs, loading offloaded weights), which
    calls the module's own as `_old_forward`: that one is replaced instead, so accelerate's part still runs.
    """
    if not _replaceable(module) and hasattr(module, "_old_forward"):
        original = module._old_forward
        module._old_forward = forward
        try:
            yield
        finally:
            module._old_forward = original
        return
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


def _pre_norm_layers(model: Any) -> list[torch.nn.Module]:
    return [module for module in model.modules()
            if isinstance(getattr(module, "input_layernorm", None), torch.nn.Module)
            and isinstance(getattr(module, "post_attention_layernorm", None), torch.nn.Module)]


@contextmanager
def _fp32_residual(layer: torch.nn.Module) -> Iterator[None]:
    """Keep the residual stream through a pre-norm decoder layer in fp32 while its matmuls stay in bf16.

    A bf16 residual stream is rounded after each of the 2 x 30 additions; the letter logits (~30) drift by
    ~0.1 that way. Cast to fp32 at each layer's entrance (a no-op after the first), the additions run in fp32
    and each norm's output is rounded to bf16 once, for the projections that follow.
    """
    handle = layer.register_forward_pre_hook(lambda module, args: (args[0].float(), *args[1:]) if args else None)
    try:
        yield
    finally:
        handle.remove()


def _llama_layer(layer: torch.nn.Module, read_positions: torch.Tensor | None, hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                 cache: Any = None, use_cache: bool = False, position_embeddings: Any = None,
                 **kwargs: Any) -> torch.Tensor:
    """Llama's decoder layer on the fp32 residual stream (see `_fp32_residual`), its two additions made in place:
    the stream is this pass's own (the embeddings' fp32 copy, then each layer's output), read by nothing else.

    With `read_positions` (the last layer, whose output is read at one position a row) every position still gives
    keys and values, but only those positions' queries attend and only their rows go through the MLP: a thirtieth
    of the attention and MLP work of SmolLM's pass, whose other positions the head never reads (6 MovieLens-length
    prompts, 5 interleaved rounds: 2.00 -> 1.92 s, the same scores bit for bit).
    """
    residual = hidden_states.float()
    attended, _ = layer.self_attn(hidden_states=layer.input_layernorm(residual), attention_mask=attention_mask,
                                  position_ids=position_ids, cache=cache, use_cache=use_cache,
                                  position_embeddings=position_embeddings,
                                  **kwargs if read_positions is None else {**kwargs, "query_positions": read_positions})
    if read_positions is None:
        hidden = residual.add_(attended)
        return hidden.add_(layer.mlp(layer.post_attention_layernorm(hidden)))
    read = each_row_at(residual, read_positions)
    hidden = residual[read].unsqueeze(1) + attended
    hidden.add_(layer.mlp(layer.post_attention_layernorm(hidden)))
    residual[read] = hidden.squeeze(1)
    return residual


class _LlamaCode(NamedTuple):
    """The code of Llama's modules that the fast path recognises (Qwen2, Mistral, SmolLM... copy them verbatim)."""

    mlp: tuple[Any, ...]
    silu_types: tuple[type, ...]  # the activations Llama's MLP may hold
    attention: tuple[Any, ...]  # SmolLM and Llama 3 use it as is
    norm: tuple[Any, ...]
    rotary: tuple[Any, ...]  # cos and sin whose two halves repeat one set of angles
    decoder_layer: tuple[Any, ...]


@functools.cache
def _llama_code() -> _LlamaCode:
    """Llama's code, read once."""
    # Imported here: only a bf16 forward pass on CPU needs them, and transformers' modeling code takes a while.
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import (
        LlamaAttention,
        LlamaDecoderLayer,
        LlamaMLP,
        LlamaRMSNorm,
        LlamaRotaryEmbedding,
    )
    return _LlamaCode(_code_of(LlamaMLP), (torch.nn.SiLU, SiLUActivation), _code_of(LlamaAttention),
                      _code_of(LlamaRMSNorm), _code_of(LlamaRotaryEmbedding), _code_of(LlamaDecoderLayer))


def _code_of(cls: type) -> tuple[Any, ...]:
    # Unwrapped: a decorator's wrapper (transformers' deprecate_kwarg) has the same code in every class it wraps.
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    return () if code is None else (code.co_code, code.co_names, code.co_consts)


def _fused_mlp(mlp: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    # down(silu(gate(x)) * up(x)) with SiLU and the product done by oneDNN on the matmuls' fp32 results:
    # two fewer passes over the widest activations, and one rounding to bf16 less (a 250-token block: -13%).
    gate = torch.ops.mkldnn._linear_pointwise(hidden, _packed(mlp.gate_proj), None, "swish", [], "")
    product = torch.ops.mkldnn._linear_pointwise.binary(hidden, gate, _packed(mlp.up_proj), None, "mul")
    return torch.ops.mkldnn._linear_pointwise(product, _packed(mlp.down_proj), None, "none", [], "")


def _llama_attention(attention: torch.nn.Module, hidden_states: torch.Tensor,
                     position_embeddings: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor | None = None,
                     cache: Any = None, *, query_positions: torch.Tensor | None = None,
                     prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Llama's attention block with queries, keys and values from one matmul, rotated in fp32, attended in bf16.

    Rotary runs on fp32 copies with fp32 angles and rounds once; attention itself runs on bf16 queries, keys and
    values. On a CPU with AMX, PyTorch's causal attention is 2.7x faster in bf16 than in fp32 at 1,500 tokens
    (30 prompts of ~306 tokens: 3.65 -> 2.75 s), and on those prompts the largest letter-probability gap to fp32
    was 0.0093-0.0100 in batches of 8, against 0.0124 with fp32 attention: rounding the weights to bf16 alone
    gives 0.0059, and past that floor the gap moves with every rounding and batch shape. With the complex rotary
    and the three-pass norm it reads 0.0104 at batch 1 and 0.0130 at batch 8, while the letter logits' RMS error
    stays 0.026-0.027: the largest gap is a draw of the rounding (README, Benchmarks).
    The query and key weights are stored with each head's rotary pairs side by side (`_pairs_adjacent`), so
    queries and keys come out in that order: their dot products, and so attention, are the same.
    With `query_positions` (one per row, rows right-padded), keys and values still come from every position (the
    cache keeps them) but only the query at that position attends: the output is [batch, 1, width].
    With `prefix` (the keys and values, batch 1, of a prefix every row continues; positions count past it), the
    rows attend to it and to themselves without a cache (`_attention_after_prefix`).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    shape = (*hidden_states.shape[:-1], -1, attention.head_dim)
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    stacked = _cached_on(attention, "_rerank_packed_qkv",
                         lambda query, key, value: torch.ops.mkldnn._reorder_linear_weight(torch.cat(
                             (_pairs_adjacent(query, attention.head_dim), _pairs_adjacent(key, attention.head_dim),
                              value))),
                         projections)
    fused = torch.ops.mkldnn._linear_pointwise(hidden_states, stacked, None, "none", [], "")
    rotated = _rotated(fused[..., :attention.q_proj.out_features + attention.k_proj.out_features].view(shape),
                       *position_embeddings)
    heads = attention.q_proj.out_features // attention.head_dim
    query, key = rotated[..., :heads, :].transpose(1, 2), rotated[..., heads:, :].transpose(1, 2)
    value = fused[..., -attention.v_proj.out_features:].view(shape).transpose(1, 2)
    if cache is not None:
        key, value = cache.update(key, value, attention.layer_idx, kwargs=kwargs)
    if prefix is not None and query_positions is None:
        output = _attention_after_prefix(attention, query, key, value, prefix)
    elif query_positions is None:
        output, _ = sdpa_attention_forward(attention, query, key, value, attention_mask, dropout=0.0,
                                           scaling=attention.scaling, **kwargs)
    else:
        if prefix is not None:  # one layer: the prefix joins each row's keys and values
            key, value = (torch.cat((shared.expand(query.shape[0], -1, -1, -1), own), dim=2)
                          for shared, own in zip(prefix, (key, value)))
        output = _attention_at(attention, query, key, value, query_positions)
    return _packed_projection(attention.o_proj, output.flatten(-2).contiguous()), None


def _attention_at(attention: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """Each row's query at its position (after any cached ones) attending to the keys up to it: [batch, 1, heads,
    dim]. Rows are right-padded, so every key up to that position is a real token."""
    rows, positions = each_row_at(query, positions)
    cached = key.shape[2] - query.shape[2]
    visible = torch.arange(key.shape[2], device=key.device) <= (cached + positions).unsqueeze(1)
    output = torch.nn.functional.scaled_dot_product_attention(
        query[rows, :, positions].unsqueeze(2), key, value, attn_mask=visible[:, None, None, :],
        scale=attention.scaling, enable_gqa=True)
    return output.transpose(1, 2)


def _attention_after_prefix(attention: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            prefix: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rows that continue one shared prefix, attending to it and causally to themselves: [batch, length, heads, dim].

    Attended through a cache, the rows' queries see the prefix's keys and their own only past an explicit mask,
    which PyTorch's CPU flash kernel runs ~1.7x slower than its causal path, and the cache copies the prefix into
    every row of every layer. Here each part runs unmasked: the whole prefix (every row reads the same copy), then
    the rows' own keys causally (right-padded rows: a real token never sees the pads after it); the two softmaxes
    are joined by their log-sum-exps, which the private flash op returns and the public one does not. 20 rotations
    of a 1,524-token MovieLens prompt sharing 1,213 tokens: 4.33 -> 3.23 s (bench_diagnostics, README).
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    rows = query.shape[0]
    shared_keys, shared_values = (part.expand(rows, -1, -1, -1) for part in prefix)
    on_prefix, prefix_lse = flash(query, shared_keys, shared_values, 0.0, False, scale=attention.scaling)[:2]
    on_own, own_lse = flash(query, key, value, 0.0, True, scale=attention.scaling)[:2]
    # softmax over both parts = the prefix's share sigmoid(lse_prefix - lse_own) of one and the rest of the other
    prefix_share = torch.sigmoid(prefix_lse - own_lse).unsqueeze(-1)
    return torch.lerp(on_own.float(), on_prefix.float(), prefix_share).to(query.dtype).transpose(1, 2)


def _pairs_adjacent(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A query or key weight whose rows give, in each head, the dimensions Llama's rotary turns together (i and
    i + head_dim / 2) side by side: 0, 32, 1, 33, ... for 64-wide heads."""
    return weight.unflatten(0, (-1, 2, head_dim // 2)).transpose(1, 2).flatten(0, 2)


def _rotated(pairs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary of bf16 heads [batch, length, heads, dim] whose rotary pairs sit side by side, in fp32,
    rounded once into a new bf16 tensor.

    Each pair (x, y) turned by an angle a is (x cos a - y sin a, y cos a + x sin a): the complex product
    (x + iy)(cos a + i sin a). Llama's cos and sin repeat the angles in their two halves, so the first half is
    all of them. One product of contiguous complex numbers instead of four strided, mixed-dtype passes: 3.1 -> 1.4 ms
    a layer at 3 x 1,216 tokens timed alone, and whole passes of that size 7% faster (README, Benchmarks).
    """
    half = pairs.shape[-1] // 2
    turns = torch.complex(cos[..., :half], sin[..., :half]).unsqueeze(-2)  # one angle per position, every head
    values = torch.view_as_complex(pairs.to(torch.float32, memory_format=torch.contiguous_format)
                                   .unflatten(-1, (half, 2)))
    return torch.view_as_real(values * turns).flatten(-2).to(pairs.dtype)


def _rms_norm(norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    # Llama's RMSNorm of the fp32 residual stream, rounded to bf16 for the projections, in three passes: the mean
    # square from one reduction, then the scaling and the product with an fp32 copy of the weight, which writes
    # bf16. torch.rms_norm runs six on CPU (square, mean, + epsilon, reciprocal root, two products) and the cast a
    # seventh; three passes made whole 3 x 1,216-token forward passes 5% faster (8 interleaved rounds in one
    # process).
    weight = _cached_on(norm, "_rerank_fp32_weight", lambda weight: weight.float())
    hidden = hidden.float()
    inverse_rms = (torch.linalg.vector_norm(hidden, dim=-1, keepdim=True).square_().div_(hidden.shape[-1])
                   .add_(norm.variance_epsilon).rsqrt_())
    rounded = torch.empty(hidden.shape, dtype=norm.weight.dtype, device=hidden.device)
    return torch.mul(hidden * inverse_rms, weight, out=rounded)


def _fp32_attention_input(linear: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    # Attention code other than Llama's: queries, keys and values leave their bf16 matmul in fp32, so rotary and
    # attention run in fp32 (on 12 seed prompts the largest letter-probability gap to fp32 fell from 0.0142 to
    # 0.0080), at attention's fp32 speed.
    return _packed_projection(linear, hidden).float()


def _attention_output(linear: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    return _packed_projection(linear, hidden.to(linear.weight.dtype))


_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _attention_projections(model: Any, dtype: torch.dtype,
                           rotaries: list[torch.nn.Module]) -> dict[torch.nn.Module, Any]:
    """Attention blocks whose q/k/v/o projections are all plain Linears, and their projections, with what each
    computes: Llama's attention runs as `_llama_attention`, other code gets fp32 queries, keys and values.

    All four or none: a LoRA-wrapped value projection left in bf16 beside fp32 queries would not multiply.
    """
    code = _llama_code()
    # The fast block rotates with the angles' first half only: Llama's own rotary repeats them in the second.
    llama_rotary = all(_code_of(type(rotary)) == code.rotary for rotary in rotaries)
    replaced: dict[torch.nn.Module, Any] = {}
    for module in model.modules():
        projections = [getattr(module, name, None) for name in _ATTENTION_PROJECTIONS]
        if not all(_plain_linear(projection, dtype) for projection in projections):
            continue
        if (llama_rotary and _code_of(type(module)) == code.attention and _replaceable(module)
                and getattr(module.config, "_attn_implementation", None) == "sdpa"):
            replaced[module] = functools.partial(_llama_attention, module)
        else:
            *inputs, output = projections
            replaced.update({projection: functools.partial(_fp32_attention_input, projection)
                             for projection in inputs})
            replaced[output] = functools.partial(_attention_output, output)
    return replaced


def _rotary_embeddings(model: Any) -> list[torch.nn.Module]:
    """Rotary embedding modules (they hold `inv_freq` and compute cos/sin for every position)."""
    return [module for module in model.modules()
            if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and _replaceable(module)]


def _fp32_rotary_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    # cos/sin are computed in fp32, then cast to the dtype of the tensor passed in: with the bf16 embeddings they
    # keep 3 significant digits, and the fp32 queries and keys are rotated by rounded angles. Only the dtype and
    # device of that tensor are read, so an empty fp32 tensor stands in for it.
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    return (args[0].new_empty((0,), dtype=torch.float32), *args[1:])


def _replaceable(module: torch.nn.Module) -> bool:
    # "forward" already set on the instance: someone else (accelerate's hooks) replaced it first.
    return "forward" not in vars(module)


def _plain_linear(module: Any, dtype: torch.dtype) -> bool:
    return (type(module) is torch.nn.Linear and module.bias is None and module.weight.dtype == dtype
            and _replaceable(module))


@contextmanager
def mixed_precision(model: Any, read_positions: torch.Tensor | None = None,
                    prefix: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Iterator[bool]:
    """Inside the block, a bf16 model with a plain Linear head scores closer to fp32, and faster on CPU.

    The head projects in fp32 (from an fp32 copy of its weight) and the residual stream stays in fp32 (Llama's
    norms read it in one op and hand bf16 to the projections). On a
    CPU with bf16 oneDNN, plain bf16 Linears without bias multiply by a weight reordered once, Llama's
    MLP (recognised by its code) runs fused, and so does Llama's attention (rotary in fp32, attention in bf16);
    other attention code runs on fp32 queries, keys and values. A LoRA-wrapped or quantized head computes more
    than weight @ x: such models, and fp32 ones, run unchanged; LoRA-wrapped projections keep their own forward
    (and their attention block stays in bf16).
    `read_positions` (one per row, rows right-padded) says where the caller reads the output: Llama's last layer,
    on that fast path, then computes past its keys and values only there, and other positions of the output hold
    the layer's input.
    `prefix` (each layer's keys and values, batch 1, of a prefix every row continues) is attended by Llama's fast
    attention in every layer, without a cache, when every layer has it and the prefix is long enough
    (_MIN_PREFIX_ATTENDED_APART): the block yields whether it does. When it yields False the caller passes the prefix
    in a cache as usual.
    """
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.weight.dtype == torch.float32:
        yield False
        return
    dtype = head.weight.dtype
    with ExitStack() as stack:
        stack.enter_context(_forward_replaced(head, functools.partial(_fp32_projection, head)))
        code = _llama_code()
        attention: dict[torch.nn.Module, Any] = {}
        layers = _pre_norm_layers(model)
        attends_prefix = False
        if head.weight.device.type == "cpu" and _prepacked_matmuls_available(dtype):
            rotaries = _rotary_embeddings(model)
            attention = _attention_projections(model, dtype, rotaries)
            attends_prefix = (prefix is not None and prefix[0][0].shape[-2] >= _MIN_PREFIX_ATTENDED_APART
                              and _fast_attention_everywhere(attention, layers, len(prefix)))
            if attends_prefix:
                for module in [layer.self_attn for layer in layers]:
                    attention[module] = functools.partial(_llama_attention, module, prefix=prefix[module.layer_idx])
            if attention:  # rotary then rotates fp32 queries and keys: give it fp32 angles too
                for rotary in rotaries:
                    stack.callback(rotary.register_forward_pre_hook(_fp32_rotary_input).remove)
            for module in model.modules():
                if module in attention:
                    stack.enter_context(_forward_replaced(module, attention[module]))
                elif _plain_linear(module, dtype) and module is not head:
                    stack.enter_context(_forward_replaced(module, functools.partial(_packed_projection, module)))
                elif (_code_of(type(module)) == code.mlp and isinstance(module.act_fn, code.silu_types)
                      and _replaceable(module)
                      and all(_plain_linear(getattr(module, name), dtype)
                              for name in ("gate_proj", "up_proj", "down_proj"))):
                    stack.enter_context(_forward_replaced(module, functools.partial(_fused_mlp, module)))
        for layer in layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if _code_of(type(norm)) == code.norm and _replaceable(norm):
                    stack.enter_context(_forward_replaced(norm, functools.partial(_rms_norm, norm)))
                else:
                    stack.callback(norm.register_forward_hook(lambda module, inputs, output: output.to(dtype)).remove)
            if _attends_fast(attention, layer) and _code_of(type(layer)) == code.decoder_layer and _replaceable(layer):
                reads = read_positions if layer is layers[-1] else None
                stack.enter_context(_forward_replaced(layer, functools.partial(_llama_layer, layer, reads)))
            else:
                stack.enter_context(_fp32_residual(layer))
        yield attends_prefix


def _attends_fast(attention: dict[torch.nn.Module, Any], layer: torch.nn.Module) -> bool:
    """The layer's attention block runs as `_llama_attention` (`attention`: what each replaced block computes)."""
    return getattr(attention.get(getattr(layer, "self_attn", None)), "func", None) is _llama_attention


def _fast_attention_everywhere(attention: dict[torch.nn.Module, Any], layers: list[torch.nn.Module],
                               prefix_layers: int) -> bool:
    """Every decoder layer attends with `_llama_attention`, one prefix layer each (and the flash op is there)."""
    return (bool(layers) and len(layers) == prefix_layers
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
            and all(_attends_fast(attention, layer) and getattr(layer.self_attn, "layer_idx", None) == index
                    for index, layer in enumerate(layers)))
