"""triflash as a transformers attention implementation, on tiny random models built from configs (no downloads).

Models: Llama (GQA), Qwen3 (q/k norm), Gemma2 (D=256, attention softcap, sliding window) and GPT-OSS (learnable
attention sinks, sliding window, MoE with every expert routed). The reference is ``sdpa``; transformers refuses
``sdpa`` for Gemma2 (no softcap) and GPT-OSS (no sinks), so those two are compared with ``eager``.

CPU tier (the default run, Triton's interpreter, fp32): logits and gradients agree with the reference within
``1e-4 * max|ref| + 1e-5``: the attention itself agrees to ~1e-6 (fp32 eps 1.2e-7 times the few-step reductions of
SPEC §6), and two decoder layers plus the LM head amplify it by well under 100x.

GPU tier (``-m gpu``, bf16, longer sequences): SPEC §6 applied to whole models. ``ref`` is the reference
implementation in fp32 on the same (bf16-rounded) weights, ``pt`` the reference implementation in bf16 (that dtype's
own error through the same network), and triflash in bf16 must satisfy ``max|out - ref| <= 2 * max|pt - ref| +
atol`` for logits (3x for gradients), ``atol = eps_bf16 * max|ref|``. Both bf16 runs see the same bf16 rounding
in every non-attention op, so the rule measures what the attention adds on top.
"""

import pytest
import torch
import transformers  # pinned in requirements/cpu.txt: a missing install must fail, not skip
from tolerance import assert_close as spec_close

from triflash.integrations.transformers import register, triflash_attention_forward, triflash_attention_mask

NAME = register()
MODELS = ["llama", "qwen3", "gemma2", "gpt-oss"]
REF_IMPL = {"llama": "sdpa", "qwen3": "sdpa", "gemma2": "eager", "gpt-oss": "eager"}
VOCAB, EOS = 128, 2


