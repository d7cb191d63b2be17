"""polyak.EMA on PEFT models (LoRA, IA3): the averages hold the adapters only, several
adapters, merged adapters under a swap, PEFT's non-tensor state, and the averaged adapter
saved for ``PeftModel.from_pretrained``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import polyak
import polyak.export
import reference
from finetune_helpers import logits, lora, tiny_llama, train

peft = pytest.importorskip("peft")


def adapter_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_lora_averages_hold_only_the_adapters_and_match_the_reference():
    model = lora(tiny_llama())
    ema = polyak.EMA(model, decay=0.8, buffers="ignore")
    trained = adapter_names(model)
    assert sorted(ema.layout()) == sorted(trained) and all("lora_" in n for n in trained)
    buffers = {n for n, _ in model.named_buffers()}  # rotary inv_freq: averaged by default
    assert set(polyak.EMA(model, decay=0.8).layout()) == {*trained, *buffers}
    adapter_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert adapter_bytes <= ema.nbytes < adapter_bytes + 64 * len(trained)  # row alignment
    assert ema.nbytes < 0.2 * model_bytes
    init = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}
    seen = []

    class Recorder:
        def update(self):
            seen.append(
                {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}
            )
            ema.update()

    train(model, Recorder(), steps=5)
    for name, value in ema.averaged_tensors().items():
        exp = reference.ema([s[name] for s in seen], [0.8] * 5, init[name])
        np.testing.assert_allclose(value.double().numpy(), exp, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_saved_adapter_loads_in_peft_and_gives_the_swapped_outputs(tmp_path, kind):
    from peft import IA3Config, PeftModel, get_peft_model

    if kind == "lora":
        model = lora(tiny_llama())
    else:
        config = IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        )
        model = get_peft_model(tiny_llama(), config)
    ema = polyak.EMA(model, decay=0.7)
    train(model, ema, steps=4, lr=0.05 if kind == "lora" else 2.0)  # IA3 learns slowly
    polyak.export.save_pretrained(ema, tmp_path, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with ema.swapped(model):
        expected = logits(model)
    assert torch.allclose(logits(loaded), expected, atol=1e-6, rtol=0)
    assert (logits(model) - expected).abs().max() > 1e-4  # the live adapter differs
    mine = ema.averaged_tensors()
    for name, value in loaded.named_parameters():
        if name in mine:
            assert torch.equal(value, mine[name]), name


def test_several_adapters_set_adapter_and_rebind(tmp_path):
    from peft import LoraConfig, PeftModel

    model = lora(tiny_llama(), adapter="a")
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    ema = polyak.EMA(model, decay=0.5, buffers="ignore")
    assert all(".a." in n for n in ema.layout())  # b is frozen while a trains: not stored
    train(model, ema, steps=2)
    model.set_adapter("b")  # b trains now, a is frozen
    with pytest.raises(polyak.ModelChangedError, match=r"lora_A\.b\.weight.*ema\.rebind\(\)"):
        ema.update()
    kept = {n: v.clone() for n, v in ema.averaged_tensors().items()}
    report = ema.rebind()
    assert sorted(report["kept"]) == sorted(kept) and all(".b." in n for n in report["new"])
    train(model, ema, steps=2, seed=1)
    for n, v in kept.items():  # a is frozen: its average moves towards its constant value
        live = dict(model.named_parameters())[n].detach()
        assert torch.allclose(ema.averaged_tensors()[n], 0.25 * v + 0.75 * live, atol=1e-6)
    polyak.export.save_pretrained(ema, tmp_path, dtype=torch.float32)  # the active adapter
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "b", adapter_name="b")
    with ema.swapped(model):
        expected = logits(model)
    assert torch.allclose(logits(loaded), expected, atol=1e-6, rtol=0)


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


def test_merge_inside_a_swap_leaves_the_base_as_it_was():
    model = lora(tiny_llama())
    ema = polyak.EMA(model, decay=0.5)
    train(model, ema, steps=2)
    before, live = base_weights(model), logits(model)
    with ema.swapped(model):
        unmerged = logits(model)
        model.merge_adapter()
        assert torch.allclose(logits(model), unmerged, atol=1e-5)  # merged: the same average
    for n, v in base_weights(model).items():
        assert torch.equal(v, before[n]), n
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
    assert torch.equal(logits(model), live)
    model.merge_adapter()  # and PEFT's own merge/unmerge afterwards still round-trips
    model.unmerge_adapter()
    for n, v in base_weights(model).items():
        assert torch.allclose(v, before[n], atol=1e-6), n


def test_a_model_merged_before_the_swap_evaluates_the_average_and_comes_back_merged():
    model = lora(tiny_llama())
    ema = polyak.EMA(model, decay=0.5)
    train(model, ema, steps=2)
    with ema.swapped(model):
        expected = logits(model)
    model.merge_adapter()
    merged = base_weights(model)
    with ema.swapped(model):
        assert torch.allclose(logits(model), expected, atol=1e-5)
    for n, v in base_weights(model).items():
        assert torch.equal(v, merged[n]), n  # bit for bit, merged with the live adapter
    assert all(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
    with pytest.raises(TypeError, match="unmerge_adapter"):
        ema.get_module()


def test_a_failed_swap_unmerges_nothing(monkeypatch):
    """All or nothing: the swap fails after the merged adapters were taken out of the base."""
    import polyak._torch.ema as ema_module

    model = lora(tiny_llama())
    ema = polyak.EMA(model, decay=0.5)
    train(model, ema, steps=1)
    model.merge_adapter()
    merged = base_weights(model)

    def failing(*args, **kwargs):
        raise MemoryError("injected")

    monkeypatch.setattr(ema_module, "swap_in", failing)
    with pytest.raises(MemoryError):
        ema.apply_shadow()
    for n, v in base_weights(model).items():
        assert torch.equal(v, merged[n]), n
    assert all(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))


def test_lora_scaling_is_read_from_the_model():
    """LoRA's ``scaling`` is a dict outside the state dict: the swap reads the model's own, and
    a module made by get_module() is made again when it changed."""
    model = lora(tiny_llama())
    ema = polyak.EMA(model, decay=0.5)
    train(model, ema, steps=2)
    module = ema.get_module()
    with ema.swapped(model):
        assert torch.allclose(logits(module), logits(model), atol=1e-6)
    for m in model.modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            m.set_scale("default", 0.25)
    train(model, ema, steps=1)
    with ema.swapped(model):
        assert torch.allclose(logits(ema.get_module()), logits(model), atol=1e-6)
    assert ema.get_module() is not module
