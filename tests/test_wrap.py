"""wrap / unwrap / decompose leave the user's model exactly as it was."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torch import nn

import llama_attrib
from conftest import prompt, tiny_model
from llama_attrib.stream import DecomposedTensor

_HOOK_DICTS = [
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_state_dict_hooks",
]


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Every module's instance ``__dict__`` (keys and object identities) and hooks."""
    state = {}
    for name, module in model.named_modules():
        state[name] = {k: id(v) for k, v in module.__dict__.items() if k not in _HOOK_DICTS}
        state[name + "#hooks"] = [len(getattr(module, h, {})) for h in _HOOK_DICTS]
    return state


def test_plain_calls_of_a_wrapped_model_are_bit_identical() -> None:
    model = tiny_model(2)
    ids = prompt(9)
    before = model(ids).logits
    gen_before = model.generate(ids, max_new_tokens=5, do_sample=False)
    llama_attrib.wrap(model)
    assert torch.equal(model(ids).logits, before)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), gen_before)
    decomposed = model(ids, decompose=True)
    assert torch.equal(decomposed.logits, before)


def test_unwrap_restores_every_attribute_hook_and_logit() -> None:
    model = tiny_model(2)
    ids = prompt(9)
    state, before = snapshot(model), model(ids).logits
    signature = inspect.signature(model.forward)
    llama_attrib.wrap(model)
    assert llama_attrib.is_wrapped(model)
    assert inspect.signature(model.forward) == signature
    assert model.forward.__name__ == "forward"
    model.generate(ids, decompose=True, return_dict_in_generate=True, max_new_tokens=3)
    llama_attrib.unwrap(model)
    assert not llama_attrib.is_wrapped(model)
    assert snapshot(model) == state
    assert torch.equal(model(ids).logits, before)


def test_unwrap_keeps_a_per_instance_forward_that_was_there_before() -> None:
    model = tiny_model(2)
    mlp = model.model.layers[0].mlp
    original = mlp.forward

    def custom(x: torch.Tensor) -> torch.Tensor:
        return original(x)

    mlp.forward = custom
    llama_attrib.wrap(model)
    assert mlp.__dict__["forward"] is not custom
    llama_attrib.unwrap(model)
    assert mlp.__dict__["forward"] is custom


def test_wrapping_twice_is_a_no_op() -> None:
    model = tiny_model(2)
    state = snapshot(model)
    assert llama_attrib.wrap(llama_attrib.wrap(model)) is model
    llama_attrib.unwrap(model)
    assert snapshot(model) == state
    with pytest.raises(ValueError, match="not wrapped"):
        llama_attrib.unwrap(model)


def test_exception_inside_decompose_restores_the_model() -> None:
    model = tiny_model(2)
    state = snapshot(model)
    with pytest.raises(KeyError), llama_attrib.decompose(model):
        model(prompt(5))
        raise KeyError("user code failed")
    assert snapshot(model) == state


def test_exception_inside_a_decomposed_forward_leaves_a_usable_model() -> None:
    model = llama_attrib.wrap(tiny_model(2))
    ids = prompt(6)
    with pytest.raises(IndexError):
        model(torch.tensor([[1, 500]]), decompose=True)  # token id out of the vocabulary
    assert model.__dict__["_llama_attrib_session"].active is None
    assert torch.allclose(
        model(ids, decompose=True)["attentions"].recovery, model(ids).logits[0, -1], atol=1e-5
    )


def test_nested_decompose_and_explicit_opt_out() -> None:
    model = tiny_model(2)
    ids = prompt(5)
    with llama_attrib.decompose(model):
        with llama_attrib.decompose(model):
            assert model(ids)["attentions"] is not None
        assert llama_attrib.is_wrapped(model)
        assert model(ids, decompose=False).attentions is None
    assert not llama_attrib.is_wrapped(model)


def test_decompose_keeps_a_model_the_user_wrapped() -> None:
    model = llama_attrib.wrap(tiny_model(2))
    with llama_attrib.decompose(model):
        pass
    assert llama_attrib.is_wrapped(model)


def test_refusal_lists_every_problem_and_touches_nothing() -> None:
    model = tiny_model(2)
    model.train()
    model.config._attn_implementation = "flash_attention_2"
    model.model.layers[1].mlp.up_proj = nn.Sequential(nn.Linear(32, 64))
    state = snapshot(model)
    with pytest.raises(llama_attrib.UnsupportedModelError) as info:
        llama_attrib.wrap(model)
    problems = info.value.problems
    assert any("training mode" in p for p in problems)
    assert any("flash_attention_2" in p for p in problems)
    assert any("layers.1.mlp.up_proj" in p and "not a plain torch.nn.Linear" in p for p in problems)
    assert snapshot(model) == state
    assert not llama_attrib.is_wrapped(model)


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(llama_attrib.UnsupportedModelError, match="not a supported architecture"):
        llama_attrib.wrap(nn.Linear(2, 2))