def _close(name, out, ref, pt=None, factor=2.0):
    """fp32: the explicit bound of the module docstring; bf16/fp16: SPEC §6 with ``pt`` the reference in that dtype."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if out.dtype != torch.float32:
        spec_close(name, out, ref.to(torch.float32), pt, factor=factor)
        return
    err = (out.double() - ref.double()).abs().max().item()
    bound = 1e-4 * ref.double().abs().max().item() + 1e-5
    assert err <= bound, f"{name}: max err {err:.3e} > {bound:.3e}"


def _config(kind, window):
    # initializer_range 0.2: scores of O(1), so the attention is far from uniform and softcap / sinks / windows
    # change the logits by far more than the tolerance (with the default 0.02 the softcap is a no-op).
    common = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, vocab_size=VOCAB, initializer_range=0.2,
                  pad_token_id=0, bos_token_id=1, eos_token_id=EOS)
    if kind == "llama":
        return transformers.LlamaForCausalLM, transformers.LlamaConfig(
            **common, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    if kind == "qwen3":
        return transformers.Qwen3ForCausalLM, transformers.Qwen3Config(
            **common, num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512)
    if kind == "gemma2":  # layer 0 sliding, layer 1 full
        return transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
            **common, num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=window,
            attn_logit_softcapping=5.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
            max_position_embeddings=512)
    assert kind == "gpt-oss"  # layer 0 sliding, layer 1 full; yarn rope, whose default wants 32 x 4096 positions
    # 2 experts, both routed: the MoE output is continuous in its input, so no near-tie in the router can turn a
    # rounding difference into a different expert.
    return transformers.GptOssForCausalLM, transformers.GptOssConfig(
        **common, num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=window,
        num_local_experts=2, num_experts_per_tok=2, max_position_embeddings=131072)


def _model(kind, impl, device, dtype=torch.float32, window=8):
    """The same random weights for every impl/dtype: built in fp32 from seed 0, then cast."""
    cls, cfg = _config(kind, window)
    torch.manual_seed(0)
    model = cls(cfg)
    if kind == "gpt-oss":  # the init's N(0, 0.02) sinks would hardly matter; N(0, 1) gives them real weight
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape, generator=g))
    model = model.to(device=device, dtype=dtype).eval()
    model.set_attn_implementation(impl)
    return model


def _ids(b, s, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, s), generator=g).to(device)


def _attn_grads(model):
    """Gradients of every attention parameter (sinks included) and of the embeddings, by name."""
    out = {"embed": model.model.embed_tokens.weight.grad}
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"L{i}.{name}"] = getattr(attn, name).weight.grad
        if hasattr(attn, "sinks"):
            out[f"L{i}.sinks"] = attn.sinks.grad
    return out


def _logits_and_grads(model, ids):
    out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), _attn_grads(model)


def _padded(lens, s, device, left=True):
    """ids (B, s), 2-D mask and position_ids of a padded batch; row b holds lens[b] real tokens."""
    ids = _ids(len(lens), s, device, seed=sum(lens))
    mask = torch.zeros(len(lens), s, dtype=torch.long, device=device)
    for b, real in enumerate(_real(lens, s, left)):
        mask[b, real] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def _real(lens, s, left):
    """The slice of the real tokens of each padded row."""
    return [slice(s - n, s) if left else slice(0, n) for n in lens]


def _packed(rows, device):
    """ids (B, S) and position_ids of rows that each pack several sequences (lengths rows[b]), positions from 0."""
    s = sum(rows[0])
    assert all(sum(r) == s for r in rows)
    pos = torch.cat([torch.cat([torch.arange(n) for n in r])[None] for r in rows]).to(device)
    return _ids(len(rows), s, device, seed=s + len(rows)), pos


def _segments(rows):
    """(b, slice) of every packed sequence."""
    out = []
    for b, r in enumerate(rows):
        start = 0
        for n in r:
            out.append((b, slice(start, start + n)))
            start += n
    return out


# CPU tier: fp32 on the `device` fixture (cpu under the interpreter, or cuda).


def test_register_adds_function_and_mask_builder():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert "flash" not in NAME
    assert ALL_ATTENTION_FUNCTIONS[NAME] is triflash_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[NAME] is triflash_attention_mask
    with pytest.raises(ValueError, match="flash"):
        register("triflash_attention")


@pytest.mark.parametrize("kind", MODELS)
def test_logits_and_grads(kind, device):
    ids = _ids(2, 16, device)
    logits, grads = _logits_and_grads(_model(kind, NAME, device), ids)
    ref_logits, ref_grads = _logits_and_grads(_model(kind, REF_IMPL[kind], device), ids)
    _close("logits", logits, ref_logits)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        _close(f"grad {name}", g, ref_grads[name])


@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
@pytest.mark.parametrize("kind", MODELS)
def test_padded_matches_per_sequence(kind, left, device):
    lens, s = [16, 9, 4], 16
    ids, mask, pos = _padded(lens, s, device, left)
    model, ref_model = _model(kind, NAME, device), _model(kind, REF_IMPL[kind], device)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, position_ids=pos).logits
        ref = ref_model(ids, attention_mask=mask, position_ids=pos).logits
        for b, real in enumerate(_real(lens, s, left)):
            single = model(ids[b:b + 1, real]).logits[0]
            _close(f"seq{b}", padded[b, real], single)
            _close(f"seq{b}-vs-{REF_IMPL[kind]}", padded[b, real], ref[b, real])


@pytest.mark.parametrize("kind", MODELS)
def test_packed_matches_per_sequence(kind, device):
    """position_ids restarting at 0 inside a row equal per-sequence runs, forward and backward.

    Without a cache transformers builds a block-diagonal mask (checked against position_ids, then varlen); with a
    cache it builds a plain causal/window mask or none, and triflash splits the rows by position_ids alone, as
    FlashAttention does. gpt-oss never builds the block mask, and its eager attention then attends across the
    packed sequences: the reference is therefore the reference implementation run per sequence.
    """
    rows = [[7, 5, 4], [16]]
    ids, pos = _packed(rows, device)
    w = torch.randn(ids.shape + (VOCAB,), generator=torch.Generator().manual_seed(2)).to(device)
    model, ref_model = _model(kind, NAME, device), _model(kind, REF_IMPL[kind], device)
    single = []
    for b, seg in _segments(rows):
        logits = model(ids[b:b + 1, seg]).logits[0]
        (logits * w[b, seg]).sum().backward()  # accumulates: the sum over sequences of their gradients
        single.append(logits.detach())
        with torch.no_grad():
            _close(f"{seg} vs {REF_IMPL[kind]}", single[-1], ref_model(ids[b:b + 1, seg]).logits[0])
    single_grads = {name: g.clone() for name, g in _attn_grads(model).items()}
    for use_cache in (False, True):  # backward on the training path (no cache) only
        model.zero_grad()
        packed = model(ids, position_ids=pos, use_cache=use_cache).logits
        for (b, seg), ref in zip(_segments(rows), single):
            _close(f"use_cache={use_cache} row{b} {seg}", packed[b, seg].detach(), ref)
        if not use_cache:
            (packed * w).sum().backward()
            for name, g in _attn_grads(model).items():
                _close(f"grad {name}", g, single_grads[name])


@pytest.mark.parametrize("kind", MODELS)
def test_generate_left_padded_matches_reference(kind, device):
    ids, mask, _ = _padded([8, 5], 8, device)
    outs = {}
    for impl in (NAME, REF_IMPL[kind]):
        with torch.no_grad():
            outs[impl] = _model(kind, impl, device).generate(ids, attention_mask=mask, max_new_tokens=4,
                                                             do_sample=False, pad_token_id=0)
    assert outs[NAME].shape[1] > 8
    assert torch.equal(outs[NAME], outs[REF_IMPL[kind]])


def _recording_backend(device):
    """(backend, graphs): inductor on CUDA, aot_eager on CPU, recording each graph Dynamo hands it."""
    real, graphs = torch._dynamo.lookup_backend("inductor" if device == "cuda" else "aot_eager"), []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return real(gm, example_inputs)

    return backend, graphs


def _traced_triflash(graphs):
    return any("triflash" in str(node.target) for gm in graphs for node in gm.graph.nodes)


def test_compile_model_forward_backward(device):
    """torch.compile(model): forward and backward through the triflash custom ops, equal to eager.

    On CPU the backend is aot_eager: Dynamo + AOTAutograd exercise what triflash provides (the custom ops' fake
    implementations and autograd registration); inductor would only change the code of the rest of the model and
    spends ~40 s compiling C++ for it. On CUDA the default inductor backend runs.
    """
    torch._dynamo.reset()  # no compiled frames of the attention function left over from other tests
    ids = _ids(2, 16, device, seed=4)
    eager_logits, eager_grads = _logits_and_grads(_model("llama", NAME, device), ids)
    model = _model("llama", NAME, device)
    backend, graphs = _recording_backend(device)
    out = torch.compile(model, backend=backend)(ids, labels=ids, use_cache=False)
    out.loss.backward()
    assert _traced_triflash(graphs), "no compiled graph calls the triflash op"
    _close("compiled logits", out.logits.detach(), eager_logits)
    for name, g in _attn_grads(model).items():
        _close(f"compiled grad {name}", g, eager_grads[name])


def test_compile_attention_fullgraph(device):
    """The attention function itself traces without graph breaks (fullgraph=True), sinks, window and softcap on."""
    mod = _Module().to(device)
    mod.sinks = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(5)).to(device))
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 12, device, seed=6))
    kwargs = dict(scaling=0.3, sliding_window=5, softcap=2.0)

    def run(fn):
        out, _ = fn(mod, q, k, v, None, **kwargs)
        grads = torch.autograd.grad((out * out).sum(), (q, k, v, mod.sinks))
        return out.detach(), grads

    # A fresh Dynamo state: a frame of this function compiled before (the model test's graph breaks compile it as a
    # frame of its own) with another scaling would make the float dynamic on recompilation, and the interface's
    # math.isfinite(softmax_scale) cannot run on a symbolic float under fullgraph=True.
    torch._dynamo.reset()
    ref_out, ref_grads = run(triflash_attention_forward)
    backend, graphs = _recording_backend(device)
    out, grads = run(torch.compile(triflash_attention_forward, fullgraph=True, backend=backend))
    assert len(graphs) == 1 and _traced_triflash(graphs)
    _close("fullgraph out", out, ref_out)
    for name, g, r in zip("qkvs", grads, ref_grads):
        _close(f"fullgraph d{name}", g, r)


def test_arbitrary_4d_mask_raises(device):
    model = _model("llama", NAME, device)
    ids = _ids(1, 8, device)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(1, 1, 8, 8, generator=g) > 0.5
    mask[..., 0] = True
    with pytest.raises(NotImplementedError, match="not a padding"):
        model(ids, attention_mask=mask.to(device))


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def _qkv(b, s, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 4, s, 16, generator=g)
    k, v = torch.randn(b, 2, s, 16, generator=g), torch.randn(b, 2, s, 16, generator=g)
    return q.to(device), k.to(device), v.to(device)


def test_function_packed_masks_and_sinks(device):
    from triflash import attention_ref

    fwd = triflash_attention_forward
    mod = _Module()
    q, k, v = _qkv(1, 12, device)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    packed, _ = fwd(mod, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)
    for lo, hi in ((0, 5), (5, 12)):
        single, _ = fwd(mod, q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], None)
        _close(f"packed{lo}", packed[:, lo:hi], single)

    # the same packing from position_ids: without a mask, and with the block-diagonal mask sdpa_mask builds for it
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)
    seg = torch.tensor([0] * 5 + [1] * 7, device=device)
    block = (seg[:, None] == seg[None, :]) & torch.ones(12, 12, dtype=torch.bool, device=device).tril()
    for mask in (None, block[None, None]):
        out, _ = fwd(mod, q, k, v, mask, position_ids=pos)
        assert torch.equal(out, packed), f"position_ids packing, mask={mask is not None}"
    # a block-diagonal mask that does not match position_ids is refused; a plain arange is not packing
    with pytest.raises(NotImplementedError, match="not a padding"):
        fwd(mod, q, k, v, block[None, None], position_ids=torch.arange(12, device=device)[None])
    plain, _ = fwd(mod, q, k, v, None, position_ids=torch.arange(12, device=device)[None])
    assert torch.equal(plain, fwd(mod, q, k, v, None)[0])

    # right padding as a 2-D mask, a 4-D boolean mask and a 4-D additive mask: same result, padded rows zero
    q, k, v = _qkv(2, 10, device, seed=1)
    pad = torch.ones(2, 10, dtype=torch.bool, device=device)
    pad[1, 6:] = False
    m4 = torch.ones(10, 10, dtype=torch.bool, device=device).tril()[None, None] & pad[:, None, None, :] \
        & pad[:, None, :, None]
    additive = torch.zeros(m4.shape, device=device).masked_fill(~m4, torch.finfo(torch.float32).min)
    outs = [fwd(mod, q, k, v, m)[0] for m in (pad, m4, additive)]
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])
    assert (outs[0][1, 6:] == 0).all()
    ref, _ = attention_ref(q[1:, :, :6].transpose(1, 2), k[1:, :, :6].transpose(1, 2), v[1:, :, :6].transpose(1, 2),
                           causal=True)
    _close("right-pad", outs[0][1:, :6], ref)

    # gpt-oss style sinks from module.sinks
    mod.sinks = torch.randn(4, generator=torch.Generator().manual_seed(3)).to(device)
    out, _ = fwd(mod, q, k, v, None)
    ref, _ = attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                           learnable_sink=mod.sinks)
    _close("sinks", out, ref)

    with pytest.raises(NotImplementedError, match="dropout"):
        fwd(mod, q, k, v, None, dropout=0.1)


# GPU tier: bf16, longer sequences (S=256 with a 100-token window: interior blocks and masked edges both occur)

GPU, GPU_S, GPU_WINDOW = "cuda", 256, 100


def _bf16_trio(kind):
    """(triflash bf16, reference impl bf16, reference impl fp32 on the bf16-rounded weights)."""
    ref_impl = REF_IMPL[kind]
    return (_model(kind, NAME, GPU, torch.bfloat16, GPU_WINDOW),
            _model(kind, ref_impl, GPU, torch.bfloat16, GPU_WINDOW),
            _model(kind, ref_impl, GPU, torch.bfloat16, GPU_WINDOW).float())


@pytest.mark.gpu
@pytest.mark.parametrize("kind", MODELS)
def test_logits_and_grads_bf16(kind):
    ids = _ids(2, GPU_S, GPU)
    (out, out_g), (pt, pt_g), (ref, ref_g) = (_logits_and_grads(m, ids) for m in _bf16_trio(kind))
    _close("logits", out, ref, pt)
    for name, g in out_g.items():
        _close(f"grad {name}", g, ref_g[name], pt_g[name], factor=3.0)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", MODELS)
def test_padded_and_packed_bf16(kind):
    """Padded and packed bf16 batches against fp32 per-sequence runs of the reference; pt = the reference in bf16 on
    the padded batch, and per sequence for packing (gpt-oss's eager attends across packed sequences)."""
    model, pt_model, ref_model = _bf16_trio(kind)
    s = GPU_S
    lens = [s, s * 7 // 10 + 2, s // 7 + 1]  # 256, 181, 37
    rows = [[s * 2 // 5 - 1, 3, s - s * 2 // 5 - 2], [s - s * 3 // 10, s * 3 // 10]]  # [101, 3, 152], [180, 76]
    with torch.no_grad():
        for left in (True, False):
            ids, mask, pos = _padded(lens, s, GPU, left)
            out = model(ids, attention_mask=mask, position_ids=pos).logits
            pt = pt_model(ids, attention_mask=mask, position_ids=pos).logits
            for b, real in enumerate(_real(lens, s, left)):
                ref = ref_model(ids[b:b + 1, real]).logits[0]
                _close(f"left={left} seq{b}", out[b, real], ref, pt[b, real])
        ids, pos = _packed(rows, GPU)
        for use_cache in (False, True):
            out = model(ids, position_ids=pos, use_cache=use_cache).logits
            for b, seg in _segments(rows):
                ref = ref_model(ids[b:b + 1, seg]).logits[0]
                pt = pt_model(ids[b:b + 1, seg]).logits[0]
                _close(f"packed use_cache={use_cache} row{b} {seg}", out[b, seg], ref, pt)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", MODELS)
def test_generate_bf16(kind):
    """Greedy bf16 generation, left-padded: the cached decoding path within SPEC §6, and the tokens identical to the
    reference's up to a provable near-tie.

    ``ref``/``pt``: the fp32 / bf16 reference run teacher-forced on triflash's tokens. Triflash's per-step decode
    logits must meet the logits rule against them. Where the two greedy generations first part, both prefixes are
    still equal, so one of them picked a token other than the fp32 argmax: the fp32 top-2 gap there is at most
    twice the larger of the two runs' logit errors at that step (a bf16 near-tie), else the test fails.
    """
    model, pt_model, ref_model = _bf16_trio(kind)
    p, n = 64, 24
    ids, mask, _ = _padded([p, p - 23], p, GPU)
    kw = dict(attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
              output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        gen, pt_gen = model.generate(ids, **kw), pt_model.generate(ids, **kw)
        seq = gen.sequences
        full_mask = torch.cat([mask, torch.ones_like(seq[:, p:])], dim=1)
        pos = (full_mask.cumsum(1) - 1).clamp(min=0)
        ref = ref_model(seq, attention_mask=full_mask, position_ids=pos).logits[:, p - 1:-1].float()
        pt = pt_model(seq, attention_mask=full_mask, position_ids=pos).logits[:, p - 1:-1]
    out = torch.stack(gen.logits, 1).to(torch.bfloat16)  # raw (unprocessed) logits, bf16 values held in fp32
    pt_out = torch.stack(pt_gen.logits, 1).float()
    _close("decode logits", out, ref, pt)
    choice = ref.clone()
    choice[..., EOS] = -torch.inf  # min_new_tokens kept both runs from picking it
    for b in range(seq.shape[0]):
        differ = (seq[b, p:] != pt_gen.sequences[b, p:]).nonzero()
        if len(differ):
            j = int(differ[0])
            top2 = choice[b, j].topk(2).values
            gap = (top2[0] - top2[1]).item()
            err = max((out[b, j].float() - ref[b, j]).abs().max().item(), (pt_out[b, j] - ref[b, j]).abs().max().item())
            assert gap <= 2 * err, f"row {b}: the runs part at step {j}, fp32 top-2 gap {gap:.3e} > 2 * {err:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", MODELS)
def test_compile_bf16(kind):
    """torch.compile (inductor) of the triflash bf16 model: forward and backward within SPEC §6 like eager."""
    torch._dynamo.reset()
    model, pt_model, ref_model = _bf16_trio(kind)
    ids = _ids(2, GPU_S, GPU, seed=4)
    (pt, pt_g), (ref, ref_g) = _logits_and_grads(pt_model, ids), _logits_and_grads(ref_model, ids)
    backend, graphs = _recording_backend(GPU)
    out = torch.compile(model, backend=backend)(ids, labels=ids, use_cache=False)
    out.loss.backward()
    assert _traced_triflash(graphs), "no compiled graph calls the triflash op"
    _close("compiled logits", out.logits.detach(), ref, pt)
    for name, g in _attn_grads(model).items():
        _close(f"compiled grad {name}", g, ref_g[name], pt_g[name], factor=3.0)
