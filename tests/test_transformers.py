"""triflash as a transformers attention implementation, on tiny random models (no downloads).

fp32 throughout; logits and gradients are compared with an explicit fp32 tolerance of ``1e-4 * max|ref| + 1e-5``:
the attention itself agrees to ~1e-6 (fp32 eps 1.2e-7 times the few-step reductions of SPEC §6), and two
decoder layers plus the LM head amplify it by well under 100x.
"""

import pytest
import torch
import transformers  # pinned in requirements/cpu.txt: a missing install must fail, not skip

from triflash.integrations.transformers import register  # noqa: E402

NAME = register()


def _assert_close(name, out, ref):
    err = (out.double() - ref.double()).abs().max().item()
    bound = 1e-4 * ref.double().abs().max().item() + 1e-5
    assert err <= bound, f"{name}: max err {err:.3e} > {bound:.3e}"


def _llama(impl):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _build(transformers.LlamaForCausalLM, cfg, impl)


def _qwen3(impl):
    cfg = transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _build(transformers.Qwen3ForCausalLM, cfg, impl)


def _gemma2(impl):
    cfg = transformers.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=32, vocab_size=128, max_position_embeddings=128,
                                    sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                    query_pre_attn_scalar=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _build(transformers.Gemma2ForCausalLM, cfg, impl)


def _build(cls, cfg, impl):
    torch.manual_seed(0)
    model = cls(cfg).float().eval()
    model.set_attn_implementation(impl)
    return model


def _ids(b, s, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (b, s), generator=g)


def test_register_rejects_flash_names():
    with pytest.raises(ValueError, match="flash"):
        register("triflash_attention")
    assert "flash" not in NAME


@pytest.mark.parametrize("make,ref_impl", [(_llama, "sdpa"), (_qwen3, "sdpa"), (_gemma2, "eager")],
                         ids=["llama-gqa", "qwen3", "gemma2-softcap-window8"])
def test_logits_and_grads(make, ref_impl):
    ids = _ids(2, 16)
    grads = {}
    logits = {}
    for impl in (NAME, ref_impl):
        model = make(impl)
        out = model(ids, labels=ids)
        out.loss.backward()
        logits[impl] = out.logits.detach()
        layer = model.model.layers[0].self_attn
        grads[impl] = [p.grad for p in (layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight,
                                        model.model.embed_tokens.weight)]
    _assert_close("logits", logits[NAME], logits[ref_impl])
    for i, (g, r) in enumerate(zip(grads[NAME], grads[ref_impl])):
        _assert_close(f"grad{i}", g, r)


def test_left_padding_matches_per_sequence():
    lens = [16, 9]
    ids = _ids(2, 16)
    mask = torch.zeros(2, 16, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, 16 - n:] = 1
        ids[b, : 16 - n] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    model = _llama(NAME)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, position_ids=pos).logits
        ref = _llama("sdpa")(ids, attention_mask=mask, position_ids=pos).logits
        for b, n in enumerate(lens):
            single = model(ids[b:b + 1, 16 - n:]).logits[0]
            _assert_close(f"seq{b}", padded[b, 16 - n:], single)
            _assert_close(f"seq{b}-sdpa", padded[b, 16 - n:], ref[b, 16 - n:])


def test_generate_left_padded_matches_sdpa():
    ids = _ids(2, 8, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    outs = {}
    for impl in (NAME, "sdpa"):
        with torch.no_grad():
            outs[impl] = _llama(impl).generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                               pad_token_id=0)
    assert outs[NAME].shape == (2, 13)
    assert torch.equal(outs[NAME], outs["sdpa"])


def test_arbitrary_4d_mask_raises():
    model = _llama(NAME)
    ids = _ids(1, 8)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(1, 1, 8, 8, generator=g) > 0.5
    mask[..., 0] = True
    with pytest.raises(NotImplementedError, match="not a padding"):
        model(ids, attention_mask=mask)


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def _qkv(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 4, s, 16, generator=g)
    k, v = torch.randn(b, 2, s, 16, generator=g), torch.randn(b, 2, s, 16, generator=g)
    return q, k, v


def test_function_packed_masks_and_sinks():
    from triflash import attention_ref
    from triflash.integrations.transformers import triflash_attention_forward as fwd

    mod = _Module()
    q, k, v = _qkv(1, 12)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    packed, _ = fwd(mod, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)
    for lo, hi in ((0, 5), (5, 12)):
        single, _ = fwd(mod, q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], None)
        _assert_close(f"packed{lo}", packed[:, lo:hi], single)

    # right padding as a 2-D mask, a 4-D boolean mask and a 4-D additive mask: same result, padded rows zero
    q, k, v = _qkv(2, 10, seed=1)
    pad = torch.ones(2, 10, dtype=torch.bool)
    pad[1, 6:] = False
    m4 = torch.ones(10, 10, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :] & pad[:, None, :, None]
    additive = torch.zeros(m4.shape).masked_fill(~m4, torch.finfo(torch.float32).min)
    outs = [fwd(mod, q, k, v, m)[0] for m in (pad, m4, additive)]
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])
    assert (outs[0][1, 6:] == 0).all()
    ref, _ = attention_ref(q[1:, :, :6].transpose(1, 2), k[1:, :, :6].transpose(1, 2), v[1:, :, :6].transpose(1, 2),
                           causal=True)
    _assert_close("right-pad", outs[0][1:, :6], ref)

    # gpt-oss style sinks from module.sinks
    mod.sinks = torch.randn(4)
    out, _ = fwd(mod, q, k, v, None)
    ref, _ = attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                           learnable_sink=mod.sinks)
    _assert_close("sinks", out, ref)

    with pytest.raises(NotImplementedError, match="dropout"):
        fwd(mod, q, k, v, None, dropout=0.1)
