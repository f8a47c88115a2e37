"""T5's inference math for the engine's lanes that run through PEFT's own modules (eager): those of DoRA, IA3,
AdaLoRA, VeRA, prompt tuning and whole models, and every lane over a 4-bit (QLoRA) base. Base and LoRA rows run on
static buffers in t5_runner.py, whose compiled step is the fast path; this runner is the general one.

Like t5_runner, each row has a slot in preallocated caches (self-attention keys at the row's own positions,
cross-attention keys computed once when it joins), and rows at different lengths share a step. Every module is
called as the model's own (PEFT's wrappers, 4-bit or int8 layers); where rows of several LoRA adapters share the
pass, each row's is applied by RowLora.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from ..quantize import lazily_zeroed, return_freed_memory

BASE_ADAPTER = "__base__"  # PEFT's adapter_names entry for "no adapter"


def linear(module, x: torch.Tensor, rows: RowLora | None) -> torch.Tensor:
    if not isinstance(module, LoraLayer):
        return module(x)
    if rows is not None:
        return rows.forward(module, x)
    scale = dora_scale(module)
    return module(x) if scale is None else dora(module, x, *scale)


def kept(store: weakref.WeakKeyDictionary, module, key: tuple, weights: tuple, make):
    """make()'s value for this layer, kept in `store` until `key` (adapters, scalings) changes or one of `weights`
    is replaced (an adapter unloaded and another loaded under its name)."""
    found = store.get(module)
    if found is None or found[0] != key or any(a is not b for a, b in zip(found[1], weights)):
        found = store[module] = (key, weights, make())
    return found[2]


DORA_SCALES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LoRA layer -> its DoRA adapter's scale


def dora_scale(module) -> tuple[str, torch.Tensor] | None:
    """(adapter, magnitude / ||W + scaling BA||) of a layer's one active DoRA adapter, kept until its weights change:
    PEFT computes that norm from the whole weight in every forward pass (its DoraCaching keeps BA too, a second copy
    of each weight), though a served adapter's weights do not change between steps. None: leave it to PEFT."""
    adapters = module.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if name not in module.lora_variant or module.training or module.merged or module.disable_adapters or type(
            module.base_layer) is not torch.nn.Linear:
        return None
    layer, weight, scaling = module.lora_magnitude_vector[name], module.base_layer.weight, module.scaling[name]

    def scale() -> torch.Tensor:
        lora_weight = layer.get_lora_weight(lora_A=module.lora_A[name], lora_B=module.lora_B[name]).to(weight.dtype)
        norm = layer.get_weight_norm(weight=weight, lora_weight=lora_weight, scaling=scaling)
        return (layer.weight / norm).view(1, -1)

    weights = (weight, module.lora_A[name].weight, module.lora_B[name].weight, layer.weight)
    return name, kept(DORA_SCALES, module, (name, scaling), weights, scale)


