"""The decoder step's own math against what it replaces: RowLora against PEFT's adapter_names (adapters of different
ranks and layers, base rows, an adapter replaced under the same name), the packed output projection against
the plain one, and the fused RMS norm against T5's."""
import os
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import T5Config, T5ForConditionalGeneration

from peft_t5.modeling import tiny_model
from peft_t5.serve.module_runner import BASE_ADAPTER, DORA_SCALES, ModuleRunner, PackedHead, RowLora, linear, norm

NAMES = ["one", "two", BASE_ADAPTER, "two", "one"]


def randomised(model, seed: int, adapter: str = ""):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and f".{adapter}" in name:
                param.normal_(0, 0.3)
    return model


@pytest.fixture()
def mixed():
    """Adapter "one": r=4 on q and v; "two": r=8 on every linear layer."""
    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]), adapter_name="one")
    model.add_adapter("two", LoraConfig(r=8, lora_alpha=4, target_modules="all-linear"))
    return randomised(model, 0).eval()


def layers(model, name: str):
    t5 = model.get_base_model()
    attention = t5.decoder.block[0].layer[0].SelfAttention
    return {"q": attention.q, "k": attention.k, "wi": t5.decoder.block[0].layer[-1].DenseReluDense.wi_0}[name]


@pytest.mark.parametrize("layer", ["q", "k", "wi"])  # both adapters; "two" only; (q: rows of 3 kinds)
@pytest.mark.parametrize("shape", [(5, 1, 64), (5, 7, 64), (5, 64)])
def test_row_lora_gives_what_peft_adapter_names_give(mixed, layer, shape):
    module, x = layers(mixed, layer), torch.randn(*shape[:-1], 128)
    with torch.inference_mode():
        ours, peft = linear(module, x, RowLora(NAMES, x.device)), module(x, adapter_names=NAMES)
        base = module.base_layer(x)
    torch.testing.assert_close(ours, peft, rtol=1e-5, atol=1e-5)
    assert (ours[2] - base[2]).abs().max() == 0 and (ours[1] - base[1]).abs().max() > 1e-2  # base row; "two"


def test_one_adapter_for_every_row_and_only_base_rows(mixed):
    module, x = layers(mixed, "q"), torch.randn(3, 1, 128)
    with torch.inference_mode():
        for names in (["two"] * 3, [BASE_ADAPTER] * 3):
            torch.testing.assert_close(RowLora(names, x.device).forward(module, x),
                                       module(x, adapter_names=names), rtol=1e-5, atol=1e-5)


def test_stacked_adapters_follow_an_adapter_replaced_under_the_same_name(mixed):
    module, x = layers(mixed, "q"), torch.randn(5, 1, 128)
    with torch.inference_mode():
        before = RowLora(NAMES, x.device).forward(module, x)
    mixed.delete_adapter("two")
    mixed.add_adapter("two", LoraConfig(r=2, lora_alpha=2, target_modules="all-linear"))
    randomised(mixed, 1, "two").eval()
    with torch.inference_mode():
        after = RowLora(NAMES, x.device).forward(module, x)  # the layer's kept stack must not give the old "two"
        torch.testing.assert_close(after, module(x, adapter_names=NAMES), rtol=1e-5, atol=1e-5)
    assert (after[1] - before[1]).abs().max() > 1e-2
    torch.testing.assert_close(after[0], before[0], rtol=1e-5, atol=1e-5)  # "one" kept


def test_the_packed_output_projection_gives_the_plain_logits():
    head = torch.nn.Linear(512, 3000, bias=False)
    packed = PackedHead.of(head)
    assert packed is not None and packed.fits(head)
    h = torch.randn(8, 512)
    with torch.inference_mode():
        torch.testing.assert_close(packed(h), head(h), rtol=1e-4, atol=1e-4)
        assert torch.equal(packed(h).argmax(-1), head(h).argmax(-1))
    assert not packed.fits(torch.nn.Linear(512, 3000, bias=False))  # the model's projection replaced: not used
    assert PackedHead.of(head) is packed  # packed once per model, not once per runner
    head.weight = torch.nn.Parameter(torch.randn(3000, 512))
    repacked = PackedHead.of(head)
    assert repacked is not packed and repacked.fits(head) and not packed.fits(head)
    with torch.inference_mode():
        torch.testing.assert_close(repacked(h), head(h), rtol=1e-4, atol=1e-4)
    assert PackedHead.of(torch.nn.Linear(512, 8, bias=False).to(torch.bfloat16)) is None
    assert PackedHead.of(torch.nn.Linear(4, 4)) is None  # with a bias


def test_the_fused_norm_equals_t5s_bit_for_bit():
    layer = tiny_model().decoder.final_layer_norm
    with torch.no_grad():
        layer.weight.normal_()
    h = torch.randn(4, 3, layer.weight.shape[0]) * 5
    assert torch.equal(norm(layer, h), layer(h)) and not torch.equal(F.rms_norm(h, layer.weight.shape), layer(h))


