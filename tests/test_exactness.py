"""``keep_ratio=1`` is the unpruned model bit for bit, in every dtype and with every attention kernel.

For the vision classifiers (ViT, CLIP, SigLIP) and the tiny multimodal LLMs (LLaVA, Qwen2-VL), in float32,
bfloat16 and float16, with eager and SDPA attention: applying a method (ones that read attention, one that
merges, learned ones) with nothing to drop gives logits ``torch.equal`` to the unpruned model's, and so does the
model after ``remove()``; the MLLMs' greedy ``generate()`` too (sequences and every step's logits, bfloat16).
Where a method does read attention, the scored layer's own output still comes from the model's kernel.

In half precision an eager kernel of tokensift's own (logits in float32) differed from the model's
``eager_attention_forward`` (logits in the model's dtype) in the last bits, which is why these run in
bf16 / fp16, not only in float32, where the two agree.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import build_tiny, make_pixel_values
from tiny_mllm import build_tiny_mllm, image_token_id, make_batch
from transformers.models.llama import modeling_llama
from transformers.models.vit import modeling_vit

import tokensift as ts
from tokensift import attention as attn
from tokensift.backbones import adapt
from tokensift.scorers.dynamicvit import DynamicViTMethod
from tokensift.scorers.dyvte import DyVTEConfig, DyVTEMethod
from tokensift.scorers.ia_red2 import IARed2Method

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KERNELS = ("eager", "sdpa")
CASES = [pytest.param(d, k, id=f"{str(d).removeprefix('torch.')}-{k}") for d, k in itertools.product(DTYPES, KERNELS)]
VISION_METHODS = ("l2norm", "random", "cls_attention", "tome", "divprune", "dynamicvit", "ia_red2")


def _no_grad_logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _attn_names(model) -> list[str]:
    return [m.config._attn_implementation for m in model.modules() if hasattr(m, "config")]


def _vision(family: str, dtype: torch.dtype, kernel: str):
    model = build_tiny(family).to(dtype)
    model.set_attn_implementation(kernel)
    assert adapt(model).config._attn_implementation == kernel
    return model, {"pixel_values": make_pixel_values().to(dtype)}


def _vision_method(model, name: str):
    if name == "dynamicvit":  # learned: an untrained scorer with DynamicViT's three sites
        return DynamicViTMethod.for_backbone(adapt(model)).eval()
    if name == "ia_red2":  # learned: untrained interpreters at three sites
        return IARed2Method.for_backbone(adapt(model)).eval()
    return name


@pytest.mark.parametrize(("dtype", "kernel"), CASES)
@pytest.mark.parametrize("family", ["vit", "clip", "siglip"])
def test_vision_keep_ratio_one_is_bit_exact(family, dtype, kernel):
    model, inputs = _vision(family, dtype, kernel)
    reference, names = _no_grad_logits(model, inputs), _attn_names(model)
    for name in VISION_METHODS:
        handle = ts.apply(model, _vision_method(model, name), keep_ratio=1.0)
        assert adapt(model).config._attn_implementation == attn.PREFIX + kernel  # the wrapper is in place
        assert torch.equal(_no_grad_logits(model, inputs), reference), name
        handle.remove()
        assert _attn_names(model) == names
        assert torch.equal(_no_grad_logits(model, inputs), reference), f"{name} after remove()"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family", ["vit", "siglip"])
def test_scored_vision_layer_is_computed_by_the_models_kernel(family, kernel):
    """cls_attention captures the site block's attention; that block's output is still the unpruned one."""
    model, inputs = _vision(family, torch.bfloat16, kernel)
    site = 1
    block = adapt(model).layers[site]
    seen = []
    hook = block.register_forward_hook(lambda module, args, output: seen.append(output))
    _no_grad_logits(model, inputs)
    hook.remove()
    unpruned = seen[0][0] if isinstance(seen[0], tuple) else seen[0]
    with ts.apply(model, "cls_attention", keep_ratio=0.5, sites=[f"vit.{site}"]) as handle:
        _no_grad_logits(model, inputs)
        (record,) = handle.last_records
    kept = record.kept_orig_index
    expected = unpruned.gather(1, kept.unsqueeze(-1).expand(-1, -1, unpruned.shape[-1]))
    assert kept.shape[1] < unpruned.shape[1]
    assert torch.equal(record.hidden, expected)


def test_eager_kernel_is_the_modeling_files_own():
    """The wrapper's plain eager call goes to the function the attention class's own forward calls."""
    vit = build_tiny("vit")
    vit_attention = adapt(vit).attention_modules[0]
    assert attn.model_eager(vit_attention) is modeling_vit.eager_attention_forward
    llava = build_tiny_mllm("llava")
    llama_attention = adapt(llava).attention_modules[0]
    assert attn.model_eager(llama_attention) is modeling_llama.eager_attention_forward

    class Subclassed(modeling_llama.LlamaAttention):  # defined elsewhere, inherits forward
        pass

    llama_attention.__class__ = Subclassed
    assert attn.model_eager(llama_attention) is modeling_llama.eager_attention_forward


def test_fallback_eager_matches_transformers_standard_one():
    """An attention class whose file has no eager function gets transformers' standard one, op for op."""

    class Bare(torch.nn.Module):  # no forward reading an eager function, no eager_attention_forward here
        num_key_value_groups = 2

    module = Bare().eval()
    assert attn.model_eager(module) is attn._eager
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 5, 8, generator=generator).bfloat16()
    key, value = (torch.randn(2, 2, 5, 8, generator=generator).bfloat16() for _ in range(2))
    mask = torch.zeros(2, 1, 5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -1e4).bfloat16()
    ours = attn._eager(module, query, key, value, mask, scaling=0.3)
    theirs = modeling_llama.eager_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


