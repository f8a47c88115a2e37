"""int8 for serving: each row quantized with its own scale (a row's answer never depends on the rows beside it), close
to float32, and a layer PEFT wraps, so that adapters of every method load onto a base quantized before them."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_t5 import kernels
from peft_t5.adapters import save_adapter
from peft_t5.bank import AdapterBank
from peft_t5.modeling import tiny_model, tiny_tokenizer
from peft_t5.quantize import Int8Linear, int8_linear, int8_path, quantize_int8


def test_a_rows_int8_output_is_the_same_alone_and_beside_other_rows():
    torch.manual_seed(0)
    layer = Int8Linear(torch.randn(96, 64))
    rows = torch.randn(5, 64) * torch.tensor([[0.01], [1.0], [100.0], [3.0], [0.5]])  # scales far apart
    with torch.inference_mode():
        together = layer(rows)
        for i in range(5):
            assert torch.equal(layer(rows[i:i + 1]), together[i:i + 1])
        exact = rows @ layer.dequantize().t()
    assert ((together - exact).norm(dim=1) / exact.norm(dim=1)).max() < 0.02  # each row close, the small one too


SATURATING_CPU = """
import torch
from peft_t5.quantize import Int8Linear, int8_path, weight_levels
torch.manual_seed(0)
layer, rows = Int8Linear(torch.randn(96, 512)), torch.randn(5, 512) * torch.tensor([[0.01], [1.0], [100.0], [3.0], [0.5]])
with torch.inference_mode():
    exact = rows @ layer.dequantize().t()
    print(weight_levels(), ((layer(rows) - exact).norm(dim=1) / exact.norm(dim=1)).max().item(), int8_path())