def test_slots_grown_mid_decoding_keep_every_active_rows_state(mixed):
    """Rows, self-attention length and source length all outgrow a runner's first slots while rows decode (the
    slots are then grown layer by layer, in place): the logits equal a runner that never had to grow."""
    def decode(runner: ModuleRunner) -> list[torch.Tensor]:
        logits, tokens, names = [], torch.zeros(1, dtype=torch.long), ["one"]
        runner.add([[5, 6, 1]], names)
        for step in range(20):
            if step == 3:  # two more rows, with sources longer than the first slots
                runner.add([list(range(3, 40)) + [1], list(range(7, 30)) + [1]], ["two", BASE_ADAPTER])
                names, tokens = names + ["two", BASE_ADAPTER], torch.cat((tokens, torch.zeros(2, dtype=torch.long)))
            logits.append(runner.step(tokens, names))
            tokens = logits[-1].argmax(-1)
        return logits

    small = ModuleRunner(mixed, capacity=1)
    first_slots = small.capacity
    large = ModuleRunner(mixed, capacity=4)
    large._allocate(4, 32, 64)
    grown, kept = decode(small), decode(large)
    assert small.capacity > first_slots and all(a > b for a, b in zip(small.capacity, first_slots))
    for a, b in zip(grown, kept):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def pages_written(tensor: torch.Tensor) -> tuple[int, int]:
    """(pages of the tensor's memory the OS has given it, pages it spans), from /proc/self/pagemap's present bit."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr() // page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size() - 1) // page + 1
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start * 8)
        entries = f.read((end - start) * 8)
    return sum(entry >> 63 for (entry,) in struct.iter_unpack("<Q", entries)), end - start


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="Linux's /proc/self/pagemap")
@pytest.mark.parametrize("kind", ["module", "static"])
def test_the_caches_take_memory_for_the_positions_rows_have_written_only(kind):
    """Either runner's attention caches are lazily zeroed (quantize.lazily_zeroed): a row's positions past its source
    (or past the tokens it has decoded) take no memory, as the rows no request holds. One 400-token source beside 11 of 10
    tokens: the cross-attention keys of a layer hold a fifth of their pages, after the slots grew (only what rows
    wrote is copied) and after the long row left (the last row moved into its slot, its positions only); the rows
    decode exactly as in a runner that never held the long one (what it left in the slot is masked)."""
    from peft_t5.serve.t5_runner import T5Runner

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=512, d_kv=64, num_heads=8, num_layers=1, d_ff=64, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()  # t5-small's heads: a position is 256 bytes of a row's head
    runner, fresh = ((ModuleRunner if kind == "module" else T5Runner)(model, capacity=8) for _ in range(2))
    short = [[3 + i] * 9 + [1] for i in range(11)]
    runner.add([list(range(2, 62)) * 6 + [1] * 40] + short[:7], None, budgets=[4] * 8)
    assert runner.capacity[2] >= 400
    written, spanned = pages_written(runner.cross_k[0])
    assert written < spanned / 5, (written, spanned)
    runner.add(short[7:], None, budgets=[4] * 4)  # past 8 rows: grown, and the rows' positions copied
    written, spanned = pages_written(runner.cross_k[0])
    assert runner.capacity[0] == 16 and written < spanned / 5, (written, spanned)
    runner.remove(0)
    assert pages_written(runner.cross_k[0])[0] <= written
    fresh.add([short[10]] + short[:10], None, budgets=[4] * 11)  # the order remove() left them in
    tokens = torch.zeros(11, dtype=torch.long)
    for _ in range(3):
        logits = runner.step(tokens, None)
        assert torch.equal(logits, fresh.step(tokens, None))
        tokens = logits.argmax(-1)


@pytest.mark.parametrize("kind", ["module", "static"])
def test_an_idle_runners_slots_go_back_to_their_first_size_and_new_rows_decode_as_in_a_fresh_runner(
        mixed, monkeypatch, kind):
    """An idle server holds its first small slots, not those its largest burst grew (t5-small, 32 SQuAD rows: 403 MB
    of cross-attention caches); rows that come later grow them again and decode exactly as in a runner never grown."""
    from peft_t5.serve import module_runner, t5_runner

    trims = []
    monkeypatch.setattr(module_runner, "return_freed_memory", lambda: trims.append(1))
    runners = [ModuleRunner(mixed, capacity=1) if kind == "module" else t5_runner.T5Runner(mixed, capacity=1)
               for _ in range(2)]
    runner, fresh = runners
    first = runner.capacity
    runner.add([list(range(3, 40)) + [1], [5, 6, 1], [7, 8, 9, 1]], ["one", "two", BASE_ADAPTER], budgets=[20] * 3)
    grown = runner.capacity
    assert grown[0] >= 3 and grown[2] >= 38
    runner.remove(2)
    runner.remove(1)
    module_runner.release_when_idle(runner)
    assert runner.capacity == grown  # a row still decodes in them
    runner.remove(0)
    before = len(trims)
    module_runner.release_when_idle(runner)
    assert runner.capacity == first and len(trims) == before + 1
    for r in runners:
        r.add([[4, 5, 6, 7, 1], [9, 1]], ["two", "one"], budgets=[4, 4])
    tokens = torch.zeros(2, dtype=torch.long)
    for _ in range(4):
        logits = [r.step(tokens, ["two", "one"]) for r in runners]
        assert torch.equal(*logits)
        tokens = logits[0].argmax(-1)


def test_a_dora_layer_with_its_kept_scale_gives_what_peft_gives():
    """With and without a bias; the scale is kept across calls and made again when the adapter is replaced."""
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 8, bias=False)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1"], use_dora=True))
    randomised(model, 0).eval()
    with torch.no_grad():
        for layer in model.base_model.model:
            layer.lora_magnitude_vector["default"].weight.mul_(1.5)
    x = torch.randn(3, 2, 16)
    with torch.inference_mode():
        first, second = model.base_model.model
        h = linear(first, x, None)
        assert torch.equal(h, first(x)) and torch.equal(linear(second, h, None), second(h))
        kept = DORA_SCALES[first]
        assert linear(first, x, None) is not None and DORA_SCALES[first] is kept
        assert (h - first.base_layer(x)).abs().max() > 1e-2  # the adapter does something
    model.delete_adapter("default")
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["0"], use_dora=True))
    model.set_adapter("other")
    randomised(model, 1, "other").eval()
    with torch.inference_mode():
        assert torch.equal(linear(first, x, None), first(x)) and DORA_SCALES[first] is not kept
