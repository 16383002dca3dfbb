"""The bytes a decode step must read (`bench.byte_floor.decode_weight_bytes`): the decoder and the LM head, an input
embedding only where it is the LM head too; and on a GPU the floor itself, those bytes and the mean KV cache held
over the copy bandwidth measured in the process."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.byte_floor import byte_floor, decode_weight_bytes
from prefixkv.cache import CacheStats


def _llama(tied: bool) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


@pytest.mark.parametrize("tied", [True, False])
def test_decode_weight_bytes_counts_the_decoder_and_the_lm_head(tied):
    model = _llama(tied)
    embedding = model.get_input_embeddings().weight.nbytes
    every = sum(p.nbytes for p in model.parameters())  # a tied weight is one parameter here
    assert decode_weight_bytes(model) == (every if tied else every - embedding)
    assert decode_weight_bytes(model) >= model.lm_head.weight.nbytes + model.model.layers[0].mlp.up_proj.weight.nbytes


@pytest.mark.gpu
def test_byte_floor_is_weights_and_the_mean_cache_over_the_measured_bandwidth():
    model = _llama(True).to("cuda")
    # Two layers: 10 prompt entries kept, 20 held after decoding, 64 bytes an entry -> a mean of 15 entries held.
    stats = CacheStats(prompt_length=40, kept=[10, 10], held=[20, 20], bytes=[20 * 64, 20 * 64],
                       capacity_bytes=[20 * 64, 20 * 64], evictions=[0, 0], reallocations=0)
    floor = byte_floor("cuda", model, stats)
    assert floor["copy_bandwidth_gbps"] > 10
    assert floor["decode_floor_bytes"] == decode_weight_bytes(model) + 2 * 15 * 64
    assert floor["decode_floor_s"] == pytest.approx(floor["decode_floor_bytes"] / (floor["copy_bandwidth_gbps"] * 1e9))
    assert torch.cuda.memory_allocated() < 1 << 30  # the 1 GiB copy buffers are freed
