"""The compiled decoder step and encoder against the eager ones they replace: cross-attention keys and values and
logits within 1e-4 and greedy tokens identical on real-shaped random weights (t5-small's widths), every kind of
request through an engine, adapters loaded and unloaded without recompiling, a graph not compiled yet (the eager
step answers meanwhile), int8 (as close to float32 as its eager step), and the kernels kept on disk. Compiling
takes seconds: these tests are slow."""
import asyncio
import itertools
import os
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_quantize import onednn_matmuls
from transformers import T5Config, T5ForConditionalGeneration

from peft_t5 import kernels
from peft_t5.adapters import save_adapter
from peft_t5.bank import AdapterBank
from peft_t5.modeling import add_lora, tiny_model, tiny_tokenizer
from peft_t5.quantize import quantize_int8
from peft_t5.serve.compiled import COMPILE_NICE, COMPILE_SWITCH_INTERVAL, CompiledStep, part_of
from peft_t5.serve.decoding import Sampling
from peft_t5.serve.engine import Engine
from peft_t5.serve.t5_runner import T5Runner, cache_dtype

pytestmark = pytest.mark.slow
SOURCES = ["why did the chicken cross the road", "what is the capital of france and why is it so very big today",
           "hello", "question: a b c d e f g h i j k", "Where is Normandy? context: Normandy is a region in France."]


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def lockstep(eager: T5Runner, compiled: T5Runner, sources, names, steps: int) -> None:
    """Both runners encode the same rows (cross-attention keys and values within 1e-4) and decode them greedily;
    every step's logits agree within 1e-4 and so do the tokens."""
    for runner in (eager, compiled):
        runner.add(sources, names, budgets=[steps] * len(sources))
    for expected, got in zip(eager.cross_k + eager.cross_v, compiled.cross_k + compiled.cross_v):
        torch.testing.assert_close(got[:len(sources)], expected[:len(sources)], rtol=0, atol=1e-4)
    tokens = torch.zeros(len(sources), dtype=torch.long)
    for _ in range(steps):
        expected, got = eager.step(tokens), compiled.step(tokens)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
        tokens = expected.argmax(-1)
    for runner in (eager, compiled):
        while runner.n:
            runner.remove(runner.n - 1)