"""


def test_where_onednn_sums_int8_pairs_in_int16_weights_take_63_levels_and_products_stay_close():
    """oneDNN held to AVX2 (as on a CPU without VNNI, or AVX-512 without VNNI): its int8 products saturate at 127
    weight levels (each row erred by up to 9.7%); with 63 they are as close as with VNNI."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PEFT_T5_KERNELS": "off"}
    out = subprocess.run([sys.executable, "-c", SATURATING_CPU], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    levels, error, path = out.stdout.split(maxsplit=2)
    assert levels == "63" and float(error) < 0.02
    assert "oneDNN int8 (AVX2) (weights in 63 levels: its int16 sums would saturate at 127)" in path


AVX2_CPU = """
import torch
from peft_t5 import kernels
from peft_t5.quantize import Int8Linear, int8_linear, int8_path
from peft_t5.serve.t5_runner import one_row_float32
assert kernels.kernel_problem() is None and kernels.widened, kernels.kernel_problem()
assert kernels.onednn_problem() is None  # oneDNN's weights held by number, as the engine's are (int8_path)
torch.manual_seed(0)
for k, n in [(512, 512), (70, 5), (2048, 513), (1, 1), (100, 3), (24, 7)]:
    layer = Int8Linear(torch.randn(n, k))
    for rows in (1, 2, 3, 8):
        for x in (torch.randn(rows, k), torch.zeros(rows, k), torch.randn(k, 2 * rows)[:, ::2].t()):
            kernel = torch.ops.peft_t5.int8_matmul(x, layer.weight, layer.weight_scale)
            kernels.ready = False
            assert torch.equal(int8_linear(x, layer), kernel), (k, n, rows)  # oneDNN's
            kernels.ready = True
    weight, x = torch.randn(n, k) * 0.05, torch.randn(1, k)
    exact = x.double() @ weight.double().t()
    ours, mkl = torch.ops.peft_t5.f32_matvec(x, weight), torch.nn.functional.linear(x, weight)
    assert one_row_float32(x, weight)
    assert float((ours - exact).abs().max()) <= 2 * float((mkl - exact).abs().max()) + 1e-6, (k, n)
    for rows in (2, 3, 4):  # two rows of x at a time with AVX2, and one left over
        x = torch.randn(rows, k)
        exact = x.double() @ weight.double().t()
        ours, mkl = torch.ops.peft_t5.f32_rows(x, weight, -1, n), torch.nn.functional.linear(x, weight)
        assert float((ours - exact).abs().max()) <= 2 * float((mkl - exact).abs().max()) + 1e-6, (k, n, rows)
head = Int8Linear(torch.randn(32128, 512))  # T5's output layer: oneDNN's from 2 rows with VNNI, the kernel's here
with torch.profiler.profile() as profile:
    int8_linear(torch.randn(8, 512), head)
ran = [event.name for event in profile.events()]
print(ran.count("peft_t5::int8_matmul"), ran.count("peft_t5::onednn_int8_matmul"))
layer = Int8Linear(torch.randn(70, 100))
layer.onednn_number()  # held before the graph is traced, as the engine's are
graph = torch.compile(lambda x: int8_linear(x, layer), dynamic=False, fullgraph=True)  # as the engine's of several rows
example = torch.randn(16, 100)
torch._dynamo.mark_dynamic(example, 0)
graph(example)
torch._dynamo.config.error_on_recompile = True  # one graph for every count: the kernel or oneDNN, decided in the op
for rows in (2, 8, 9, 32):
    x = torch.randn(rows, 100)
    kernels.ready = False
    expected = int8_linear(x, layer)
    kernels.ready = True
    with torch.profiler.profile() as profile:
        assert torch.equal(graph(x), expected), rows
    ran = [event.name for event in profile.events()]
    assert "peft_t5::int8_rows" in ran and ("peft_t5::onednn_int8_matmul" in ran) == (rows > 8), rows
print(kernels.kernels_used(torch.device("cpu")))
print(int8_path())
"""


@pytest.mark.slow  # a process of its own, which compiles a graph
def test_without_avx512_the_kernels_take_avx2_and_int8_gives_onednns_results_bit_for_bit():
    """torch and oneDNN held to AVX2, as on a CPU without AVX-512: peft-t5's int8 kernel sums int16 pairs (exactly:
    oneDNN's results bit for bit, weights in 63 levels) and takes up to 8 rows of any weight, oneDNN's AVX2 int8 being
    slower there, eagerly and in a compiled graph of several rows, which takes every count (no guard on it: oneDNN's
    past 8 rows, decided in the op); the float32 kernels of 1-4 rows are as close to float64 as MKL's. Widths with and
    without tails past 16 and 64, output counts with and without one past 4, rows of zeros, strided rows."""
    if not torch.cpu._is_avx2_supported() or kernels.build_problem() is not None:
        pytest.skip(f"peft-t5's AVX2 kernels cannot run here: {kernels.build_problem() or 'the CPU has no AVX2'}")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", AVX2_CPU], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    counts, used, path = out.stdout.strip().splitlines()
    assert counts == "1 0"
    assert "float32 products of 1-4 rows (AVX2); int8 of 1-8 rows (AVX2)" in used
    assert path.endswith("1-8 rows: peft-t5's AVX2 kernel")


def adapter(folder, seed: int, use_dora: bool = False) -> str:
    """A LoRA (or DoRA) adapter on q and v whose B has the size a trained adapter's has."""
    torch.manual_seed(seed)
    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], use_dora=use_dora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    save_adapter(model, tiny_tokenizer(), folder, {"task": "jokes", "base_model": "tiny", "template": "{question}"},
                 "test adapter")
    return str(folder)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("use_dora", [False, True])
def test_adapters_load_onto_a_base_quantized_before_them_and_answer_close_to_float(tmp_path, use_dora, packed):
    """The on-demand case: the server quantized its base at start, then a request names an adapter on disk (DoRA
    reads the base's weight itself: through Int8Linear.dequantize). packed: the base's layers hold their weights in
    the packed layout only, as the engine leaves them (where the CPU has AVX512-VNNI)."""
    first, later = adapter(tmp_path / "first", 1), adapter(tmp_path / "later", 2, use_dora)
    int8, float32 = (AdapterBank.load("tiny", {"first": first}) for _ in range(2))
    assert quantize_int8(*int8.models()) > 0
    if packed:
        packed_or_skip()
        for layer in int8.base.modules():
            if isinstance(layer, Int8Linear):
                layer.pack_for_kernel()
                assert layer._parameters["weight"] is None
    for bank in (int8, float32):
        bank.add("later", later)
    assert any(isinstance(m, Int8Linear) for m in int8.holders["later"].modules())
    batch = int8.tokenizer(["why did the chicken cross the road", "hello"], return_tensors="pt", padding=True)
    start = torch.zeros((2, 1), dtype=torch.long)
    with torch.inference_mode():
        got, expected = (bank.model_for("later")(**batch, decoder_input_ids=start).logits for bank in (int8, float32))
        plain = float32.base(**batch, decoder_input_ids=start).logits
    assert (got - expected).norm() < 0.05 * expected.norm()
    assert (expected - plain).norm() > 0.005 * expected.norm()  # the adapter does change the answer
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert "oneDNN int8" in int8_path()