def dora(module, x: torch.Tensor, name: str, scale: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA forward in eval mode, op for op, with the kept scale."""
    result = module.base_layer(x)
    lora = module.lora_B[name](module.lora_A[name](x.to(module.lora_A[name].weight.dtype)))
    base = result if module.base_layer.bias is None else result - module.base_layer.bias
    return (result + ((scale - 1) * base + scale * lora * module.scaling[name])).to(result.dtype)


LORA_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LoRA layer -> RowLora's stacked adapters


class RowLora:
    """Each row through its own LoRA adapter, in one pass per layer: the A of the adapters that the rows use, stacked
    [R, in], and their B with the scaling folded in, stacked [R, out]; a one-hot [rows, R] keeps each row's own part.
    Written by hand because PEFT's adapter_names loops over the adapters with a gather and a scatter each (S-LoRA and
    Punica gather per row with a custom kernel; a CPU has none, and with a few adapters the dense mask costs less).
    A layer with a LoRA variant among them (DoRA: the engine gives those a lane of their own) is left to PEFT."""

    def __init__(self, names: list[str], device: torch.device):
        self.names, self.device = names, device
        self.adapters = sorted(set(names) - {BASE_ADAPTER})
        self.mixed = len(set(names)) > 1  # else every row uses the one adapter: no mask
        self.masks: dict[tuple, torch.Tensor] = {}

    def forward(self, module, x: torch.Tensor) -> torch.Tensor:
        adapters = tuple(a for a in self.adapters if a in module.lora_A)
        if module.training or module.merged or module.disable_adapters or any(
                a in module.lora_variant for a in adapters):
            return module(x, adapter_names=self.names)
        result = module.base_layer(x)
        if not adapters:
            return result
        a, b = self.stacked(module, adapters)
        low = x.to(a.dtype) @ a.t()
        if self.mixed:
            mask = self.mask(adapters, tuple(module.r[name] for name in adapters), a.dtype)
            low = low * (mask if x.dim() == 2 else mask[:, None, :])
        return result + (low @ b).to(result.dtype)

    def stacked(self, module, adapters: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """A and scaled B of these adapters, kept per layer (across steps and runners) until its adapters or their
        weights change."""
        a, b = [module.lora_A[n].weight for n in adapters], [module.lora_B[n].weight for n in adapters]
        scaling = tuple(module.scaling[n] for n in adapters)
        return kept(LORA_STACKS, module, (adapters, scaling), (*a, *b), lambda: (
            torch.cat(a), torch.cat([(w * s).t() for w, s in zip(b, scaling)])))

    def mask(self, adapters: tuple[str, ...], ranks: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (adapters, ranks, dtype)
        if key not in self.masks:
            columns = {name: (sum(ranks[:i]), sum(ranks[:i + 1])) for i, name in enumerate(adapters)}
            mask = torch.zeros((len(self.names), sum(ranks)))
            for row, name in enumerate(self.names):
                if name in columns:
                    mask[row, columns[name][0]:columns[name][1]] = 1.0
            self.masks[key] = mask.to(self.device, dtype)
        return self.masks[key]


def norm(layer, h: torch.Tensor) -> torch.Tensor:
    """T5's RMS norm; in float32 as one fused op (equal to T5LayerNorm's bit for bit, in a third less time)."""
    weight = layer.weight
    if h.dtype == weight.dtype == torch.float32:
        return F.rms_norm(h, weight.shape, weight, layer.variance_epsilon)
    return layer(h)


def attention(att, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
              rows: RowLora | None) -> torch.Tensor:
    """T5 attention of queries from x over given keys/values (no 1/sqrt(d) scaling: T5 folds it into q)."""
    n, length = x.shape[:2]
    q = linear(att.q, x, rows).view(n, length, att.n_heads, att.key_value_proj_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias.to(q.dtype), scale=1.0)
    return linear(att.o, out.transpose(1, 2).reshape(n, length, -1), rows)


def project(att, x: torch.Tensor, rows: RowLora | None) -> tuple[torch.Tensor, torch.Tensor]:
    n, length = x.shape[:2]
    shape = (n, length, att.n_heads, att.key_value_proj_dim)
    return (linear(att.k, x, rows).view(shape).transpose(1, 2),
            linear(att.v, x, rows).view(shape).transpose(1, 2))


def feed_forward(dense, x: torch.Tensor, rows: RowLora | None) -> torch.Tensor:
    if hasattr(dense, "wi_0"):  # gated (flan-t5, t5 v1.1)
        h = dense.act(linear(dense.wi_0, x, rows)) * linear(dense.wi_1, x, rows)
    else:
        h = dense.act(linear(dense.wi, x, rows))
    weight = getattr(dense.wo, "weight", None)  # T5 keeps wo in float32: cast into it as T5 does
    if isinstance(weight, torch.Tensor) and weight.dtype not in (h.dtype, torch.int8) and weight.is_floating_point():
        h = h.to(weight.dtype)
    return linear(dense.wo, h, rows)


class ModuleRunner:
    """Slots of decoder state for up to `capacity` rows; rows 0..n-1 are active (a leaving row's slot is filled by
    the last one, so the active rows stay contiguous and a step slices, never gathers)."""

    def __init__(self, model, capacity: int = 8):
        t5 = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.t5, self.config = t5, t5.config
        first = t5.decoder.block[0].layer[0].SelfAttention
        self.heads, self.head_dim = first.n_heads, first.key_value_proj_dim
        self.layers = len(t5.decoder.block)
        self.scale = self.config.d_model ** -0.5 if getattr(self.config, "scale_decoder_outputs",
                                                            self.config.tie_word_embeddings) else 1.0
        self.dtype = t5.shared.weight.dtype if t5.shared.weight.is_floating_point() else torch.float32
        self.device = t5.shared.weight.device
        self.n = 0
        self._allocate(capacity, 16, 16)
        self.first_capacity = self.capacity

    def _allocate(self, rows: int, length: int, source: int) -> None:
        """(Re)allocate the slots, keeping what the active rows hold."""
        fresh = not hasattr(self, "self_k")

        used = {"self": [], "cross": []} if fresh else written_extents(self)
        for name, size in (("self_k", length), ("self_v", length), ("cross_k", source), ("cross_v", source)):
            tensors = [None] * self.layers if fresh else getattr(self, name)
            for i in range(self.layers):  # in place, layer by layer: each old tensor goes (back to the OS: its own
                tensors[i] = grown_cache(tensors[i], (rows, self.heads, size, self.head_dim), used[name[:-2]],
                                         self.dtype, self.device)  # mapping) before the next new one is made, so
            setattr(self, name, tensors)  # growing never holds two whole caches at once
        for name in ("lengths", "source_lengths"):
            new = torch.zeros(rows, dtype=torch.long, device=self.device)
            if not fresh:
                new[:self.n] = getattr(self, name)[:self.n]
            setattr(self, name, new)

    @property
    def capacity(self) -> tuple[int, int, int]:
        return self.self_k[0].shape[0], self.self_k[0].shape[2], self.cross_k[0].shape[2]

    def _fit(self, rows: int, length: int, source: int) -> None:
        have_rows, have_length, have_source = self.capacity
        if rows > have_rows or length > have_length or source > have_source:
            self._allocate(max(rows, have_rows * 2 if rows > have_rows else have_rows),
                           max(length, have_length * 2 if length > have_length else have_length),
                           max(source, have_source))

    @torch.inference_mode()
    def add(self, sources: list[list[int]], names: list[str] | None, prefix: torch.Tensor | None = None,
            budgets: list[int] | None = None) -> None:
        """Encode new rows (token ids, each ending with </s>) and give them slots n.. n+len-1. Rows with the same
        source and adapter (the samples or beams of one input) are encoded once and their cross-attention copied.
        prefix: embeddings put before every source (a prompt-tuning adapter's soft prompt)."""
        m = len(sources)
        extra = 0 if prefix is None else prefix.shape[0]
        self._fit(self.n + m, 1, max(len(s) for s in sources) + extra)
        groups, copies = encoding_plan(sources, names)
        for group in groups:
            ids, mask = padded(sources, group, self.device)
            group_rows = RowLora([names[i] for i in group], self.device) if names is not None else None
            hidden, mask = self._encode(ids, mask, group_rows, prefix)
            slots = torch.tensor([self.n + i for i in group], device=self.device)
            width = hidden.shape[1]
            for layer, block in enumerate(self.t5.decoder.block):
                k, v = project(block.layer[1].EncDecAttention, hidden, group_rows)
                self.cross_k[layer][slots, :, :width], self.cross_v[layer][slots, :, :width] = k, v  # beyond: masked
            self.source_lengths[slots] = mask.sum(1)
        copy_sources(self, copies)
        self.lengths[self.n:self.n + m] = 0
        self.n += m

    @torch.inference_mode()
    def reorder(self, slots: list[int], parents: list[int]) -> None:
        """Beam search: slot slots[j] takes the self-attention state of slot parents[j] (all of one input, at one
        length: cross-attention is the same for all)."""
        to, of = torch.tensor(slots, device=self.device), torch.tensor(parents, device=self.device)
        for tensors in (self.self_k, self.self_v):
            for t in tensors:
                t[to] = t[of]

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor, rows: RowLora | None,
                prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.t5.encoder
        h = encoder.embed_tokens(ids)
        if prefix is not None:  # as PEFT's prompt tuning: the soft prompt, then the source, all attended to
            h = torch.cat((prefix.to(h.dtype).expand(len(ids), -1, -1), h), dim=1)
            mask = torch.cat((torch.ones((len(ids), prefix.shape[0]), dtype=torch.bool, device=mask.device), mask), 1)
        length = h.shape[1]
        first = encoder.block[0].layer[0].SelfAttention
        bias = first.compute_bias(length, length, device=ids.device)  # [1, heads, L, L]
        bias = bias + torch.where(mask, 0.0, torch.finfo(bias.dtype).min)[:, None, None, :]
        for block in encoder.block:
            sa, ff = block.layer[0], block.layer[-1]
            x = norm(sa.layer_norm, h)
            k, v = project(sa.SelfAttention, x, rows)
            h = h + attention(sa.SelfAttention, x, k, v, bias, rows)
            h = h + feed_forward(ff.DenseReluDense, norm(ff.layer_norm, h), rows)
        return norm(encoder.final_layer_norm, h), mask

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, names: list[str] | None) -> torch.Tensor:
        """Logits [n, vocab] of the next token for every active row, given each row's last token [n]."""
        n = self.n
        lora = RowLora(names, self.device) if names is not None else None
        lengths = self.lengths[:n]
        span = int(lengths.max()) + 1
        self._fit(n, span, 1)
        decoder = self.t5.decoder
        h = decoder.embed_tokens(tokens[:, None])
        positions = torch.arange(span, device=self.device)
        first = decoder.block[0].layer[0].SelfAttention
        buckets = first._relative_position_bucket(positions[None, :] - lengths[:, None], bidirectional=False,
                                                  num_buckets=first.relative_attention_num_buckets,
                                                  max_distance=first.relative_attention_max_distance)
        self_bias = first.relative_attention_bias(buckets).permute(0, 2, 1)[:, :, None, :]  # [n, heads, 1, span]
        minimum = torch.finfo(self_bias.dtype).min
        self_bias = self_bias + torch.where(positions[None, :] <= lengths[:, None], 0.0, minimum)[:, None, None, :]
        source = int(self.source_lengths[:n].max())
        cross_bias = torch.where(torch.arange(source, device=self.device)[None, :] < self.source_lengths[:n, None],
                                 0.0, minimum)[:, None, None, :]
        rows = torch.arange(n, device=self.device)
        for i, block in enumerate(decoder.block):
            sa, ca, ff = block.layer
            x = norm(sa.layer_norm, h)
            k, v = project(sa.SelfAttention, x, lora)
            self.self_k[i][rows, :, lengths] = k[:, :, 0]
            self.self_v[i][rows, :, lengths] = v[:, :, 0]
            h = h + attention(sa.SelfAttention, x, self.self_k[i][:n, :, :span], self.self_v[i][:n, :, :span],
                              self_bias, lora)
            h = h + attention(ca.EncDecAttention, norm(ca.layer_norm, h), self.cross_k[i][:n, :, :source],
                              self.cross_v[i][:n, :, :source], cross_bias, lora)
            h = h + feed_forward(ff.DenseReluDense, norm(ff.layer_norm, h), lora)
        self.lengths[:n] += 1
        h = norm(decoder.final_layer_norm, h) * self.scale
        head = PackedHead.of(self.t5.lm_head) if n > 1 else None  # with one row the plain projection is as fast
        if head is not None:
            return head(h[:, 0])
        return linear(self.t5.lm_head, h, lora)[:, 0].float()

    @torch.inference_mode()
    def remove(self, row: int) -> None:
        """Free row's slot: the last active row moves into it."""
        last = self.n - 1
        if row != last:
            move_row(self, row, last)
            self.lengths[row], self.source_lengths[row] = self.lengths[last], self.source_lengths[last]
        self.n = last


