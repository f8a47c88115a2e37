"""The continuous engine: greedy outputs equal generate() token for token, with adapters mixed per row, rows joining
mid-flight and rows of different lengths; finished rows free their slots; deadlines, a full queue, int8."""
import asyncio
import itertools
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_t5.bank import AdapterBank
from peft_t5.modeling import tiny_model, tiny_tokenizer
from peft_t5.quantize import quantize_int8
from peft_t5.serve.engine import Engine
from peft_t5.serve.failures import Busy, DeadlineExceeded
from peft_t5.serve.module_runner import ATTENTION_LENGTH, CALL_TOKENS, length_groups
from peft_t5.serve.t5_runner import T5Runner

SOURCES = ["why did the chicken cross the road", "what is the capital of france and why is it so very big today",
           "hello", "question: a b c d e f g h i j k", "Where is Normandy? context: Normandy is a region in France.",
           "no"]


def spread_weights(model, std: float):
    """Weights drawn wide (relative-position biases wider still): greedy decoding then wanders over the vocabulary."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" not in name:
                param.normal_(0, 1.0 if "relative" in name else std)
    return model


@pytest.fixture(scope="module")
def erratic():
    """The tiny T5 with weights spread wide enough that greedy decoding wanders over the vocabulary (a random T5
    repeats one token, which would hide a wrong position), and two LoRA adapters on every linear layer."""
    torch.manual_seed(0)
    model = spread_weights(tiny_model(), 0.2)
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, LoraConfig(**config), adapter_name="one")
    model.add_adapter("two", LoraConfig(**config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model.eval()


def generate_alone(model, tokenizer, source: str, adapter: str, max_new_tokens: int) -> list[int]:
    batch = tokenizer([source], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, adapter_names=[adapter])
    tokens = out[0, 1:].tolist()
    return tokens[:tokens.index(1) + 1] if 1 in tokens else tokens


def test_rows_joining_and_leaving_mid_flight_decode_as_generate_does_alone(erratic, tokenizer):
    names = ["one", "two", "__base__", "one", "two", "__base__"]
    budgets = [20, 7, 13, 20, 3, 11]
    expected = [generate_alone(erratic, tokenizer, s, n, b) for s, n, b in zip(SOURCES, names, budgets)]
    assert len({tuple(e) for e in expected}) == 6 and all(len(set(e)) > 3 for e in expected[:1])
    runner = T5Runner(erratic, capacity=2)
    rows, done = [], {}  # rows: [index, tokens], in slot order

    def admit(indices):
        runner.add([tokenizer(SOURCES[i]).input_ids for i in indices], [names[i] for i in indices])
        rows.extend([i, []] for i in indices)

    admit([0, 1])
    most = 0
    for step in range(40):
        if step in (2, 5):
            admit([2, 3] if step == 2 else [4, 5])
        most = max(most, runner.n)
        last = torch.tensor([tokens[-1] if tokens else 0 for _, tokens in rows])
        chosen = runner.step(last, [names[i] for i, _ in rows]).argmax(-1).tolist()
        for row, token in zip(rows, chosen):
            row[1].append(token)
        for slot in reversed(range(len(rows))):
            i, tokens = rows[slot]
            if tokens[-1] == 1 or len(tokens) == budgets[i]:
                done[i] = tokens
                runner.remove(slot)
                rows[slot] = rows[-1]
                rows.pop()
        if not rows:
            break
    assert [done[i] for i in range(6)] == expected
    assert runner.n == 0 and most <= 6 and runner.capacity[0] <= 8  # every slot freed, none grown past need


def test_encoding_groups_pad_little_and_cover_every_source():
    sources = [[0] * n for n in (500, 12, 498, 13, 14, 300, 90)]
    groups = length_groups(sources)
    assert sorted(i for g in groups for i in g) == list(range(7))
    assert sorted(map(sorted, groups)) == [[0, 2], [1, 3, 4], [5], [6]]  # 3 short rows pad 3 tokens: one call


def plan_cost(lengths: list[int], groups: list[list[int]]) -> float:
    return sum(CALL_TOKENS + len(g) * max(lengths[i] for i in g) * (1 + max(lengths[i] for i in g) / ATTENTION_LENGTH)
               for g in groups)


def test_encoding_groups_are_the_cheapest_split_by_length():
    rng = random.Random(0)
    for _ in range(40):
        lengths = sorted(rng.choice([rng.randint(5, 40), rng.randint(100, 512)]) for _ in range(rng.randint(1, 8)))
        groups = length_groups([[0] * n for n in lengths], most_tokens=1500)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert all(len(g) * max(lengths[i] for i in g) <= 1500 or len(g) == 1 for g in groups)
        splits = []  # every split of the sorted rows into runs within the token bound
        for cuts in itertools.product([False, True], repeat=len(lengths) - 1):
            runs, start = [], 0
            for i, cut in enumerate(cuts, 1):
                if cut:
                    runs.append(list(range(start, i)))
                    start = i
            runs.append(list(range(start, len(lengths))))
            if all(len(r) * lengths[r[-1]] <= 1500 or len(r) == 1 for r in runs):
                splits.append(runs)
        assert plan_cost(lengths, groups) == pytest.approx(min(plan_cost(lengths, r) for r in splits))


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    from test_serve import make_adapter

    root = tmp_path_factory.mktemp("engine_adapters")
    return AdapterBank.load("tiny", {"jokes": make_adapter(root / "jokes", "jokes", 1),
                                     "jokes2": make_adapter(root / "jokes2", "jokes", 3)})


def run(coroutine_fn, bank, **engine_options):
    """coroutine_fn(engine) on a started engine: the eager step (the compiled one is test_compiled.py's)."""
    async def main():
        engine = Engine(bank, **{"compile": False, **engine_options})
        engine.start()
        try:
            return await coroutine_fn(engine)
        finally:
            await engine.stop()
    return asyncio.run(main())


class StepGate:
    """An engine's on_step hook that stops the model thread after each of the steps `at` until the test opens it:
    what the test sends meanwhile waits, and joins the next step beside the rows in flight, whatever the machine's
    speed. `seen`: the adapters of the rows each step ran (once `engine` is set)."""

    def __init__(self, *at: int):
        self.steps, self.seen, self.engine = 0, [], None
        self.reached = {step: threading.Event() for step in at}
        self.opened = {step: threading.Event() for step in at}

    def __call__(self, rows: int, seconds: float) -> None:
        self.steps += 1
        if self.engine is not None:
            self.seen.append(sorted(r.name for r in self.engine.active))
        if self.steps in self.reached:
            self.reached[self.steps].set()
            assert self.opened[self.steps].wait(300), f"the test never let step {self.steps} go"

    async def wait(self, step: int) -> None:
        reached = await asyncio.get_running_loop().run_in_executor(None, self.reached[step].wait, 300)
        assert reached, f"the engine never ran step {step}"

    def open(self, step: int) -> None:
        self.opened[step].set()


async def until(condition, timeout: float = 300.0) -> None:
    """Wait on the event loop until condition() holds (a bound on a hang, not a pace)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the engine never got there"
        await asyncio.sleep(0.01)


async def arriving(engine, gate: StepGate, plan: list[tuple[int, object, int]]) -> list:
    """Requests that arrive as the engine steps: plan is (after which step, a coroutine function sending the
    request, its rows); 0 is before the first step. Each joins the step right after its own, beside the rows in
    flight. Returns their results in the plan's order."""
    tasks = [asyncio.ensure_future(send()) if step == 0 else None for step, send, _ in plan]
    for step in sorted({step for step, _, _ in plan} - {0}):
        await gate.wait(step)
        queued = engine.waiting_rows + sum(rows for at, _, rows in plan if at == step)
        for i, (at, send, _) in enumerate(plan):
            if at == step:
                tasks[i] = asyncio.ensure_future(send())
        await until(lambda: engine.waiting_rows == queued)
        gate.open(step)
    return list(await asyncio.gather(*tasks))


def test_concurrent_requests_arriving_at_different_times_get_what_generate_gives_each(bank):
    plan = [(["jokes", "jokes2"], SOURCES[:2], 24, 0), (["base"], SOURCES[2:3], 5, 1),
            (["jokes2", "jokes", "jokes"], SOURCES[3:6], 40, 3), (["jokes"], SOURCES[1:2], 2, 5)]
    expected = [bank.generate_per_adapter(names, sources, max_new_tokens=budget) for names, sources, budget, _ in plan]
    gate = StepGate(1, 3, 5)

    async def clients(engine):
        return await arriving(engine, gate, [(step, lambda n=names, s=sources, b=budget: engine.generate(n, s, b),
                                              len(sources)) for names, sources, budget, step in plan])

    assert run(clients, bank, max_rows=3, on_step=gate) == expected  # 3 slots for 7 rows: rows wait, join and leave


def test_beam_search_keeps_generates_path_between_steps(bank):
    async def scenario(engine):
        greedy = asyncio.ensure_future(engine.generate(["jokes2"] * 2, SOURCES[:2], 20))
        beams = await engine.generate(["jokes", "base"], SOURCES[2:4], 12, num_beams=3)
        return beams, await greedy

    beams, greedy = run(scenario, bank)
    assert beams == bank.generate_per_adapter(["jokes", "base"], SOURCES[2:4], max_new_tokens=12, num_beams=3)
    assert greedy == bank.generate_per_adapter(["jokes2"] * 2, SOURCES[:2], max_new_tokens=20)


def test_a_large_request_decodes_a_few_rows_at_a_time_and_a_small_one_joins_beside_it(bank):
    gate = StepGate(3)

    async def scenario(engine):
        gate.engine = engine
        big = asyncio.ensure_future(engine.generate(["jokes"] * 6, SOURCES, 30, min_new_tokens=30))
        await gate.wait(3)  # the model thread stops after its third step, the large request's rows mid-flight
        small = asyncio.ensure_future(engine.generate(["jokes2"], SOURCES[:1], 5))
        await until(lambda: engine.waiting_rows == 4 + 1)  # the large request's 4 rows not yet admitted, and it
        gate.open(3)
        return await big, await small

    big, small = run(scenario, bank, max_rows_per_request=2, on_step=gate)
    assert big == bank.generate_per_adapter(["jokes"] * 6, SOURCES, max_new_tokens=30, min_new_tokens=30)
    assert small == bank.generate_per_adapter(["jokes2"], SOURCES[:1], max_new_tokens=5)
    assert max(names.count("jokes") for names in gate.seen) == 2  # the large request never held more than 2 slots
    assert gate.seen[3] == ["jokes", "jokes", "jokes2"]  # the small one decoded beside it at the next step


def test_a_request_past_its_deadline_ends_and_frees_its_slots_while_others_finish(bank):
    gate = StepGate(1)

    async def scenario(engine):
        slow = asyncio.ensure_future(engine.generate(["jokes"] * 4, SOURCES[:4], 1000, min_new_tokens=1000,
                                                     timeout=0.3))
        await gate.wait(1)  # its rows hold slots, and no step runs until the deadline has passed
        with pytest.raises(DeadlineExceeded, match="took over 0.3 s"):
            await slow
        quick = asyncio.ensure_future(engine.generate(["jokes2"], SOURCES[:1], 8, timeout=300))
        await until(lambda: engine.waiting_rows == 1)
        gate.open(1)
        quick = await quick
        await until(lambda: not engine.active and not engine.waiting)
        return quick, len(engine.active), sum(lane.runner.n for lane in engine.lanes.values())

    quick, active, slots = run(scenario, bank, on_step=gate)
    assert quick == bank.generate_per_adapter(["jokes2"], SOURCES[:1], max_new_tokens=8)
    assert active == 0 and slots == 0


def test_a_full_queue_refuses_a_request_at_once(bank):
    gate = StepGate(1)

    async def scenario(engine):
        first = asyncio.ensure_future(engine.generate(["jokes"] * 2, SOURCES[:2], 200, min_new_tokens=200))
        await gate.wait(1)  # one row decodes, the other waits for the one slot
        with pytest.raises(Busy, match="1 rows are waiting, the most this server queues is 2"):
            await engine.generate(["jokes"] * 2, SOURCES[:2], 4)
        gate.open(1)
        return await first

    assert len(run(scenario, bank, max_rows=1, max_queue_rows=2, on_step=gate)) == 2


def test_holding_the_engine_queues_requests_and_runs_no_step_until_released(bank):
    steps = []

    async def scenario(engine):
        with engine.holding():
            first = asyncio.ensure_future(engine.generate(["jokes"], SOURCES[:1], 4))
            rest = asyncio.ensure_future(engine.generate(["jokes2", "base"], SOURCES[1:3], 6))
            await until(lambda: engine.waiting_rows == 3)
            await asyncio.sleep(0.05)  # not a synchronisation: a held engine must not step, however long it waits
            assert steps == [] and not engine.active
        return await first, await rest

    first, rest = run(scenario, bank, on_step=lambda rows, seconds: steps.append(rows))
    assert first == bank.generate_per_adapter(["jokes"], SOURCES[:1], max_new_tokens=4)
    assert rest == bank.generate_per_adapter(["jokes2", "base"], SOURCES[1:3], max_new_tokens=6)
    assert steps[0] == 3  # the rows queued while held were admitted together


@pytest.mark.parametrize("idle_s", [0.0, 3600.0])
def test_an_engine_idle_for_idle_release_s_lets_go_of_the_slots_a_burst_grew(bank, monkeypatch, idle_s):
    """After IDLE_RELEASE_S without a row the runners' slots go back to their first size (here at once; with an
    hour, a test's few seconds later they are still those the burst grew); the answers are generate()'s."""
    from peft_t5.serve import engine as engine_module

    monkeypatch.setattr(engine_module, "IDLE_RELEASE_S", idle_s)
    sources = [" ".join(["word"] * 300), *SOURCES[:2]]  # a source past the slots' first size

    async def scenario(engine):
        out = await engine.generate(["jokes", "jokes2", "base"], sources, 4)
        runners = [lane.runner for lane in engine.lanes.values()]
        assert runners
        if idle_s:
            await asyncio.to_thread(engine.wait_until, lambda: not engine.busy)
            assert any(r.capacity != r.first_capacity for r in runners)
        else:
            await asyncio.to_thread(engine.wait_until,
                                    lambda: all(r.capacity == r.first_capacity for r in runners))
        return out

    assert run(scenario, bank) == bank.generate_per_adapter(["jokes", "jokes2", "base"], sources, max_new_tokens=4)


def test_streamed_pieces_concatenate_to_the_whole_outputs(bank):
    async def scenario(engine):
        pieces = ["", ""]
        counts = [0, 0]
        async for piece in engine.events(["jokes", "jokes2"], SOURCES[:2], 30):
            pieces[piece.index] += piece.text
            counts[piece.index] += bool(piece.text)
        return pieces, counts

    pieces, counts = run(scenario, bank)
    assert pieces == bank.generate_per_adapter(["jokes", "jokes2"], SOURCES[:2], max_new_tokens=30)
    assert max(counts) > 1  # it came in pieces, not whole


def test_int8_lets_go_of_the_checkpoints_float_weights(tmp_path):
    """The checkpoint is memory-mapped on load; once quantized, nothing may keep the map (and so the float weights it
    holds) in memory, and what stays float still computes the same."""
    import gc

    from transformers import T5ForConditionalGeneration

    tiny_model().save_pretrained(tmp_path / "base")
    checkpoint = str((tmp_path / "base" / "model.safetensors").resolve())
    model = T5ForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    mapped = lambda: checkpoint in Path("/proc/self/maps").read_text()  # noqa: E731
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.inference_mode():
        embedded = model.shared(ids)
    assert mapped()
    quantize_int8(model)
    gc.collect()
    assert not mapped()
    with torch.inference_mode():
        assert torch.equal(model.shared(ids), embedded)
    assert quantize_int8(model) == 0  # nothing float left to quantize: no error either


def test_int8_base_stays_close_to_float32_and_the_engine_still_equals_generate(tmp_path):
    from peft_t5.adapters import save_adapter
    from peft_t5.modeling import add_lora

    torch.manual_seed(0)
    model = add_lora(tiny_model(), dropout=0.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # the size a trained adapter's B has
    tokenizer = tiny_tokenizer()
    save_adapter(model, tokenizer, tmp_path / "a", {"task": "jokes", "base_model": "tiny", "template": "{question}"},
                 "test adapter")
    bank = AdapterBank.load("tiny", {"jokes": str(tmp_path / "a")})
    batch = tokenizer(SOURCES[:3], return_tensors="pt", padding=True)
    start = torch.zeros((3, 1), dtype=torch.long)
    with torch.inference_mode():
        before = bank.model(**batch, decoder_input_ids=start).logits
        replaced = quantize_int8(*bank.models())  # the base and the PeftModel: one int8 layer each shared layer
        after = bank.model(**batch, decoder_input_ids=start).logits
    assert replaced == sum(type(m) is torch.nn.Linear for m in tiny_model().modules())  # the base's, not LoRA's
    assert all(type(m) is torch.nn.Linear for n, m in bank.model.named_modules() if ".lora_A." in n)
    assert (after - before).norm() < 0.05 * before.norm()
    assert (after.argmax(-1) == before.argmax(-1)).all()
    assert run(lambda e: e.generate(["jokes"] * 3, SOURCES[:3], 16), bank) == \
        bank.generate_per_adapter(["jokes"] * 3, SOURCES[:3], max_new_tokens=16)