def test_the_int8_kernel_gives_onednns_results_bit_for_bit(monkeypatch):
    """1-8 rows' int8 product in peft-t5's kernel equals oneDNN's exactly: widths with and without a tail past 64
    bytes, output counts with and without one past 4, row counts with and without one past 4, a row of zeros, strided
    rows."""
    if kernels.kernel_problem() is not None:
        pytest.skip(f"peft-t5's int8 kernel is not used here: {kernels.kernel_problem()}")
    torch.manual_seed(0)
    cases = [(512, 512), (70, 5), (2048, 513), (1, 1), (100, 3)]
    for k, n in cases:
        layer = Int8Linear(torch.randn(n, k))
        for rows in (1, 3, 8):
            for x in (torch.randn(rows, k), torch.zeros(rows, k), torch.randn(k, 2 * rows)[:, ::2].t()):
                kernel = torch.ops.peft_t5.int8_matmul(x, layer.weight, layer.weight_scale)
                assert torch.equal(int8_linear(x, layer), kernel)
                with monkeypatch.context() as patch:
                    patch.setattr(kernels, "ready", False)
                    assert torch.equal(int8_linear(x, layer), kernel), (k, n, rows)


@pytest.mark.parametrize(("rows", "out", "kernel"), [(1, 32128, True), (8, 2048, True), (9, 2048, False),
                                                     (2, 32128, False)])
def test_eagerly_the_int8_kernel_takes_up_to_8_rows_through_weights_up_to_2048_by_512(rows, out, kernel):
    """One row always; 2-8 rows through a weight no larger than 2048 x 512 (T5's output layer, 32128 x 512, is
    oneDNN's from 2 rows); oneDNN past 8 rows. (Without VNNI up to 8 rows of any weight: the test above.)"""
    if kernels.kernel_problem() is not None or kernels.widened:
        pytest.skip(f"peft-t5's VNNI int8 kernel is not used here: {kernels.kernel_problem() or 'AVX2'}")
    layer = Int8Linear(torch.randn(out, 512))
    with torch.profiler.profile() as profile:
        int8_linear(torch.randn(rows, 512), layer)
    ran = [event.name for event in profile.events()]
    assert ("peft_t5::int8_matmul" in ran) == kernel and ("onednn::qlinear_pointwise" in ran) == (not kernel)


@pytest.mark.slow  # compiles a graph
@pytest.mark.parametrize(("rows", "out", "kernel"), [(2, 512, True), (4, 2048, True), (8, 512, True),
                                                     (9, 512, False), (2, 32128, False)])
def test_a_compiled_graph_of_several_int8_rows_takes_the_vnni_kernel_up_to_8_rows_of_weights_up_to_2048_by_512(
        rows, out, kernel, monkeypatch):
    """One graph for every count (no guard on it): int8_rows decides as it runs, the kernel where it is faster than
    oneDNN (2 rows of 512 x 512: 9 us against 26), oneDNN's held product past that, the same results bit for bit."""
    if kernels.kernel_problem() is not None or kernels.widened or kernels.onednn_problem() is not None:
        pytest.skip(f"peft-t5's VNNI int8 kernel is not used here: {kernels.kernel_problem() or 'AVX2 or oneDNN'}")
    import torch._dynamo

    layer = Int8Linear(torch.randn(out, 512))
    layer.onednn_number()  # held before the graph is traced, as the engine's are
    graph = torch.compile(lambda x: int8_linear(x, layer), dynamic=False, fullgraph=True)
    example = torch.randn(16, 512)
    torch._dynamo.mark_dynamic(example, 0)
    graph(example)
    x = torch.randn(rows, 512)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.profiler.profile() as profile:
        got = graph(x)
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "ready", False)
        assert torch.equal(got, int8_linear(x, layer))  # oneDNN's, eagerly
    ran = [event.name for event in profile.events()]
    assert "peft_t5::int8_rows" in ran and ("peft_t5::onednn_int8_matmul" in ran) == (not kernel)


def onednn_matmuls(output: str) -> list[str]:
    """The implementations oneDNN names for the matmuls it ran (its verbose lines, printed to stdout)."""
    return [line.split(",")[6] for line in output.splitlines() if ",exec,cpu,matmul," in line]