PACKED_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # output projection -> its PackedHead


class PackedHead:
    """The output projection from a copy of its weight in oneDNN's packed layout (on a CPU, float32). The step's
    largest matmul, [rows, d_model] x [d_model, vocab], runs 1.2-2.4x faster from it than MKL's sgemm does from the
    plain weight with 2 to 64 rows, not with one (benchmarks/README.md); the copy costs vocab x d_model floats (66 MB
    for t5-small).
    The same packing is what torch.compile's CPU backend does to frozen weights; its op is internal to PyTorch, so any
    failure to pack leaves the plain projection in use."""

    def __init__(self, weight: torch.Tensor, packed: torch.Tensor):
        self.weight, self.packed = weight, packed

    @classmethod
    def of(cls, head) -> PackedHead | None:
        """The model's packed projection, made once per model (runners come and go with the engine's lanes)."""
        weight = getattr(head, "weight", None)
        if type(head) is not torch.nn.Linear or head.bias is not None or weight.device.type != "cpu" or (
                weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available()):
            return None
        made = PACKED_HEADS.get(head)
        if made is None or not made.fits(head):
            try:
                made = PACKED_HEADS[head] = cls(weight, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64))
            except (AttributeError, RuntimeError):
                return None
        return made

    def fits(self, head) -> bool:
        """Still the model's projection: an adapter loaded since may have wrapped it."""
        return getattr(head, "weight", None) is self.weight and type(head) is torch.nn.Linear

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(h.contiguous(), self.packed, None, "none", [], "")