def t5_small_wide_with_two_adapters():
    """t5-small's widths (2 layers, to compile in seconds) with LoRA adapters "a" (r 16 on q, v) and "b" (r 8 on q,
    k, wi, wo), their B not zero."""
    config = T5Config(d_model=512, d_kv=64, d_ff=2048, num_heads=8, num_layers=2, vocab_size=32128,
                      feed_forward_proj="relu", decoder_start_token_id=0)
    torch.manual_seed(0)
    model = get_peft_model(T5ForConditionalGeneration(config).eval(), LoraConfig(r=16, lora_alpha=32,
                                                                                 target_modules=["q", "v"]), "a")
    model.add_adapter("b", LoraConfig(r=8, lora_alpha=16, target_modules=["q", "k", "wi", "wo"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.eval()


def test_the_compiled_step_answers_as_the_eager_one_on_real_shaped_random_weights():
    """t5-small's widths (d_model 512, 8 heads, d_ff 2048, its 32,128 tokens; 2 layers, to compile in seconds), two
    LoRA adapters of different ranks and layers mixed per row with the base: the one-row graphs and the others, of
    the decoder step and of the encoder."""
    model = t5_small_wide_with_two_adapters()
    compiled = CompiledStep()
    eager, fast = T5Runner(model), T5Runner(model, compiled=compiled)
    fast.warm(["a", "b"])
    compiled.wait()
    assert not compiled.failed and sorted((part_of(module), kind) for module, kind in compiled.ready) == [
        ("encoder", "many"), ("encoder", "one"), ("step", "many"), ("step", "one")]
    sources = [list(range(5, 5 + n)) + [1] for n in (30, 7, 18, 3, 25)]
    with torch.inference_mode():
        lockstep(eager, fast, sources[:1], ["b"], 12)  # one row
        lockstep(eager, fast, sources, ["a", "b", "__base__", "b", "a"], 12)  # several
        lockstep(eager, fast, [sources[1], list(range(40, 47)) + [1]], ["a", "b"], 2)  # encoded together
    assert compiled.steps == {"compiled": 26, "eager": 0}
    assert compiled.encodes["eager"] == 0 and compiled.encodes["compiled"] >= 3
    if kernels.attention_problem() is None:  # the checks above were of peft-t5's attention kernel (several rows)
        with torch.inference_mode():
            for rows, calls in ((3, 2), (1, 0)):
                fast.add(sources[:rows], ["a", "b", "a"][:rows], budgets=[4] * rows)
                with torch.profiler.profile() as profile:
                    fast.step(torch.zeros(rows, dtype=torch.long))
                ran = [event.name for event in profile.events()]
                assert ran.count("peft_t5::decode_self_attention") == ran.count("peft_t5::decode_attention") == calls
                while fast.n:
                    fast.remove(fast.n - 1)


def small_compiled_runners():
    """A small LoRA-wrapped T5 (seeded), an eager runner over it and one whose step and encoder are compiled (ready)."""
    config = T5Config(d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, vocab_size=300,
                      feed_forward_proj="relu", decoder_start_token_id=0)
    torch.manual_seed(0)
    model = get_peft_model(T5ForConditionalGeneration(config).eval(), LoraConfig(r=4, target_modules=["q", "v"]))
    compiled = CompiledStep()
    eager, fast = T5Runner(model), T5Runner(model, compiled=compiled)
    fast.warm(["default"])
    compiled.wait()
    assert not compiled.failed
    return model, compiled, eager, fast


def test_a_float32_one_row_graph_reads_the_bases_weights_rather_than_a_frozen_copy_of_them(monkeypatch):
    """Where the step's layers take no tiles (Intel's CPUs, PEFT_T5_F32_TILES=off, no AVX-512), the one-row graph of
    a float32 base is not frozen (no prepacked copy of the decoder): a weight changed in place changes its answer as it
    changes the eager step's. The step of several rows reads them as they are at 2-4 rows (peft-t5's kernel,
    f32_rows) and past 4 takes a copy oneDNN laid out, the same graph deciding as it runs."""
    if kernels.kernel_problem() is not None:  # a row's products then take oneDNN's copy too (t5_runner.Linear)
        pytest.skip(f"peft-t5's float32 kernel is not used here: {kernels.kernel_problem()}")
    monkeypatch.setattr(kernels, "f32_tiles_problem", lambda: "PEFT_T5_F32_TILES=off")
    model, compiled, eager, fast = small_compiled_runners()
    source = [list(range(5, 25)) + [1]]
    with torch.inference_mode():
        lockstep(eager, fast, source, ["default"], 3)
        before = fast.weights.decoder[1].wo.weight.clone()
        fast.weights.decoder[1].wo.weight.mul_(3.0)  # the model's own weight: the step's is the same tensor
        try:
            assert torch.equal(model.get_base_model().decoder.block[1].layer[2].DenseReluDense.wo.weight,
                               fast.weights.decoder[1].wo.weight)
            lockstep(eager, fast, source, ["default"], 3)
            for rows in (2, 3):  # 2 rows, then 5
                fast.add(source * rows, ["default"] * rows, budgets=[3] * rows)
                eager.add(source * rows, ["default"] * rows, budgets=[3] * rows)
                tokens = torch.zeros(fast.n, dtype=torch.long)
                with torch.profiler.profile() as profile:
                    fast_logits = fast.step(tokens)
                ran = [event.name for event in profile.events()]
                close = torch.allclose(fast_logits, eager.step(tokens), atol=1e-4)
                assert ran.count("peft_t5::f32_rows") == 6 * len(fast.weights.decoder) + 1
                assert ("peft_t5::onednn_float_linear" in ran) == (fast.n > 4)
                assert close == (fast.n <= 4)  # oneDNN's copy was laid out before the change
        finally:
            fast.weights.decoder[1].wo.weight.copy_(before)
        if kernels.kernel_problem() is None:  # the one-row graph's products: peft-t5's float32 kernel, MKL's none
            while fast.n > 1:
                fast.remove(fast.n - 1)
            with torch.profiler.profile() as profile:
                fast.step(tokens[:1])
            ran = [event.name for event in profile.events()]
            assert ran.count("peft_t5::f32_matvec") == 6 * len(fast.weights.decoder) + 1
            assert not {"aten::mm", "aten::addmm", "aten::linear"} & set(ran)
    assert compiled.steps["eager"] == 0


def test_where_tiles_are_allowed_every_float32_product_of_the_compiled_step_is_f32_tiles_and_answers_as_eager():
    """On an AVX-512 CPU not Intel's (kernels.f32_tiles_problem), the compiled step's products of one row and of
    several all take peft-t5's f32_tiles over the packed copies (no f32_matvec, f32_rows, oneDNN or MKL product left),
    and its logits stay within 1e-4 of the eager step's, its greedy tokens the same."""
    if kernels.f32_tiles_problem() is not None:
        pytest.skip(f"the float32 step takes no tiles here: {kernels.f32_tiles_problem()}")
    model, compiled, eager, fast = small_compiled_runners()
    source = [list(range(5, 25)) + [1]]
    with torch.inference_mode():
        for rows in (1, 5):
            lockstep(eager, fast, source * rows, ["default"] * rows, 3)
            fast.add(source * rows, ["default"] * rows, budgets=[2] * rows)
            with torch.profiler.profile() as profile:
                fast.step(torch.zeros(rows, dtype=torch.long))
            ran = [event.name for event in profile.events()]
            assert ran.count("peft_t5::f32_tiles") == 6 * len(fast.weights.decoder) + 1, rows
            assert not {"peft_t5::f32_matvec", "peft_t5::f32_rows", "peft_t5::onednn_float_linear", "aten::mm",
                        "aten::addmm", "aten::linear"} & set(ran), rows
            while fast.n:
                fast.remove(fast.n - 1)
    assert compiled.steps["eager"] == 0


def test_a_bfloat16_bases_compiled_graphs_answer_as_its_eager_step_on_weights_held_by_number():
    """bfloat16's graphs were frozen (oneDNN's prepacked copies inside them); where peft-t5's library loads, their
    products take copies held by number instead: the same logits as the eager step (bfloat16's rounding apart), the
    same greedy tokens, every product of the compiled step oneDNN's on a held weight."""
    from peft_t5.modeling import bf16_supported

    if not bf16_supported():  # oneDNN lays out no bfloat16 weight there, and serve refuses --dtype bfloat16
        pytest.skip("this CPU has neither AVX512-BF16 nor AMX (or torch is held below AVX-512)")
    config = T5Config(d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, vocab_size=300,
                      feed_forward_proj="relu", decoder_start_token_id=0)
    torch.manual_seed(0)
    base = T5ForConditionalGeneration(config).eval().to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q", "v"]))
    compiled = CompiledStep()
    eager, fast = T5Runner(model), T5Runner(model, compiled=compiled)
    fast.warm(["default"])
    compiled.wait()
    assert not compiled.failed and len(compiled.ready) == 4
    sources = [list(range(5, 5 + n)) + [1] for n in (20, 6, 13)]
    with torch.inference_mode():
        for runner in (eager, fast):
            runner.add(sources, ["default", "__base__", "default"], budgets=[4] * 3)
        tokens = torch.zeros(3, dtype=torch.long)
        for _ in range(4):
            expected = eager.step(tokens)
            with torch.profiler.profile() as profile:
                got = fast.step(tokens)
            assert (got - expected).norm() < 0.02 * expected.norm() and torch.equal(got.argmax(-1), expected.argmax(-1))
            tokens = expected.argmax(-1)
    assert compiled.steps == {"compiled": 4, "eager": 0} and fast.weights.held == (kernels.onednn_problem() is None)
    if fast.weights.held:
        ran = [event.name for event in profile.events()]
        assert ran.count("peft_t5::onednn_float_linear") == 6 * len(fast.weights.decoder) + 1
        assert not {"aten::mm", "aten::addmm", "aten::linear"} & set(ran)


def test_a_float32_encoder_takes_onednns_held_copies_except_on_intel_cpus(monkeypatch):
    """Where MKL's float32 products are not on their home CPU, the encoder's and the cross-attention K/V's products
    take oneDNN's copies held by number (no aten::mm left; the eager pass here, and the compiled graphs call the same
    layers); on Intel's, the weights as they are. The encoder's output either way within 1e-5 of the unheld one's."""
    from peft_t5.serve.t5_runner import T5Weights

    if kernels.onednn_problem() is not None:
        pytest.skip(f"oneDNN holds no weight here: {kernels.onednn_problem()}")
    config = T5Config(d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, vocab_size=300,
                      feed_forward_proj="relu", decoder_start_token_id=0)
    torch.manual_seed(0)
    model = get_peft_model(T5ForConditionalGeneration(config).eval(), LoraConfig(r=4, target_modules=["q", "v"]))
    ids = torch.randint(5, 300, (3, 9))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 6:] = False
    slots = torch.zeros(3, dtype=torch.long)
    with torch.inference_mode():
        expected = T5Weights(model).encode(ids, mask, {}, slots)
        for intel in (True, False):
            monkeypatch.setattr(kernels, "intel_cpu", lambda: intel)
            weights = T5Weights(model, hold_float=True)
            layers = [m for b in weights.encoder for m in (b.qkv, b.o, b.wi, b.wo)] + [b.ckv for b in weights.decoder]
            assert [layer.held is None for layer in layers] == [intel] * len(layers)
            for step_layer in (weights.head, weights.decoder[0].qkv):  # the step's: always a copy, oneDNN's or tiles
                tiled = kernels.f32_tiles_problem() is None
                assert (step_layer.held is None, step_layer.tiles is not None) == (tiled, tiled)
            with torch.profiler.profile() as profile:
                hidden = weights.encode(ids, mask, {}, slots)
                weights.cross(0, hidden, {}, slots)
            ran = [event.name for event in profile.events()]
            assert ran.count("peft_t5::onednn_float_linear") == (0 if intel else 4 * len(weights.encoder) + 1)
            assert ("aten::mm" in ran or "aten::addmm" in ran) == intel
            torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-5)
    assert kernels.kernels_used(torch.device("cpu")).count("a float32 encoder's products oneDNN's") == 1


def padded_rows(m: int) -> int:
    """onednn_held.cpp's padded_rows: counts past 64 up to one of 16 sizes an octave."""
    size = (1 << (m.bit_length() - 1)) // 16
    return m if m <= 64 else -(-m // size) * size


def test_onednn_is_given_few_row_counts_and_every_rows_product_stays_exact(capfd):
    """oneDNN builds and keeps a product for each row count it is given (~0.5 MB each, up to 1,024): an encoder fed
    prompts of every length grew a server by ~440 MB. Past 64 rows (the step's counts are kept) the held products pad
    the rows to one of 16 sizes an octave: counts 1-400 reach oneDNN as 105 sizes, and each row's product is as exact
    as before, float32 and int8 (whose sums are exact: equal to the integer product)."""
    if kernels.onednn_problem() is not None:
        pytest.skip(f"oneDNN's products take no held weights here: {kernels.onednn_problem()}")
    from peft_t5.quantize import Int8Linear

    torch.manual_seed(0)
    weight, x = torch.randn(64, 96) * 0.1, torch.randn(400, 96)
    number = torch.ops.peft_t5.onednn_float_pack(weight, 16)
    layer = Int8Linear(weight)
    q = torch.randint(0, 256, (400, 96), dtype=torch.uint8)
    exact_int8 = (q.double() - 128) @ layer.weight.double().t() * layer.weight_scale.double()
    exact = x.double() @ weight.double().t()
    try:
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            for m in range(1, 401):
                y = torch.ops.peft_t5.onednn_float_linear(x[:m], number, 64)
                assert y.shape == (m, 64) and y.is_contiguous()
                assert float((y - exact[:m]).abs().max()) < 1e-4, m
                if m in (65, 67, 130, 399):
                    z = torch.ops.peft_t5.onednn_int8_matmul(q[:m], layer.onednn_number(), layer.weight_scale,
                                                             layer.weight_zero_point)
                    assert z.shape == (m, 64) and torch.allclose(z.double(), exact_int8[:m], rtol=1e-6), m
        ran = capfd.readouterr().out
    finally:
        torch.ops.peft_t5.onednn_release(number)
    counts = {int(line.split(",mb")[1].split("ic")[0]) for line in ran.splitlines() if ",exec,cpu,inner_product," in line}
    assert counts == {padded_rows(m) for m in range(1, 401)} and len(counts) == 105
    assert padded_rows(65) == 68 and padded_rows(399) == 400 and padded_rows(4000) == 4096


def test_the_float32_kernels_of_1_to_4_rows_are_as_close_to_float64_as_mkls_product():
    """peft-t5's float32 products of one row (f32_matvec) and of 2-4 (f32_rows) sum in another order than MKL's: as
    exact, on widths with and without a tail past 16 floats, output counts with and without one past 4; past 4 rows
    f32_rows gives oneDNN's product over the held copy, exactly; a weight that is not one block is refused."""
    if kernels.kernel_problem() is not None or kernels.onednn_problem() is not None:
        pytest.skip(f"peft-t5's kernels are not used here: {kernels.kernel_problem() or kernels.onednn_problem()}")
    torch.manual_seed(0)
    for k, n in [(512, 512), (70, 5), (2048, 513), (1, 1), (512, 32128)]:
        weight = torch.randn(n, k) * 0.05
        number = torch.ops.peft_t5.onednn_float_pack(weight, 16)
        try:
            for rows in (1, 2, 3, 4, 5):
                x = torch.randn(rows, k)
                exact = x.double() @ weight.double().t()
                ours = (torch.ops.peft_t5.f32_matvec(x, weight) if rows == 1
                        else torch.ops.peft_t5.f32_rows(x, weight, number, n))
                if rows == 5:
                    assert torch.equal(ours, torch.ops.peft_t5.onednn_float_linear(x, number, n))
                    continue
                mkl = torch.nn.functional.linear(x, weight)
                assert float((ours - exact).abs().max()) <= 2 * float((mkl - exact).abs().max()) + 1e-6, (k, n, rows)
        finally:
            torch.ops.peft_t5.onednn_release(number)
    with pytest.raises(RuntimeError, match="weight must be a contiguous"):
        torch.ops.peft_t5.f32_matvec(torch.randn(1, 4), torch.randn(4, 8).t())
    with pytest.raises(RuntimeError, match="f32_rows: weight must be a contiguous"):
        torch.ops.peft_t5.f32_rows(torch.randn(2, 4), torch.randn(4, 8).t(), 0, 8)


def test_the_float32_tiles_are_as_close_to_float64_as_mkls_product_at_any_rows_and_refuse_a_foreign_layout():
    """f32_tiles (several rows of the float32 step over kernels.pack_f32's copy) sums each output over its inputs in
    order: as exact as MKL's product at 2-70 rows (a tile of 8, its remainders, past a chunk of 64), outputs with and
    without a tail past 16 and past 48, 1-2048 inputs; the packed copy is the weight, block by block; a copy of another
    shape is refused, before anything is computed."""
    problem = kernels.kernel_problem() or kernels.cpu_lacks("AVX-512")
    if problem is not None:
        pytest.skip(f"f32_tiles needs peft-t5's kernels and AVX-512: {problem}")
    torch.manual_seed(0)
    for k, n in [(512, 512), (70, 5), (2048, 513), (1, 1), (512, 1536), (96, 49)]:  # k inputs, n outputs
        weight = torch.randn(n, k) * 0.05
        packed = kernels.pack_f32(weight)
        assert packed.shape == ((n + 15) // 16, k, 16)
        assert torch.equal(packed.transpose(1, 2).reshape(-1, k)[:n], weight)
        assert not packed.transpose(1, 2).reshape(-1, k)[n:].any()  # the padding: zeros
        for rows in (2, 7, 8, 13, 64, 70):
            x = torch.randn(rows, k)
            exact = x.double() @ weight.double().t()
            ours, mkl = torch.ops.peft_t5.f32_tiles(x, packed, n), torch.nn.functional.linear(x, weight)
            assert ours.shape == (rows, n)
            assert float((ours - exact).abs().max()) <= 2 * float((mkl - exact).abs().max()) + 1e-6, (k, n, rows)
    head = torch.randn(32128, 512) * 0.05  # T5's output layer, its rows one by one as the whole
    x = torch.randn(9, 512)
    whole = torch.ops.peft_t5.f32_tiles(x, kernels.pack_f32(head), 32128)
    assert torch.equal(whole[4:5], torch.ops.peft_t5.f32_tiles(x[4:5], kernels.pack_f32(head), 32128))
    torch.testing.assert_close(whole, x @ head.t(), rtol=0, atol=1e-4)
    with pytest.raises(RuntimeError, match="f32_tiles: packed must be kernels.pack_f32's"):
        torch.ops.peft_t5.f32_tiles(torch.randn(2, 64), kernels.pack_f32(torch.randn(16, 32)), 16)
    with pytest.raises(RuntimeError, match="f32_tiles: out_features does not fit the packed weight's 2 blocks"):
        torch.ops.peft_t5.f32_tiles(torch.randn(2, 32), kernels.pack_f32(torch.randn(20, 32)), 40)


def test_the_float32_steps_layers_take_tiles_where_allowed_and_onednns_copies_on_intel_or_switched_off(monkeypatch):
    """f32_tiles_problem: on an AVX-512 CPU not Intel's the step's layers are packed for f32_tiles and oneDNN holds
    none of them; on Intel's (unmeasured there) oneDNN's copies unless PEFT_T5_F32_TILES=on; =off, oneDNN's anywhere.
    The log and /metrics say which."""
    problem = kernels.kernel_problem() or kernels.cpu_lacks("AVX-512") or kernels.onednn_problem()
    if problem is not None:  # (without oneDNN's held copies, the compiled graphs freeze the weights: no tiles either)
        pytest.skip(f"f32_tiles needs peft-t5's kernels, AVX-512 and weights held by number: {problem}")
    for intel, switch, problem in [(False, None, None), (True, None, "an Intel CPU: oneDNN's held copies"),
                                   (True, "on", None), (False, "off", "PEFT_T5_F32_TILES=off")]:
        monkeypatch.setattr(kernels, "intel_cpu", lambda: intel)
        if switch is None:
            monkeypatch.delenv("PEFT_T5_F32_TILES", raising=False)
        else:
            monkeypatch.setenv("PEFT_T5_F32_TILES", switch)
        found = kernels.f32_tiles_problem.__wrapped__()
        assert (found is None) if problem is None else found.startswith(problem), (intel, switch, found)
    config = T5Config(d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, vocab_size=300,
                      feed_forward_proj="relu", decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval().requires_grad_(False)  # frozen, as a served base is
    from peft_t5.serve.t5_runner import T5Weights
    for tiles in (True, False):
        monkeypatch.setattr(kernels, "f32_tiles_problem", lambda: None if tiles else "PEFT_T5_F32_TILES=off")
        weights = T5Weights(model, hold_float=True)
        step_layers = [weights.head] + [getattr(b, name) for b in weights.decoder for name in ("qkv", "o", "cq", "co",
                                                                                                 "wi", "wo")]
        assert all((layer.tiles is not None, layer.held is None) == (tiles, tiles) for layer in step_layers)
        x = torch.randn(5, 64)
        with torch.inference_mode(), torch.profiler.profile() as profile:
            y = weights.head(x)
        ran = [event.name for event in profile.events()]
        assert ("peft_t5::f32_tiles" in ran) == tiles
        torch.testing.assert_close(y, x @ weights.head.weight.t(), rtol=0, atol=1e-4)
        said = kernels.kernels_used(torch.device("cpu"))
        assert ("float32 products of the compiled step over packed copies" in said) == tiles


def masked_bias(rows: int, heads: int, positions: int, generator, lengths=None) -> torch.Tensor:
    """A bias [rows, heads, 1, positions] of T5's kind: a random one per head, and each row's positions past its
    length (random where not given) masked with float32's least value."""
    bias = torch.randn(rows, heads, 1, positions, generator=generator)
    if lengths is None:
        lengths = torch.randint(1, positions + 1, (rows,), generator=generator)
    mask = torch.where(torch.arange(positions)[None] < lengths[:, None], 0.0, torch.finfo(torch.float32).min)
    return bias + mask[:, None, None, :]


def poisoned(caches: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A copy of the caches, cut from a buffer as large as theirs, with each row's positions from valid[r] on NaN: a
    kernel that read one would answer NaN."""
    rows, heads, positions, head_dim = caches.shape
    out = torch.empty(rows, heads, caches.stride(1) // head_dim, head_dim, dtype=caches.dtype)[:, :, :positions]
    out.copy_(caches)
    out.transpose(1, 2)[torch.arange(positions)[None, :] >= valid[:, None]] = float("nan")
    return out


def test_the_attention_kernel_answers_as_sdpa_over_cut_caches_and_writes_each_rows_new_key_at_its_length():
    """peft-t5's decode attention (the compiled step's, csrc/decode_attention.cpp) against SDPA: caches cut from
    larger buffers, positions with and without a tail past 16, 1 to 300 of them, head_dim 64 and 128, a bias per head
    or one for all and laid out across positions; each row reads no position past those it attends to (NaN there
    changes nothing); the self-attention op writes each row's new key and value at its length, and nothing else,
    before attending. Caches in float32 and in bfloat16 (an int8 base's, t5_runner.cache_dtype): the bfloat16 ones
    are attended to as SDPA does in float32 over the same values, and written rounded as torch rounds them."""
    if kernels.attention_problem() is not None:
        pytest.skip(f"peft-t5's attention kernel is not used here: {kernels.attention_problem()}")
    g = torch.Generator().manual_seed(0)
    F = torch.nn.functional
    cases = [(1, 8, 1, 64, 5, 1), (3, 8, 17, 64, 40, 8), (32, 8, 40, 64, 81, 1), (5, 16, 300, 64, 512, 16),
             (2, 4, 33, 128, 50, 1), (4, 8, 16, 64, 16, 8)]
    for dtype, (rows, heads, positions, head_dim, capacity, bias_heads) in itertools.product(
            (torch.float32, torch.bfloat16), cases):
        keys = torch.randn(rows, heads, capacity, head_dim, generator=g).to(dtype)[:, :, :positions]
        values = torch.randn(rows, heads, capacity, head_dim, generator=g).to(dtype)[:, :, :positions]
        q = torch.randn(rows, heads * head_dim, generator=g)
        valid = torch.randint(1, positions + 1, (rows,), generator=g)
        bias = masked_bias(rows, bias_heads, positions, g, valid)
        across = bias.transpose(1, 3).contiguous().transpose(1, 3)  # positions bias_heads floats apart
        expected = F.scaled_dot_product_attention(q.view(rows, heads, 1, head_dim), keys.float(), values.float(),
                                                  attn_mask=bias, scale=1.0).reshape(rows, heads * head_dim)
        for b in (bias, across):
            got = torch.ops.peft_t5.decode_attention(q, poisoned(keys, valid), poisoned(values, valid), b, valid)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        lengths = torch.randint(0, positions, (rows,), generator=g)
        bias = masked_bias(rows, bias_heads, positions, g, lengths + 1)
        qkv = torch.randn(rows, 3 * heads * head_dim, generator=g)  # k and v cut from one product, as the step's
        new_q, new_k, new_v = qkv.split(heads * head_dim, -1)
        mine_k, mine_v = poisoned(keys, lengths + 1), poisoned(values, lengths + 1)
        keys[torch.arange(rows), :, lengths] = new_k.reshape(rows, heads, head_dim).to(dtype)
        values[torch.arange(rows), :, lengths] = new_v.reshape(rows, heads, head_dim).to(dtype)
        expected = F.scaled_dot_product_attention(new_q.reshape(rows, heads, 1, head_dim), keys.float(),
                                                  values.float(), attn_mask=bias, scale=1.0).reshape(rows, -1)
        got = torch.ops.peft_t5.decode_self_attention(new_q, new_k, new_v, lengths, mine_k, mine_v, bias)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        for mine, theirs in ((mine_k, keys), (mine_v, values)):
            assert mine.dtype == dtype
            torch.testing.assert_close(mine, poisoned(theirs, lengths + 1), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(RuntimeError, match="keys and values must be float32 or bfloat16"):  # of one dtype
        torch.ops.peft_t5.decode_attention(torch.randn(1, 64), torch.randn(1, 1, 3, 64).bfloat16(),
                                           torch.randn(1, 1, 3, 64), torch.zeros(1, 1, 1, 3), torch.tensor([3]))
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128"):
        torch.ops.peft_t5.decode_attention(torch.randn(1, 32), *torch.randn(2, 1, 1, 3, 32), torch.zeros(1, 1, 1, 3),
                                           torch.tensor([3]))
    with pytest.raises(RuntimeError, match="valid must be int64"):
        torch.ops.peft_t5.decode_attention(torch.randn(1, 64), *torch.randn(2, 1, 1, 3, 64), torch.zeros(1, 1, 1, 3),
                                           torch.tensor([3, 3]))
    caches = torch.randn(2, 2, 1, 3, 64)
    written = caches.clone()
    with pytest.raises(RuntimeError, match="a length is past the caches"):  # and row 0's is not written either
        torch.ops.peft_t5.decode_self_attention(*torch.randn(3, 2, 64), torch.tensor([0, 3]), *written,
                                                torch.zeros(2, 1, 1, 3))
    with pytest.raises(RuntimeError, match="decode_self_attention: bias must be"):  # a bias of 2 positions, not 3
        torch.ops.peft_t5.decode_self_attention(*torch.randn(3, 2, 64), torch.tensor([0, 1]), *written,
                                                torch.zeros(2, 1, 1, 2))
    assert torch.equal(written, caches)


def test_the_attention_kernel_answers_as_sdpa_with_avx2_too():
    """The test above in a process with torch held to AVX2 (ATEN_CPU_CAPABILITY), as on a CPU without AVX-512: the
    kernel's AVX2 loops (csrc/decode_attention.cpp) answer as SDPA and refuse what they cannot take alike."""
    if not torch.cpu._is_avx2_supported() or kernels.build_problem() is not None:
        pytest.skip(f"peft-t5's AVX2 kernels cannot run here: {kernels.build_problem() or 'the CPU has no AVX2'}")
    test = f"{__file__}::test_the_attention_kernel_answers_as_sdpa_over_cut_caches_and_writes_each_rows_new_key_at_its_length"
    code = ("import sys, pytest, torch; from peft_t5 import kernels; assert kernels.attention_problem() is None; "
            "print(kernels.kernels_used(torch.device('cpu'))); sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
            f"'-p', 'no:xdist', '-o', 'addopts=', {test!r}]))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "compiled float32 attention peft-t5's (AVX2)" in out.stdout and "1 passed" in out.stdout


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny base with weights spread wide (greedy decoding then wanders over the vocabulary instead of repeating one
    token), and LoRA adapters on it: q_v (r 4 on q and v), wide (r 8 on every linear layer), q_v2 (like q_v)."""
    root = tmp_path_factory.mktemp("compiled")
    torch.manual_seed(0)
    base = tiny_model()
    with torch.no_grad():
        for name, param in base.named_parameters():
            if "layer_norm" not in name:
                param.normal_(0, 1.0 if "relative" in name else 0.2)
    base.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    for name, rank, targets, seed in (("q_v", 4, ["q", "v"], 1), ("wide", 8, ["all-linear"], 2),
                                      ("q_v2", 4, ["q", "v"], 3)):
        torch.manual_seed(seed)
        model = add_lora(T5ForConditionalGeneration.from_pretrained(root / "base"), r=rank, dropout=0.0,
                         target_modules=targets)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.3)
        save_adapter(model, tiny_tokenizer(), root / name, {"task": "jokes", "base_model": str(root / "base"),
                                                           "template": "{question}"}, "test adapter")
    return root


def requests() -> list[dict]:
    """One of each kind of request the engine decodes."""
    names = ["q_v", "wide", "base", "q_v", "wide"]
    return [dict(names=names, sources=SOURCES, max_new_tokens=14),
            dict(names=["wide", "q_v"], sources=SOURCES[:2], max_new_tokens=10, n=3,
                 sampling=Sampling(temperature=0.9, top_p=0.9, seed=7)),
            dict(names=["q_v"], sources=SOURCES[1:2], max_new_tokens=10, num_beams=3),
            dict(names=["base", "wide"], sources=SOURCES[3:], max_new_tokens=12, stop=("e",), want_logprob=True,
                 sampling=Sampling(logprobs=2))]


def running(engine: Engine, body) -> object:
    """body(engine) on the started engine, once the graphs it asked for as it started are compiled."""
    async def main():
        engine.start()
        try:
            await asyncio.get_running_loop().run_in_executor(None, engine.wait_compiled)
            return await body(engine)
        finally:
            await engine.stop()
    return asyncio.run(main())


def decode(bank: AdapterBank, asks: list[dict], **options) -> list:
    async def body(engine):
        return [await engine.complete(**ask) for ask in asks]
    return running(Engine(bank, **options), body)


def same_completions(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert [(c.text, c.tokens, c.finish_reason) for c in a] == [(c.text, c.tokens, c.finish_reason) for c in b]
        for x, y in zip(a, b):
            if y.logprobs is not None:
                assert [e.text for e in x.logprobs] == [e.text for e in y.logprobs]
                assert max(abs(e.logprob - f.logprob) for e, f in zip(x.logprobs, y.logprobs)) < 1e-4


def bank_of(folders, **adapters: str) -> AdapterBank:
    return AdapterBank.load(None, {name: str(folders / folder) for name, folder in adapters.items()})


def test_every_kind_of_request_decodes_alike_compiled_and_eager_with_no_graph_past_those_of_the_start(folders,
                                                                                                       monkeypatch):
    """Each kind of request answers as the eager engine does, with no graph but those asked for at start; and once
    they are compiled, the engine gives the OS back the checkpoint's pages, before the requests (which answer as
    before: the compiled graphs read copies of the weights, the rest is read back from the file)."""
    import peft_t5.serve.engine as engine_module

    bank = bank_of(folders, q_v="q_v", wide="wide")
    expected = decode(bank, requests(), compile=False)
    paged, advised, real = threading.Event(), [], engine_module.page_out_checkpoint

    def page_out(*models):
        advised.append((models, real(*models)))
        paged.set()
        return advised[-1][1]
    monkeypatch.setattr(engine_module, "page_out_checkpoint", page_out)
    engine = Engine(bank, max_rows=16, max_rows_per_request=16)
    counted = {}

    async def body(engine):
        counted["before"] = graphs()
        assert paged.wait(300)  # a bound on a hang: it follows the last compile
        counted["done"] = engine.compiled.done()
        return [await engine.complete(**ask) for ask in requests()]
    got = running(engine, body)
    same_completions(got, expected)
    assert counted["done"] and len(advised) == 1 and advised[0][0] == tuple(bank.models()) and advised[0][1] > 0
    assert graphs() == counted["before"] and not engine.compiled.failed
    assert engine.compiled.steps["eager"] == 0 and engine.compiled.steps["compiled"] >= 14  # one step a token or more
    assert engine.compiled.encodes["eager"] == 0 and engine.compiled.encodes["compiled"] >= 4  # one a request or more
    assert len({c.text for c in got[0]}) >= 3  # outputs that tell the rows apart


def test_adapters_loaded_later_take_slots_without_recompiling_and_new_projections_compile_meanwhile_eager(folders):
    """An adapter like the one loaded at start (a slot is written; no new graph), an adapter loaded again under the
    same name (its slot is written again), then one that adapts projections no earlier one did (a new layout: eager
    steps until its graphs are ready, the same answers)."""
    bank = bank_of(folders, q_v="q_v")
    ask = dict(names=["q_v", "later", "base"], sources=SOURCES[:3], max_new_tokens=10)
    wider = dict(names=["wider", "q_v"], sources=SOURCES[:2], max_new_tokens=10)
    seen = {}

    async def body(engine):
        before = graphs()
        await engine.on_model_thread(bank.add, "later", str(folders / "q_v2"))
        first = await engine.complete(**ask)
        await engine.on_model_thread(bank.remove, "later")
        await engine.on_model_thread(bank.add, "later", str(folders / "q_v"))  # the same name, q_v's weights
        again = await engine.complete(**ask)
        seen["graphs"] = graphs() - before
        seen["eager"] = engine.compiled.steps["eager"]
        engine.compiled.held.set()  # the new layout's graphs wait: its steps run eagerly meanwhile
        await engine.on_model_thread(bank.add, "wider", str(folders / "wide"))
        held = await engine.complete(**wider)
        seen["held eager"] = engine.compiled.steps["eager"] - seen["eager"]
        engine.compiled.held.clear()
        await asyncio.get_running_loop().run_in_executor(None, engine.wait_compiled)
        compiled = engine.compiled.steps["compiled"]
        after = await engine.complete(**wider)
        seen["compiled after"] = engine.compiled.steps["compiled"] - compiled
        return first, again, held, after
    first, again, held, after = running(Engine(bank), body)
    same_completions([first], decode(bank_of(folders, q_v="q_v", later="q_v2"), [ask], compile=False))
    same_completions([again], decode(bank_of(folders, q_v="q_v", later="q_v"), [ask], compile=False))
    assert again[1].text != first[1].text  # "later" answers with the weights it holds now
    expected = decode(bank_of(folders, q_v="q_v", wider="wide"), [wider], compile=False)
    same_completions([held], expected)
    same_completions([after], expected)
    assert seen["graphs"] == 0 and seen["eager"] == 0 and seen["held eager"] > 0 and seen["compiled after"] > 0


def test_int8s_compiled_graphs_stay_as_close_to_float32_as_its_eager_step_is(capfd):
    """int8 rounds each activation to one of 255 levels, so a last-bit difference in a norm before it (inductor's
    fused one, or eager's) can move a value a level: int8 compiled and eager are not bit-identical. What must hold:
    the compiled encoder and step are as faithful to float32 as the eager int8 step is (t5-small's widths, 2 LoRA
    adapters mixed per row, teacher-forced tokens), and they run with no eager call once compiled; the products
    oneDNN runs (without AVX512-VNNI: the compiled graphs' qlinear, the eager encoder's) run in its kernels, not its
    reference loop (which int8 activations fell to on a CPU without AMX). The int8 runners' caches are bfloat16, as
    the server holds an int8 base's by default (--kv_cache_dtype auto), and the float32 reference's float32."""
    import copy

    model = t5_small_wide_with_two_adapters()
    int8 = copy.deepcopy(model)
    quantize_int8(int8)
    assert cache_dtype(int8) == torch.bfloat16 and cache_dtype(model) == torch.float32
    assert cache_dtype(int8, "float32") == torch.float32 and cache_dtype(model, "bfloat16") == torch.bfloat16
    compiled = CompiledStep()
    reference = T5Runner(model)
    eager, fast = (T5Runner(int8, compiled=c, cache_dtype=cache_dtype(int8)) for c in (None, compiled))
    fast.warm(["a", "b"])
    compiled.wait()
    assert not compiled.failed and len(compiled.ready) == 4
    sources = [list(range(5, 5 + n)) + [1] for n in (30, 7, 18, 3, 25)]
    names = ["a", "b", "__base__", "b", "a"]

    def off(runner: T5Runner, of: T5Runner) -> float:
        return max(float((x[:5] - y[:5]).abs().max()) for x, y in zip(runner.cross_k + runner.cross_v,
                                                                       of.cross_k + of.cross_v))
    with torch.inference_mode(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        for runner in (reference, eager, fast):
            runner.add(sources, names, budgets=[6] * 5)
        assert [r.cross_k[0].dtype for r in (reference, eager, fast)] == [torch.float32] + [torch.bfloat16] * 2
        assert fast.self_v[-1].dtype == torch.bfloat16
        assert 0 < off(fast, reference) <= 1.5 * off(eager, reference)
        tokens = torch.zeros(5, dtype=torch.long)
        for _ in range(6):
            expected = reference.step(tokens)
            eager_off = float((eager.step(tokens) - expected).abs().max())
            with torch.profiler.profile() as many_rows:
                assert float((fast.step(tokens) - expected).abs().max()) <= 1.5 * eager_off
            tokens = expected.argmax(-1)
        for runner in (reference, eager, fast):  # one row left: the one-row graph, its products peft-t5's kernel
            while runner.n > 1:
                runner.remove(runner.n - 1)
        expected = reference.step(tokens[:1])
        eager_off = float((eager.step(tokens[:1]) - expected).abs().max())
        with torch.profiler.profile() as profile:
            assert float((fast.step(tokens[:1]) - expected).abs().max()) <= 1.5 * eager_off
    assert compiled.steps == {"compiled": 7, "eager": 0} and compiled.encodes["eager"] == 0
    onednn = onednn_matmuls(capfd.readouterr().out)
    assert not [name for name in onednn if name.startswith("ref")], onednn
    assert onednn or kernels.packed_problem() is None  # unpacked (no VNNI), oneDNN takes the many-row products
    if kernels.kernel_problem() is None:  # one row: the VNNI kernel's, over the packed layout where the CPU has VNNI
        ran = [event.name for event in profile.events()]
        products = 6 * len(fast.weights.decoder) + 1  # q/k/v (fused), o, cross q, cross o, wi, wo a layer; the head
        one_row = "peft_t5::int8_packed_matmul" if kernels.packed_problem() is None else "peft_t5::int8_matmul"
        assert ran.count(one_row) == products and "onednn::qlinear_pointwise" not in ran
    if kernels.packed_problem() is None:  # 5 rows: every product peft-t5's packed kernel's, none oneDNN's
        ran = [event.name for event in many_rows.events()]
        assert ran.count("peft_t5::int8_packed_matmul") == products and "onednn::qlinear_pointwise" not in ran


@pytest.mark.parametrize("int8", [False, True])
def test_a_restart_builds_no_kernel_again_from_the_cache_folder(folders, tmp_path, int8):
    """Two processes compile the same step with one cache folder: the first writes the kernels it builds there, the
    second finds them and builds none, and (where oneDNN's products take weights held by number) finds every graph
    whole in inductor's graph cache, none lowered again: frozen graphs, which hold oneDNN's prepacked weights (int8's
    without AMX, float32's step of several rows), were never stored, so each start lowered them again."""
    import json

    script = (f"import asyncio, json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              f"import test_compiled as t; from pathlib import Path; from peft_t5.serve.engine import Engine; "
              f"from peft_t5.quantize import quantize_int8; from torch._dynamo.utils import counters; "
              f"bank = t.bank_of(Path({str(folders)!r}), q_v='q_v'); "
              f"{int8} and quantize_int8(*bank.models()); "
              f"engine = Engine(bank, compile_cache={str(tmp_path / 'cache')!r}); "
              f"t.running(engine, t.ready); assert engine.compiled.ready and not engine.compiled.failed; "
              f"print(json.dumps(dict(counters['inductor'])))")

    def built() -> tuple[dict, dict]:
        run = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=600)
        inductor = json.loads(run.stdout.strip().splitlines()[-1])
        return {path: path.stat().st_mtime_ns for path in (tmp_path / "cache").rglob("*.so")}, inductor
    first, inductor = built()
    compiled = inductor.get("fxgraph_cache_miss", 0) + inductor.get("fxgraph_cache_bypass", 0)
    assert first and compiled >= 4  # the decoder step and encoder, one row and many
    again, inductor = built()
    assert again == first
    if kernels.build_problem() is None and os.environ.get("PEFT_T5_KERNELS", "on") != "off":
        assert inductor.get("fxgraph_cache_hit", 0) >= 4 and not inductor.get("fxgraph_cache_miss")
        assert not inductor.get("fxgraph_cache_bypass"), inductor


SMALL_GRAPH = """
import sys, torch
from peft_t5.serve.compiled import CompiledStep
CompiledStep(cache_dir=sys.argv[1])  # sets the folder inductor keeps what it builds in
def norm_gate(x, w):
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, 1e-6) * torch.sigmoid(x)
x, w = torch.randn(5, 300), torch.rand(300)
print((torch.compile(norm_gate, dynamic=False)(x, w) - norm_gate(x, w)).abs().max().item())
"""


def test_a_cache_folder_filled_under_avx_512_answers_right_under_avx2(tmp_path):
    """One cache folder, then ATEN_CPU_CAPABILITY=avx2 (as a home folder shared with a machine without AVX-512):
    inductor's graph cache does not key on the instruction set, and its graphs were found and their kernels built
    again for the other set, stepping by 16 floats over vectors of 8 (NaN here; the engine's step crashed). Each set
    has a folder of its own, and both processes compute what eager torch does. (On a CPU without AVX-512 both are
    AVX2's: the results are checked all the same.)"""

    cache = tmp_path / "cache"
    for held in ({}, {"ATEN_CPU_CAPABILITY": "avx2"}):
        run = subprocess.run([sys.executable, "-c", SMALL_GRAPH, str(cache)], env={**os.environ, **held},
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert float(run.stdout.split()[-1]) < 1e-5, held
    written = sorted(folder.name for folder in cache.iterdir())
    assert "isa-avx2" in written and all(name.startswith("isa-") for name in written)
    assert all(list(cache.glob(f"{name}/**/*.so")) for name in written)


async def ready(engine: Engine) -> None:
    """Nothing: running() has waited for the graphs."""


def test_a_compile_hands_the_gil_back_quickly_runs_at_a_lower_priority_and_restores_the_switch_interval_after(
        monkeypatch):
    """Dynamo and inductor are Python: with the default 5 ms switch interval, the model thread's eager steps waited
    for the GIL after every op while a graph compiled, and shared the cores with it."""
    during, nice = [], []

    def compile_or_fail(step, args, threads):
        during.append(sys.getswitchinterval())
        nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        if step == "fails":
            raise RuntimeError("no C++ compiler")
        return step

    monkeypatch.setattr(CompiledStep, "_compile", staticmethod(compile_or_fail))
    before = sys.getswitchinterval()
    compiled = CompiledStep()
    for step in ("compiles", "fails"):
        compiled.work.put(((step, "one"), (), 1))
    compiled.work.put(None)
    thread = threading.Thread(target=compiled._run)  # the compiling thread's loop (its nice stays its own)
    thread.start()
    thread.join()
    assert nice == [max(COMPILE_NICE, os.getpriority(os.PRIO_PROCESS, 0))] * 2
    assert during == pytest.approx([min(before, COMPILE_SWITCH_INTERVAL)] * 2) and COMPILE_SWITCH_INTERVAL <= 1e-4
    assert sys.getswitchinterval() == before
    assert list(compiled.ready) == [("compiles", "one")] and "RuntimeError: no C++ compiler" in compiled.failed[
        ("fails", "one")]


def test_the_compiling_thread_lets_a_graphs_examples_go_once_it_is_compiled(monkeypatch):
    """Waiting for the next graph, the compiling thread holds none of the last one's example tensors (t5-small's
    LoRA stacks alone were 31 MB, held for the life of the server)."""
    monkeypatch.setattr(CompiledStep, "_compile", staticmethod(lambda step, args, threads: step))
    alive = []
    compiled = CompiledStep(on_event=lambda part, kind, seconds, error: alive.append(example() is not None))
    tensor = torch.zeros(1000)
    example = weakref.ref(tensor)
    compiled.work.put((("compiles", "one"), (tensor,), 1))
    del tensor
    compiled.work.put(None)
    thread = threading.Thread(target=compiled._run)
    thread.start()
    thread.join()
    assert alive == [False] and list(compiled.ready) == [("compiles", "one")]