def test_onednn_runs_int8_products_in_its_fast_kernels_not_its_reference_loop(capfd):
    """Without AMX, oneDNN's fast int8 kernels take unsigned activations only: given int8 ones, it ran its reference
    loop (118 ms for a 20 x 512 by 512 x 512 product on an AMD EPYC with AVX512-VNNI, 0.06 in its kernel). Rows go to
    it as uint8 levels with zero point 128, which give the same sums."""
    torch.manual_seed(0)
    layer = Int8Linear(torch.randn(64, 96))
    x = torch.randn(20, 96)  # past the eager kernel's 8 rows: oneDNN's product
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        y = int8_linear(x, layer)
    ran = onednn_matmuls(capfd.readouterr().out)
    assert ran and not [name for name in ran if name.startswith("ref")], ran
    scale = x.abs().amax(-1, keepdim=True) / 127
    exact = ((x / scale).round() @ layer.weight.float().t()) * scale * layer.weight_scale
    assert torch.allclose(y, exact, rtol=1e-5, atol=1e-5)


def test_a_copied_int8_layer_holds_oneDNNs_weight_of_its_own_and_a_freed_layer_lets_its_go():
    """oneDNN's prepacked weights are held under numbers (compiled graphs name them): a deep copy of a layer (tests
    and benchmarks copy models) packs its own, and a layer that is freed releases its number."""
    import copy
    import gc

    if kernels.onednn_problem() is not None:
        pytest.skip(f"oneDNN's products take no held weights here: {kernels.onednn_problem()}")
    torch.manual_seed(0)
    layer, x = Int8Linear(torch.randn(64, 96)), torch.randn(20, 96)
    expected = int8_linear(x, layer)
    copied = copy.deepcopy(layer)
    number = layer.onednn_number()
    q = torch.full((2, 96), 128, dtype=torch.uint8)
    assert torch.equal(torch.ops.peft_t5.onednn_int8_matmul(q, number, layer.weight_scale, layer.weight_zero_point),
                       torch.zeros(2, 64))
    del layer
    gc.collect()
    assert torch.equal(int8_linear(x, copied), expected) and copied.onednn_number() != number
    with pytest.raises(RuntimeError, match=f"no weight is held under {number}"):
        torch.ops.peft_t5.onednn_int8_matmul(q, number, copied.weight_scale, copied.weight_zero_point)


def test_int8_can_be_left_to_onednn(monkeypatch):
    monkeypatch.setenv("PEFT_T5_KERNELS", "off")
    monkeypatch.setattr(kernels, "ready", kernels.ready)  # the call below clears it: graphs compiled later in this
    assert kernels.kernel_problem.__wrapped__() == "PEFT_T5_KERNELS=off"  # process would trace without the kernels
    assert not kernels.ready