def encoding_plan(sources: list[list[int]], names: list[str] | None) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Rows with the same source and adapter (the samples or beams of one input) are encoded once: the distinct
    rows in groups of similar length (length_groups), and (row, the row it repeats) for the others."""
    keys = [(tuple(s), names[i] if names is not None else None) for i, s in enumerate(sources)]
    first = {key: i for i, key in reversed(list(enumerate(keys)))}  # each key's first row
    unique = sorted(set(first.values()))
    groups = [[unique[j] for j in group] for group in length_groups([sources[i] for i in unique])]
    return groups, [(i, first[key]) for i, key in enumerate(keys) if first[key] != i]


def padded(sources: list[list[int]], group: list[int], device, least: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's sources as one batch of token ids, padded to the longest (and to `least` tokens), and its mask."""
    longest = max(least, *(len(sources[i]) for i in group))
    ids = torch.zeros((len(group), longest), dtype=torch.long, device=device)
    mask = torch.zeros((len(group), longest), dtype=torch.bool, device=device)
    for row, i in enumerate(group):
        ids[row, :len(sources[i])], mask[row, :len(sources[i])] = torch.tensor(sources[i]), True
    return ids, mask


def written_extents(runner) -> dict[str, list[int]]:
    """Each active row's positions written so far, of its self- and its cross-attention caches: what growing the
    caches copies (no further: the new caches' pages past them stay unwritten, lazily_zeroed)."""
    return {"self": (runner.lengths[:runner.n] + 1).tolist(), "cross": runner.source_lengths[:runner.n].tolist()}