def test_inputs_embeds_are_refused() -> None:
    model = llama_attrib.wrap(tiny_model(2))
    embeds = model.model.embed_tokens(prompt(4))
    with pytest.raises(llama_attrib.UnsupportedOptionError, match="input_ids"):
        model(inputs_embeds=embeds, decompose=True)


def test_stream_refuses_ops_that_would_drop_components() -> None:
    real = torch.randn(1, 3, 4)
    stream = DecomposedTensor.wrap(real, torch.stack([real, torch.zeros_like(real)]))
    with pytest.raises(llama_attrib.DecompositionError, match="lose the"):
        torch.tanh(stream)
    with pytest.raises(llama_attrib.DecompositionError, match="bias"):
        stream + torch.ones(4)
    both = stream + stream
    assert torch.equal(both.components.sum(0), 2 * real)
    assert stream[:, -1:].components.shape == (2, 1, 1, 4)
    assert stream.shape == real.shape and stream.dtype == real.dtype


def test_two_wrapped_models_do_not_interfere() -> None:
    a, b = llama_attrib.wrap(tiny_model(2)), llama_attrib.wrap(tiny_model(1))
    ids = prompt(6)
    alone = a(ids, decompose=True)["attentions"].components
    b(ids, decompose=True)
    assert b(ids).attentions is None
    assert torch.equal(a(ids, decompose=True)["attentions"].components, alone)


def test_sequences_longer_than_the_model_positions_are_refused() -> None:
    model = llama_attrib.wrap(tiny_model(2))  # max_position_embeddings = 128
    long = prompt(130)
    with pytest.raises(llama_attrib.UnsupportedOptionError, match="max_position_embeddings"):
        model(long, decompose=True)
    with pytest.raises(llama_attrib.UnsupportedOptionError, match="max_position_embeddings"):
        model.generate(prompt(120), decompose=True, max_new_tokens=10)
    with pytest.raises(llama_attrib.UnsupportedOptionError, match="max_position_embeddings"):
        llama_attrib.decompose_sequence(model, long)