def test_torch_held_to_avx2_by_aten_cpu_capability_holds_peft_t5s_kernels_to_avx2_and_bf16_off(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 holds torch's kernels and inductor's code to AVX2: peft-t5's kernels then take AVX2
    (int8 widened to int16 pairs, the attention too) and bfloat16 is unused, as on a CPU without AVX-512 (how the
    suite is run as on one: benchmarks/README.md); held to DEFAULT, none of its kernels."""
    from peft_t5.modeling import bf16_supported

    for name in kernels.CPU_FEATURES.values():
        monkeypatch.setattr(torch.cpu, name, lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    for flag in ("ready", "widened", "attention_ready"):  # the calls below set them: later tests in this process use
        monkeypatch.setattr(kernels, flag, getattr(kernels, flag))  # the real ones
    assert not bf16_supported()
    for problem in (kernels.kernel_problem, kernels.attention_problem):
        assert problem.__wrapped__() == kernels.build_problem()
    assert kernels.ready == kernels.widened == kernels.attention_ready == (kernels.build_problem() is None)
    assert kernels.instructions("AVX-512") == kernels.instructions("AVX512-VNNI") == "AVX2"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    held = "torch's kernels are held to DEFAULT (ATEN_CPU_CAPABILITY)"
    assert kernels.kernel_problem.__wrapped__() == held and kernels.attention_problem.__wrapped__() == held
    assert not kernels.ready and not kernels.widened and not kernels.attention_ready
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    assert kernels.cpu_lacks("AVX512-VNNI") == "the CPU has no AVX512-VNNI"
    assert kernels.cpu_lacks("AVX-512") is None and bf16_supported()
    assert kernels.instructions("AVX-512") == "AVX-512" and kernels.instructions("AVX512-VNNI") == "AVX2"


def test_a_lock_left_by_a_build_killed_midway_is_cleared_and_the_library_loads(monkeypatch, caplog):
    """torch's lock file in the kernels' build folder, as a process killed while building leaves it: the next load
    removes it (no peft-t5 build holds the flock) instead of waiting on it forever."""
    from torch.utils.file_baton import FileBaton

    if kernels.build_problem() is not None:
        pytest.skip(f"peft-t5's kernels do not build here: {kernels.build_problem()}")
    stale = Path(kernels.build_folder()) / "lock"
    stale.touch()

    def forever(baton):
        raise AssertionError(f"the load waited on {baton.lock_file_path}")

    monkeypatch.setattr(FileBaton, "wait", forever)
    with caplog.at_level(logging.WARNING, logger="peft_t5.kernels"):
        kernels.load_library()
    assert not stale.exists()
    assert f"removed {stale}, left by a build of peft-t5's kernels that was killed midway" in caplog.text


def packed_or_skip() -> None:
    if kernels.packed_problem() is not None:
        pytest.skip(f"peft-t5's kernel over packed int8 weights is not used here: {kernels.packed_problem()}")


@pytest.mark.parametrize("amx", [False, True])
def test_the_packed_kernel_gives_onednns_results_bit_for_bit(monkeypatch, amx):
    """Any number of rows through peft-t5's kernel over packed weights equals oneDNN's product exactly, through
    AVX512-VNNI's tiles and AMX's: widths with and without a tail past 64 bytes, output counts with and without one
    past 32 (and past 48 and 64: groups of blocks), one row, row counts below, at and past the tiles (8 rows; AMX's 16
    and 32) and the chunks of 64, a row of zeros, strided rows."""
    packed_or_skip()
    if amx and kernels.amx_problem() is not None:
        pytest.skip(f"AMX's tiles are not used here: {kernels.amx_problem()}")
    monkeypatch.setattr(kernels, "amx_ready", amx)
    torch.manual_seed(0)
    for k, n in [(512, 512), (70, 5), (2048, 513), (1, 1), (100, 40), (64, 32128), (96, 100)]:
        layer = Int8Linear(torch.randn(n, k))
        layer.pack_for_kernel()
        assert layer.packed_weight.shape == (-(-n // 32) * 2, -(-k // 64), 16, 64)
        for rows in (1, 2, 7, 8, 9, 16, 17, 33, 70, 130):
            if n * rows > 2_000_000:  # the output layer's shape: its few rows suffice
                continue
            for x in (torch.randn(rows, k), torch.zeros(rows, k), torch.randn(k, 2 * rows)[:, ::2].t()):
                ours = int8_linear(x, layer)
                with monkeypatch.context() as patch:
                    patch.setattr(kernels, "ready", False)
                    patch.setattr(kernels, "packed_ready", False)
                    assert torch.equal(int8_linear(x, layer), ours), (k, n, rows)


def test_a_packed_layer_takes_the_packed_kernel_at_any_rows():
    packed_or_skip()
    layer = Int8Linear(torch.randn(32128, 512))

    def ran(rows: int) -> list[str]:
        with torch.profiler.profile() as profile:
            int8_linear(torch.randn(rows, 512), layer)
        return [event.name for event in profile.events()]
    assert "peft_t5::int8_packed_matmul" not in ran(2)  # not packed: oneDNN's
    weight = layer.weight.clone()
    layer.pack_for_kernel()
    assert dict(layer.named_parameters()) == {} and torch.equal(layer.weight, weight)  # one copy, in the packed layout
    assert "peft_t5::int8_packed_matmul" in ran(2) and "onednn::qlinear_pointwise" not in ran(40)
    assert "peft_t5::int8_packed_matmul" in ran(1) and "peft_t5::int8_matmul" not in ran(1)
    layer.set_weight(layer.weight.clone(), layer.weight_scale)  # new values: the packed copy would be stale
    assert layer.packed_weight is None and "peft_t5::int8_packed_matmul" not in ran(2)


def test_the_packed_kernel_and_its_amx_tiles_can_be_switched_off(monkeypatch):
    """PEFT_T5_PACKED=off leaves int8 layers row-major (the row-major kernel and oneDNN take their products),
    PEFT_T5_AMX=off leaves several rows to AVX512-VNNI's tiles; neither sets a flag that says the kernel is used."""
    packed, amx = kernels.packed_ready, kernels.amx_ready
    monkeypatch.setenv("PEFT_T5_PACKED", "off")
    assert kernels.packed_problem.__wrapped__() in ("PEFT_T5_PACKED=off", kernels.kernel_problem())
    monkeypatch.setenv("PEFT_T5_PACKED", "on")
    monkeypatch.setenv("PEFT_T5_AMX", "off")
    assert kernels.amx_problem.__wrapped__() in ("PEFT_T5_AMX=off", kernels.packed_problem())
    assert (kernels.packed_ready, kernels.amx_ready) == (packed, amx)


def test_the_served_int8_base_holds_each_weight_once_packed():
    """Where the CPU has AVX512-VNNI, building the engine's step leaves every int8 layer of the model (q, k, v too:
    views into their fused layer's packed weight) without a row-major copy and without oneDNN's, and the model
    answers as before."""
    packed_or_skip()
    from peft_t5.serve.t5_runner import T5Runner

    model = tiny_model().eval()
    quantize_int8(model)
    ids, start = torch.tensor([[5, 6, 7, 8, 1]]), torch.zeros((1, 1), dtype=torch.long)
    with torch.inference_mode():
        before = model(input_ids=ids, decoder_input_ids=start).logits
        runner = T5Runner(model)
        int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
        assert int8 and all(m._parameters["weight"] is None and m.packed_weight is not None for m in int8)
        assert all(m._held is None and m._packed is None for m in int8)
        assert torch.equal(model(input_ids=ids, decoder_input_ids=start).logits, before)
        runner.add([[5, 6, 7, 8, 1]], None, budgets=[2])
        torch.testing.assert_close(runner.step(torch.zeros(1, dtype=torch.long)), before[:, 0], rtol=1e-4, atol=1e-4)


def test_fused_int8_layers_whose_outputs_do_not_fill_packed_blocks_keep_their_values_and_products():
    """q/k/v widths that are not multiples of 32 cannot be views into the fused layer's packed weight: they keep
    row-major views of the fused values, and the fused product equals theirs side by side (packed or not)."""
    from peft_t5.serve.t5_runner import fused

    torch.manual_seed(0)
    parts = [Int8Linear(torch.randn(n, 64)) for n in (40, 24)]
    before = [p.weight.clone() for p in parts]
    x = torch.randn(3, 64)
    expected = torch.cat([int8_linear(x, p) for p in parts], -1)
    with torch.inference_mode():
        layer = fused(parts)
        assert all(p.packed_weight is None and torch.equal(p.weight, w) for p, w in zip(parts, before))
        assert torch.equal(int8_linear(x, layer), expected)
        assert torch.equal(torch.cat([int8_linear(x, p) for p in parts], -1), expected)


def resident_in_mapping(tensor: torch.Tensor) -> int:
    """Bytes resident of the file mapping that holds tensor (its Rss in /proc/self/smaps)."""
    at, inside = tensor.untyped_storage().data_ptr(), False
    for line in open("/proc/self/smaps"):
        first = line.split()[0]
        if "-" in first and ":" not in first:
            lo, hi = (int(a, 16) for a in first.split("-"))
            inside = lo <= at < hi
        elif inside and first == "Rss:":
            return int(line.split()[1]) * 1024
    raise AssertionError("the tensor is in no mapping")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux's /proc: no file mappings to read")
def test_the_checkpoints_pages_go_back_to_the_os_and_every_weight_reads_as_before_a_written_one_too(tmp_path):
    """page_out_checkpoint: the pages of the safetensors file a base's weights are mapped from leave the process's
    memory (the compiled engine reads copies of the weights), and the weights read as before: those only read
    come back from the file, and one written in place (a private copy of its page) keeps what was written."""
    from peft_t5.modeling import load_base_model
    from peft_t5.quantize import page_out_checkpoint

    tiny_model().save_pretrained(tmp_path / "base")
    model = load_base_model(str(tmp_path / "base"))
    weights = dict(model.named_parameters())
    written = weights["decoder.block.0.layer.1.EncDecAttention.q.weight"]
    with torch.no_grad():
        written.mul_(2.0)
    expected = {name: p.detach().clone() for name, p in weights.items()}
    touched = resident_in_mapping(written)
    assert touched > 0  # the checkpoint is a file mapping, read
    if not page_out_checkpoint(model):
        pytest.skip("the kernel has no MADV_PAGEOUT (Linux 5.4)")
    assert resident_in_mapping(written) < touched / 2
    for name, p in weights.items():
        assert torch.equal(p, expected[name]), name
    assert page_out_checkpoint(tiny_model()) == 0  # a model built in memory maps no checkpoint