def grown_cache(old: torch.Tensor | None, shape: tuple[int, ...], extents: list[int], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """A lazily zeroed cache of `shape` [rows, heads, positions, head_dim] holding the first extents[r] positions of
    old's row r (old: None, or the cache it replaces)."""
    new = lazily_zeroed(shape, dtype, device)
    for row, extent in enumerate(extents if old is not None else []):
        extent = min(extent, shape[2], old.shape[2])
        new[row, :, :extent] = old[row, :, :extent]
    return new


def move_row(runner, row: int, last: int) -> None:
    """Row last's caches into row's slot: the positions it has written, no further (its pages past them stay
    unwritten; what the slot's old row left there is masked, as zeros were)."""
    written, source = int(runner.lengths[last]) + 1, int(runner.source_lengths[last])
    for tensors, extent in ((runner.self_k, written), (runner.self_v, written), (runner.cross_k, source),
                            (runner.cross_v, source)):
        for t in tensors:
            t[row, :, :extent] = t[last, :, :extent]


def copy_sources(runner, copies: list[tuple[int, int]]) -> None:
    """New rows that repeat another new row (encoding_plan's copies, numbered from runner.n) take its
    cross-attention keys and values and its source length."""
    if copies:
        to, of = (torch.tensor(c, device=runner.device) + runner.n for c in zip(*copies))
        longest = int(runner.source_lengths[of].max())  # no further: pages past it stay unwritten (lazily_zeroed)
        for tensors in (runner.cross_k, runner.cross_v):
            for t in tensors:
                t[to, :, :longest] = t[of, :, :longest]
        runner.source_lengths[to] = runner.source_lengths[of]


def release_when_idle(runner) -> None:
    """With no row left, a runner's slots go back to their first size: what a burst of rows grew (t5-small, 32 SQuAD
    rows: 403 MB of cross-attention caches) goes back to the OS rather than staying held while the server idles (the
    engine calls it once it has had no row for IDLE_RELEASE_S); the next rows grow them again."""
    if runner.n or runner.capacity == runner.first_capacity:
        return
    for name in ("self_k", "self_v", "cross_k", "cross_v"):
        delattr(runner, name)
    runner._allocate(*runner.first_capacity)
    if runner.device.type == "cpu":
        return_freed_memory()


CALL_TOKENS = 24  # what one encoder call costs beyond its rows, in padded tokens' worth (t5-small, 1 thread, a
# 2-core AMD EPYC: with 24, 32 SQuAD prompts encode in 13% less time than under the 15%-padding bound this replaced,
# 32 jokes prompts as fast; 80 was slower on SQuAD, and a 2% bound, 19 calls, 25% slower on jokes)
ATTENTION_LENGTH = 2400  # a row of L tokens costs L * (1 + L / ATTENTION_LENGTH): attention's share, 21% at 512


def length_groups(sources: list[list[int]], most_tokens: int = 16384) -> list[list[int]]:
    """Indices of sources in groups of similar length, each encoded as one padded batch of at most `most_tokens`
    tokens: the split of the sources by length that costs least, counting each group's call (CALL_TOKENS) and its
    padded rows (ATTENTION_LENGTH). 32 SQuAD prompts: 13 calls padding 1% of their tokens (under the 15% bound this
    replaced: 4 calls, 8%); 32 jokes prompts: 5 calls, 9% (6, 11%)."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    lengths = [len(sources[i]) for i in order]
    best = [0.0] + [float("inf")] * len(order)  # best[j]: the cost of the j shortest sources' groups
    cut = [0] * (len(order) + 1)  # cut[j]: where the last of those groups starts
    for j in range(1, len(order) + 1):
        longest = lengths[j - 1]
        row = longest * (1 + longest / ATTENTION_LENGTH)
        for i in range(j - 1, -1, -1):
            if (j - i) * longest > most_tokens and i < j - 1:
                break
            cost = best[i] + CALL_TOKENS + (j - i) * row
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]