def test_keyboard_interrupt_mid_generation_leaves_the_model_as_it_was() -> None:
    model = tiny_model(2)
    ids = prompt(8)
    before = snapshot(model)
    expected = model(ids).logits
    calls = 0
    norm = model.model.layers[1].mlp

    def interrupt(module: torch.nn.Module, args: object, output: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # third decoding step of a decomposed generate
            raise KeyboardInterrupt

    handle = norm.register_forward_hook(interrupt)
    for mode in ("forward", "target"):
        calls = 0
        with pytest.raises(KeyboardInterrupt), llama_attrib.decompose(model):
            model.generate(ids, decompose=mode, max_new_tokens=6, do_sample=False)
        assert not llama_attrib.is_wrapped(model)
    handle.remove()
    assert snapshot(model) == before
    assert torch.equal(model(ids).logits, expected)
    # and a wrapped model interrupted mid-generation stays usable, decomposing or not
    llama_attrib.wrap(model)
    handle = norm.register_forward_hook(interrupt)
    calls = 0
    with pytest.raises(KeyboardInterrupt):
        model.generate(ids, decompose=True, max_new_tokens=6, do_sample=False)
    handle.remove()
    out = model.generate(ids, decompose=True, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert len(out["attentions"]) == 3
    assert torch.equal(model(ids).logits, expected)


def test_lora_adapters_are_refused_and_merged_ones_decompose() -> None:
    from peft import LoraConfig, get_peft_model

    base = tiny_model(2)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    with pytest.raises(llama_attrib.UnsupportedModelError, match="merge_and_unload") as refused:
        llama_attrib.wrap(peft_model.base_model.model)
    assert len(refused.value.problems) == 4  # q_proj and v_proj of both layers, all listed
    assert not llama_attrib.is_wrapped(peft_model.base_model.model)
    ids = prompt(8)
    expected = peft_model(ids).logits[0, -1].detach()
    merged = llama_attrib.wrap(peft_model.merge_and_unload())
    c = merged(ids, decompose=True)["attentions"]
    assert torch.allclose(c.recovery, expected, atol=1e-4, rtol=1e-4)


def test_unsupported_quantized_linear_subclasses_are_refused() -> None:
    class QuantLinear(nn.Linear):  # a quantized layer llama_attrib cannot dequantize (GPTQ's name)
        pass

    model = tiny_model(2)
    old = model.model.layers[0].mlp.down_proj
    model.model.layers[0].mlp.down_proj = QuantLinear(old.in_features, old.out_features, bias=False)
    with pytest.raises(llama_attrib.UnsupportedModelError, match="QuantLinear is not a plain") as refused:
        llama_attrib.wrap(model)
    assert "bitsandbytes 4-bit/8-bit and torchao weight-only are supported" in str(refused.value)


def test_two_models_in_two_threads_decompose_independently() -> None:
    import threading

    models = [llama_attrib.wrap(tiny_model(2)), llama_attrib.wrap(tiny_model(1))]
    ids = prompt(9)
    options = {"max_new_tokens": 5, "do_sample": False, "return_dict_in_generate": True}
    alone = [
        m.generate(ids, decompose=mode, **options)
        for m, mode in zip(models, ("target", "forward"), strict=True)
    ]
    together: list[object] = [None, None]

    def run(i: int, mode: str) -> None:
        together[i] = models[i].generate(ids, decompose=mode, **options)

    threads = [threading.Thread(target=run, args=(i, mode)) for i, mode in enumerate(("target", "forward"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a.sequences, b.sequences)  # type: ignore[attr-defined]
        for k, (x, y) in enumerate(zip(a["attentions"], b["attentions"], strict=True)):  # type: ignore[index]
            token = int(a.sequences[0, 9 + k])
            assert torch.allclose(x[token].components, y[token].components, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["target", "forward"])
def test_two_threads_share_one_wrapped_model(mode: str) -> None:
    """A notebook widget or a small server calls one wrapped model from several threads: the
    calls are served one at a time, each as it would be alone, and a plain call from another
    thread meanwhile stays plain."""
    import threading

    model = llama_attrib.wrap(tiny_model(2))
    prompts = [prompt(7, seed=s) for s in range(4)]
    options = {"decompose": mode, "return_dict_in_generate": True, "max_new_tokens": 3, "do_sample": False}
    alone = [model.generate(ids, **options) for ids in prompts]
    plain = model(prompts[0]).logits
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = model.generate(prompts[i], **options) if i < 4 else model(prompts[0]).logits
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, single in enumerate(alone):
        assert torch.equal(results[i].sequences, single.sequences)
        for a, b in zip(results[i]["attentions"], single["attentions"], strict=True):
            token = int(a.token)
            assert torch.equal(a[token].components, b[token].components)
    for i in (4, 5):
        assert torch.equal(results[i], plain)  # not decomposed, and not disturbed


def test_the_models_config_is_never_changed_while_decomposing() -> None:
    """Only the wrapped attention module's own view of the config names llama_attrib's
    function, and only while its probe runs: the model's config (shared with anything else
    that holds it) keeps its implementation throughout."""
    model = llama_attrib.wrap(tiny_model(2))
    attention = model.model.layers[1].self_attn
    seen: list[tuple[str, str]] = []

    def during(module: nn.Module, args: Any) -> None:  # inside the attention's own forward
        seen.append((model.config._attn_implementation, attention.config._attn_implementation))

    handle = attention.q_proj.register_forward_pre_hook(during)
    try:
        model(prompt(5), decompose="forward")
        model(prompt(5))
    finally:
        handle.remove()
    assert seen == [("sdpa", "llama_attrib"), ("sdpa", "sdpa")]
    assert attention.config._attn_implementation == "sdpa"
    llama_attrib.unwrap(model)
    assert attention.config is model.config


def test_a_lazy_composition_attaches_for_its_own_pass_after_unwrap() -> None:
    """Target mode's Compositions compute other tokens on demand. Made on a wrapped model that
    the user unwrapped since, such a pass attaches for itself (the session layer's attached())
    and restores the model exactly: its numbers equal those computed while wrapped, the model
    stays unwrapped with every attribute and hook as before, and its logits unchanged. A pass
    that fails leaves it so too."""
    model = tiny_model(2)
    ids = prompt(9)
    state, before = snapshot(model), model(ids).logits
    llama_attrib.wrap(model)
    (c,) = llama_attrib.decompose_sequence(model, ids)
    wrapped = c[11].components.clone()
    (fresh,) = llama_attrib.decompose_sequence(model, ids)
    llama_attrib.unwrap(model)
    assert snapshot(model) == state
    later = fresh[11].components  # a pass of its own, the model unwrapped
    assert torch.equal(later, wrapped)
    assert not llama_attrib.is_wrapped(model) and snapshot(model) == state
    assert torch.equal(model(ids).logits, before)
    with pytest.raises(IndexError):
        fresh._run.solve([(3, None)])  # a step the run does not have: fails inside the pass
    assert not llama_attrib.is_wrapped(model) and snapshot(model) == state