# -- multimodal LLMs ---------------------------------------------------------------------------------------


def _mllm(family: str, dtype: torch.dtype, kernel: str):
    model = build_tiny_mllm(family).to(dtype)
    model.set_attn_implementation(kernel)
    assert set(_attn_names(model)) == {kernel}
    inputs = make_batch(family).inputs()
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return model, inputs


def _generate(model, inputs: dict, family: str):
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=3,
            do_sample=False,
            suppress_tokens=[image_token_id(family)],
            return_dict_in_generate=True,
            output_logits=True,
        )


def _mllm_specs(model, family: str) -> list[tuple[str, object, dict]]:
    torch.manual_seed(0)
    routers = DyVTEMethod.for_backbone(adapt(model), DyVTEConfig(router_width=16)).eval()
    specs = [
        ("fastv", "fastv", {}),  # LLM attention captured at layer k-1
        ("pyramiddrop", "pyramiddrop", {}),
        ("visionzip", "visionzip", {}),  # the tower's attention captured
        ("divprune@vit.0", "divprune", {"sites": ["vit.0"]}),
        ("dyvte", routers, {"threshold": 1.0}),  # learned; runs at every site and keeps every token
    ]
    if family == "llava":  # a vit site with attention capture in LLaVA's (unpacked) tower
        specs.append(("cls_attention@vit.0", "cls_attention", {"sites": ["vit.0"]}))
    return [(n, m, kw if "threshold" in kw else {**kw, "keep_ratio": 1.0}) for n, m, kw in specs]


@pytest.mark.parametrize(("dtype", "kernel"), CASES)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_mllm_keep_ratio_one_is_bit_exact(family, dtype, kernel):
    model, inputs = _mllm(family, dtype, kernel)
    reference, names = _no_grad_logits(model, inputs), _attn_names(model)
    reference_generated = _generate(model, inputs, family) if dtype == torch.bfloat16 else None
    for name, method, budget in _mllm_specs(model, family):
        handle = ts.apply(model, method, **budget)
        assert torch.equal(_no_grad_logits(model, inputs), reference), name
        if reference_generated is not None:
            generated = _generate(model, inputs, family)
            assert torch.equal(generated.sequences, reference_generated.sequences), name
            for step, expected in zip(generated.logits, reference_generated.logits, strict=True):
                assert torch.equal(step, expected), name
        handle.remove()
        assert _attn_names(model) == names
        assert torch.equal(_no_grad_logits(model, inputs), reference), f"{name} after remove()"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_scored_llm_layer_is_computed_by_the_models_kernel(family, kernel):
    """fastv captures layer k-1's attention when it prunes at llm.k; that layer's output is still the unpruned one."""
    model, inputs = _mllm(family, torch.bfloat16, kernel)
    site = 2
    layer = adapt(model).layers[site - 1]
    seen = []
    hook = layer.register_forward_hook(lambda module, args, output: seen.append(output))
    _no_grad_logits(model, inputs)
    hook.remove()
    unpruned = seen[0][0] if isinstance(seen[0], tuple) else seen[0]
    with ts.apply(model, "fastv", keep_ratio=0.5, sites=[f"llm.{site}"]) as handle:
        _no_grad_logits(model, inputs)
        (record,) = handle.last_records
    kept, valid = record.kept_orig_index, record.kept_orig_index >= 0
    assert int(valid.sum()) < int(inputs["attention_mask"].sum())
    rows = torch.arange(kept.shape[0]).unsqueeze(1).expand_as(kept)
    assert torch.equal(record.hidden[valid], unpruned[rows[valid], kept[valid]])
