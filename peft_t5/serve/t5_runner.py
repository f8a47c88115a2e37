"""T5's inference math for the engine's lane of base and LoRA rows, over static buffers: encode new rows, then
decode one token for every active row, each through its own LoRA adapter.

Written by hand rather than calling `generate()` because `generate()` decodes one fixed batch from start to end
(rows cannot join or leave it) with caches that grow by concatenation. Here every buffer has a slot per row; rows
0..n-1 are active, and a leaving row's slot is filled by the last one, so a step slices, never gathers:
- self-attention keys and values [rows, heads, length, head_dim] per layer, sized for a row's whole budget when it
  joins (no growth mid-decoding) and masked past each row's length. T5's self-attention bias depends only on key
  minus query position, so rows at different lengths share a step;
- cross-attention keys and values, computed once when a row joins (one matmul for K and V);
- Q/K/V are one matmul: the base's q, k and v weights become views into the fused weight, so it is held once;
- LoRA: LoraSlots, the A and B of the adapters in flight in stacks that the step gathers per row (vLLM's LoRA
  slots), so rows of different adapters and of the base share one pass.

The step (T5Weights.step) is a pure function of tensors. compiled.py compiles it and runs it eagerly until then;
the lengths, the row count, the number of slots and the LoRA rank reach it as symbolic sizes, so rows joining,
buffers growing and adapters loading never recompile it.
"""
from __future__ import annotations

import logging
import re

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..quantize import HeldByOneDNN, Int8Linear
from .module_runner import (
    BASE_ADAPTER,
    ModuleRunner,
    copy_sources,
    encoding_plan,
    grown_cache,
    move_row,
    padded,
    written_extents,
)

logger = logging.getLogger(__name__)
# a LoRA layer's place in T5 -> the projection's name in the step (cross-attention: c*)
LORA_PLACE = re.compile(r"(?:^|\.)(encoder|decoder)\.block\.(\d+)\.layer\.\d\.(SelfAttention|EncDecAttention|"
                        r"DenseReluDense)\.(q|k|v|o|wi|wi_0|wi_1|wo)$")
STEP_PROJECTIONS = ("q", "k", "v", "o", "cq", "co", "wi", "wi_0", "wi_1", "wo")  # the rest run when a row joins
STEP_LAYERS = ("qkv", "o", "cq", "co", "wi", "wi_0", "wi_1", "wo")  # a decoder Block's layers the step runs
PACK_ROWS = 16  # oneDNN lays a held float weight out for products of about this many rows (compiled.EXAMPLE_ROWS)


def cache_dtype(model, setting: str = "auto") -> torch.dtype:
    """The attention caches' dtype for serve --kv_cache_dtype: float32 or bfloat16 as named; auto, the base's float
    dtype, but bfloat16 for an int8 base on a CPU: the step of many rows streams its caches from memory (t5-small, 32
    jokes rows, int8: self- and cross-attention 370 and 243 us a layer in float32, 187 and 162 in bfloat16), and int8
    already trades exactness for speed. Keys and values are rounded to bfloat16 once; every sum stays float32."""
    if setting not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"kv_cache_dtype {setting!r}: auto, float32 or bfloat16")
    if setting != "auto":
        return getattr(torch, setting)
    from ..quantize import holds_int8

    t5 = base_model(model)
    if holds_int8(t5) and t5.shared.weight.device.type == "cpu":
        return torch.bfloat16
    return t5.shared.weight.dtype


def base_model(model) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def static_problem(model) -> str | None:
    """Why this base cannot run on static buffers (None: it can): its linear layers must be float or Int8Linear."""
    t5 = base_model(model)
    for block in [*t5.encoder.block, *t5.decoder.block]:
        for module in block.modules():
            layer = base_layer(module)
            if layer is module and isinstance(module, nn.Linear) and type(module) not in (nn.Linear, Int8Linear):
                return f"its layers are {type(module).__name__} (a 4-bit base): the step runs through PEFT's modules"
    return None


class Linear(nn.Module):
    """A base weight as the step reads it (float32 or bfloat16); in and out float32, the residual stream's dtype."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight
        self.held: HeldByOneDNN | None = None  # oneDNN's copy laid out for several rows (hold), where it has one
        self.tiles: torch.Tensor | None = None  # or peft-t5's (tile): kernels.pack_f32's copy

    def hold(self) -> None:
        """Products of this layer (but a float32 row's) take a copy oneDNN lays out for several rows, held by number:
        what inductor's freezing would prepack into each graph, held once and named by the graphs."""
        self.held = HeldByOneDNN(torch.ops.peft_t5.onednn_float_pack(self.weight, PACK_ROWS))

    def tile(self) -> None:
        """Products of this float32 layer take f32_tiles over its packed copy (f32_tiles_problem), one row's too."""
        self.tiles = kernels.pack_f32(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiles is not None and by_kernel_float32(x, self.weight):  # one row too: 1.11-1.23x f32_matvec's
            y = torch.ops.peft_t5.f32_tiles(x.reshape(-1, x.shape[-1]), self.tiles, self.weight.shape[0])
            return y.reshape(*x.shape[:-1], self.weight.shape[0])  # products in the step (step_products.py)
        if one_row_float32(x, self.weight):  # the one-row step: peft-t5's kernel streams the weight (kernels.py)
            return torch.ops.peft_t5.f32_matvec(x, self.weight)
        # (as torch.mv, inductor would write a one-row product as its own reduction, fused with the norm before it:
        # 43% slower a step than the prepacked product)
        if self.held is not None:
            rows = x.reshape(-1, x.shape[-1]).to(self.weight.dtype)
            if by_kernel_float32(rows, self.weight):  # 2-4 rows peft-t5's kernel, more oneDNN's, decided in the op
                y = torch.ops.peft_t5.f32_rows(rows, self.weight, self.held.number, self.weight.shape[0])
            else:
                y = torch.ops.peft_t5.onednn_float_linear(rows, self.held.number, self.weight.shape[0])
            return y.reshape(*x.shape[:-1], self.weight.shape[0]).float()
        return F.linear(x.to(self.weight.dtype), self.weight).float()


def one_row_float32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight.T goes to peft-t5's float32 kernel: one row [1, K] of the step, a float32 weight in one
    block of memory, on a CPU, without autograd."""
    return x.dim() == 2 and x.shape[0] == 1 and by_kernel_float32(x, weight)


def by_kernel_float32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether peft-t5's float32 kernels can take x [rows, K] @ weight.T: float32 in one block of memory, on a CPU,
    without autograd. Of several rows, f32_rows takes 2-4 itself (csrc/f32_matvec.cpp: one stream of the weight at
    ~18 GB/s where oneDNN's product read t5-small's decoder at ~10 in the step) and gives more to oneDNN."""
    return (kernels.ready and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.is_contiguous() and not (x.requires_grad or weight.requires_grad))


def step_linear(layer: nn.Module) -> nn.Module:
    layer = base_layer(layer)
    return layer if isinstance(layer, Int8Linear) else Linear(layer.weight)


def fused(layers: list[nn.Module]) -> nn.Module:
    """One layer computing these layers' outputs side by side; each layer's weight becomes a view into its
    weight, so that the model and the step share it (int8 where the CPU has AVX512-VNNI: into its packed weight, the one
    copy, when each layer's outputs fill whole blocks of 32)."""
    layers = [base_layer(layer) for layer in layers]
    with torch.no_grad():
        if all(isinstance(layer, Int8Linear) for layer in layers):
            weight = torch.cat([layer.weight for layer in layers])
            scale = torch.cat([layer.weight_scale for layer in layers])
            out = Int8Linear(torch.zeros(1, 1))
            out.out_features, out.in_features = weight.shape
            out.weight_zero_point = torch.zeros(weight.shape[0], dtype=torch.long)
            out.set_weight(weight, scale)
            out.pack_for_kernel()
            if out.packed_weight is not None and all(layer.out_features % 32 == 0 for layer in layers):
                blocks = torch.split(out.packed_weight, [layer.out_features // 16 for layer in layers])
                for layer, packed, s in zip(layers, blocks, views(scale, layers)):
                    layer.set_packed(packed, s)
                return out
            for layer, (w, s) in zip(layers, zip(views(weight, layers), views(scale, layers))):
                layer.set_weight(w, s)
            return out
        weight = nn.Parameter(torch.cat([layer.weight for layer in layers]), requires_grad=False)
        for layer, w in zip(layers, views(weight, layers)):
            layer.weight = nn.Parameter(w, requires_grad=False)
        return Linear(weight)


def views(tensor: torch.Tensor, layers: list[nn.Module]) -> list[torch.Tensor]:
    return list(torch.split(tensor.detach(), [layer.out_features for layer in layers]))


class Block(nn.Module):
    """One T5 block's weights as the step reads them."""

    def __init__(self, block, decoder: bool):
        super().__init__()
        sa, ff = block.layer[0], block.layer[-1]
        attention = sa.SelfAttention
        self.norm_sa = sa.layer_norm.weight
        self.qkv = fused([attention.q, attention.k, attention.v])
        self.o = step_linear(attention.o)
        if decoder:
            ca = block.layer[1].EncDecAttention
            self.norm_ca = block.layer[1].layer_norm.weight
            self.cq, self.ckv, self.co = step_linear(ca.q), fused([ca.k, ca.v]), step_linear(ca.o)
        dense = ff.DenseReluDense
        self.norm_ff, self.act = ff.layer_norm.weight, dense.act
        self.gated = hasattr(dense, "wi_0")
        if self.gated:  # flan-t5, t5 v1.1
            self.wi_0, self.wi_1 = step_linear(dense.wi_0), step_linear(dense.wi_1)
        else:
            self.wi = step_linear(dense.wi)
        self.wo = step_linear(dense.wo)


def lora_delta(x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Each row's LoRA: x [rows, (tokens,) in] through its slot's A [rank, in] and scaled B.T [rank, out]."""
    if x.dim() == 2 and torch.compiler.is_compiling():  # written as reductions, inductor fuses the gathers into
        low = (a[slots] * x[:, None, :]).sum(-1)  # them (no gathered copy of the stacks); B.T lets it vectorise
        return (bt[slots] * low[:, :, None]).sum(1)  # over the outputs
    x3 = x if x.dim() == 3 else x[:, None, :]
    out = torch.bmm(torch.bmm(x3, a[slots].transpose(1, 2)), bt[slots])
    return out if x.dim() == 3 else out[:, 0]


class T5Weights(nn.Module):
    """The base's weights arranged for serving, and T5's math over them: encode (when rows join) and step."""

    def __init__(self, model, hold_float: bool = False, cache_dtype: torch.dtype | None = None):
        """hold_float: hold oneDNN's copies of the float weights compiled graphs would freeze (hold_for_onednn).
        cache_dtype: of the attention caches (None: the model's float dtype)."""
        super().__init__()
        t5 = base_model(model)
        config = t5.config
        self.config = config
        first = t5.encoder.block[0].layer[0].SelfAttention
        self.heads, self.head_dim, self.d_model = first.n_heads, first.key_value_proj_dim, config.d_model
        self.eps = config.layer_norm_epsilon
        self.buckets, self.max_distance = first.relative_attention_num_buckets, first.relative_attention_max_distance
        self.position_bucket = first._relative_position_bucket  # a static method: T5's bucketing
        self.embed = t5.shared.weight
        if self.embed.device.type == "cpu":
            kernels.kernel_problem()  # builds peft-t5's kernels once per machine (~30 s on 2 cores), else loads them
            kernels.attention_problem()
        self.encoder = nn.ModuleList(Block(block, False) for block in t5.encoder.block)
        self.decoder = nn.ModuleList(Block(block, True) for block in t5.decoder.block)
        self.encoder_bias = first.relative_attention_bias.weight
        self.decoder_bias = t5.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        self.encoder_norm, self.decoder_norm = t5.encoder.final_layer_norm.weight, t5.decoder.final_layer_norm.weight
        self.head = step_linear(t5.lm_head)
        self.head_scale = config.d_model ** -0.5 if getattr(config, "scale_decoder_outputs",
                                                            config.tie_word_embeddings) else 1.0
        self.dtype = self.embed.dtype  # the model's float dtype
        self.cache_dtype = cache_dtype or self.dtype
        for module in self.modules():  # int8: every product through peft-t5's packed kernel where the CPU has VNNI
            if isinstance(module, Int8Linear):
                module.pack_for_kernel()
        self.held = self.hold_for_onednn(hold_float)

    def hold_for_onednn(self, hold_float: bool) -> bool:
        """Give oneDNN's products of several rows copies of the weights laid out once and held by number (kernels.
        onednn_problem), numbered in this order (a restart gives each the same number, so that inductor's cache finds
        the graphs that name them): int8 layers (not packed for peft-t5's kernel), and with hold_float the float layers
        whose compiled graphs inductor would freeze otherwise (a bfloat16 base's; a float32 base's step, and its encoder
        but on Intel's CPUs: its one-row step reads the weights as they are). A float32 step's layers take packed copies
        for peft-t5's f32_tiles instead where kernels.f32_tiles_problem() allows (the one-row step's too), and oneDNN
        holds none of them. Returns whether the compiled graphs need no freezing."""
        if self.embed.device.type != "cpu" or kernels.onednn_problem() is not None:
            return False
        int8 = [m for m in self.modules() if isinstance(m, Int8Linear)]
        for layer in int8:
            layer.hold_for_onednn()
        if int8 or not hold_float:
            return bool(int8)
        if self.dtype == torch.float32:
            layers = [getattr(b, name) for b in self.decoder for name in STEP_LAYERS if hasattr(b, name)]
            layers.append(self.head)
            if kernels.f32_tiles_problem() is None:
                for layer in layers:
                    layer.tile()
                layers = []
            if not kernels.intel_cpu():  # MKL's products are as fast as oneDNN's on Intel's CPUs only (a prepacked
                # encoder was no faster on a Xeon); on an AMD EPYC oneDNN's were 12-17% faster at the encoder's shapes:
                # 32 jokes rows encoded in 11.0 ms a row, not 13.2 (the copy: 88 MB for t5-small, 1.4 GB flan-t5-large)
                layers += [m for b in self.encoder for m in b.modules() if isinstance(m, Linear)]
                layers += [b.ckv for b in self.decoder]
        else:
            layers = [m for m in self.modules() if isinstance(m, Linear)]
        try:
            for layer in layers:
                layer.hold()
        except RuntimeError as e:  # oneDNN cannot lay out this dtype here: inductor's frozen graphs, as before
            logger.warning("oneDNN holds no %s weights here (%s); the compiled graphs freeze them",
                           self.dtype, str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__)
            for layer in layers:
                layer.held = None
            return False
        return True

    def norm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(h, (self.d_model,), weight.float(), self.eps)

    def project(self, layer, x, lora: dict, slots, names: tuple[str, ...]) -> torch.Tensor:
        """layer(x), plus each row's LoRA of the projections the layer computes (side by side, fused)."""
        out = layer(x)
        deltas = [lora.get(name) for name in names]
        if not any(d is not None for d in deltas):
            return out
        size = out.shape[-1] // len(names)
        parts = [lora_delta(x, *d, slots) if d is not None else x.new_zeros((*x.shape[:-1], size)) for d in deltas]
        return out + (parts[0] if len(parts) == 1 else torch.cat(parts, -1))

    def feed_forward(self, block: Block, x, lora: dict, slots, prefix: str) -> torch.Tensor:
        if block.gated:
            h = block.act(self.project(block.wi_0, x, lora, slots, (f"{prefix}wi_0",))) * \
                self.project(block.wi_1, x, lora, slots, (f"{prefix}wi_1",))
        else:
            h = block.act(self.project(block.wi, x, lora, slots, (f"{prefix}wi",)))
        return self.project(block.wo, h, lora, slots, (f"{prefix}wo",))

    def heads_of(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, tokens, heads * head_dim] -> [rows, heads, tokens, head_dim]"""
        return x.view(*x.shape[:2], self.heads, self.head_dim).transpose(1, 2)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor, lora: dict, slots: torch.Tensor) -> torch.Tensor:
        """The encoder's last hidden state [rows, tokens, d_model] (float32), each row through its LoRA slot."""
        h = F.embedding(ids, self.embed).float()
        length = ids.shape[1]
        positions = torch.arange(length, device=ids.device)
        buckets = self.position_bucket(positions[None, :] - positions[:, None], bidirectional=True,
                                       num_buckets=self.buckets, max_distance=self.max_distance)
        # gathered head-major: the sum below takes this layout, and attention copies a bias whose rows are not
        # contiguous in every layer (an embedding permuted to [heads, L, L]: 14% of an eager 600-token pass)
        bias = self.encoder_bias.t()[:, buckets][None].float()  # [1, heads, L, L]
        bias = bias + torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
        for i, block in enumerate(self.encoder):
            x = self.norm(h, block.norm_sa)
            q, k, v = self.project(block.qkv, x, lora, slots, (f"encoder.{i}.q", f"encoder.{i}.k",
                                                                f"encoder.{i}.v")).split(self.heads * self.head_dim, -1)
            out = F.scaled_dot_product_attention(self.heads_of(q), self.heads_of(k), self.heads_of(v), attn_mask=bias,
                                                 scale=1.0)
            h = h + self.project(block.o, out.transpose(1, 2).flatten(2), lora, slots, (f"encoder.{i}.o",))
            h = h + self.feed_forward(block, self.norm(h, block.norm_ff), lora, slots, f"encoder.{i}.")
        return self.norm(h, self.encoder_norm)

    def cross(self, i: int, hidden: torch.Tensor, lora: dict, slots) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layer i's cross-attention keys and values of encoded rows, in one matmul."""
        kv = self.project(self.decoder[i].ckv, hidden, lora, slots, (f"decoder.{i}.ck", f"decoder.{i}.cv"))
        k, v = kv.split(self.heads * self.head_dim, -1)
        return self.heads_of(k).to(self.cache_dtype), self.heads_of(v).to(self.cache_dtype)

    def step(self, tokens, lengths, source_lengths, slots, self_k: list, self_v: list, cross_k: list, cross_v: list,
             lora: dict) -> torch.Tensor:
        """Logits [rows, vocab] (float32) of each row's next token. tokens, lengths (tokens decoded so far),
        source_lengths, slots (LoRA): [rows]; self_k/v: per layer [rows, heads, >= max(lengths) + 1, head_dim],
        written at each row's length; cross_k/v: per layer [rows, heads, >= max(source_lengths), head_dim]."""
        rows = tokens.shape[0]
        h = F.embedding(tokens, self.embed).float()  # [rows, d_model]
        keys = torch.arange(self_k[0].shape[2], device=tokens.device)
        buckets = self.position_bucket(keys[None, :] - lengths[:, None], bidirectional=False,
                                       num_buckets=self.buckets, max_distance=self.max_distance)
        minimum = torch.finfo(torch.float32).min
        self_bias = F.embedding(buckets, self.decoder_bias).permute(0, 2, 1)[:, :, None, :].float()
        self_bias = self_bias + torch.where(keys[None, :] <= lengths[:, None], 0.0, minimum)[:, None, None, :]
        sources = torch.arange(cross_k[0].shape[2], device=tokens.device)
        cross_bias = torch.where(sources[None, :] < source_lengths[:, None], 0.0, minimum)[:, None, None, :]
        row = torch.arange(rows, device=tokens.device)
        inner = self.heads * self.head_dim
        for i, block in enumerate(self.decoder):
            x = self.norm(h, block.norm_sa)
            q, k, v = self.project(block.qkv, x, lora, slots, (f"decoder.{i}.q", f"decoder.{i}.k",
                                                                f"decoder.{i}.v")).split(inner, -1)
            if attends_by_kernel(self_k[i]):  # the kernel writes k and v into the caches too
                out = torch.ops.peft_t5.decode_self_attention(q, k, v, lengths, self_k[i], self_v[i], self_bias)
            else:
                self_k[i][row, :, lengths] = k.view(rows, self.heads, self.head_dim).to(self.cache_dtype)
                self_v[i][row, :, lengths] = v.view(rows, self.heads, self.head_dim).to(self.cache_dtype)
                out = attend(q, self_k[i], self_v[i], self_bias)
            h = h + self.project(block.o, out, lora, slots, (f"decoder.{i}.o",))
            x = self.norm(h, block.norm_ca)
            q = self.project(block.cq, x, lora, slots, (f"decoder.{i}.cq",))
            out = attend(q, cross_k[i], cross_v[i], cross_bias, source_lengths)
            h = h + self.project(block.co, out, lora, slots, (f"decoder.{i}.co",))
            h = h + self.feed_forward(block, self.norm(h, block.norm_ff), lora, slots, f"decoder.{i}.")
        return self.head(self.norm(h, self.decoder_norm) * self.head_scale).float()


def attends_by_kernel(keys: torch.Tensor) -> bool:
    """Whether a compiled step attends over these caches through peft-t5's kernel (kernels.attention_problem): float32
    or bfloat16 caches on a CPU with AVX-512 or AVX2, several rows. It streams each row's and head's keys and values
    from memory at ~13 GB/s where inductor's fused loops reached 5-8 (t5-small, 32 rows of ~40 positions, on a 2-core
    AMD EPYC: 1.10-1.25x the step at 8 and 32 SQuAD rows, benchmarks/attention_step.py); the one-row graph keeps
    inductor's, which are fused with the ops around them where each of the kernel's calls costs ~10-20 us (0.94-0.96x
    the one-row step)."""
    return (torch.compiler.is_compiling() and kernels.attention_ready and keys.dtype in (torch.float32, torch.bfloat16)
            and keys.shape[3] in (64, 128) and keys.shape[0] > 1 and keys.device.type == "cpu")


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
           valid: torch.Tensor | None = None) -> torch.Tensor:
    """One query a row [rows, heads * head_dim] over keys and values [rows, heads, positions, head_dim] (T5 folds the
    1/sqrt(d) scaling into its weights): compiled, in float32 whatever the caches' dtype; eagerly, in theirs. valid
    [rows]: the positions each row attends to, past which its bias masks; the kernel reads no further (cross-attention
    over sources shorter than the longest: 32 SQuAD rows' 1.5x faster)."""
    rows, heads, _, head_dim = keys.shape
    if valid is not None and attends_by_kernel(keys):
        return torch.ops.peft_t5.decode_attention(q, keys, values, bias, valid)
    q = q.view(rows, heads, 1, head_dim)
    if torch.compiler.is_compiling():  # as reductions inductor fuses with the softmax: a third of the time of the
        scores = (q.float() * keys.float()).sum(-1, keepdim=True).transpose(2, 3) + bias  # flash-attention call
        out = (torch.softmax(scores, -1).transpose(2, 3) * values.float()).sum(2)  # at 8 rows
    else:
        out = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=bias.to(keys.dtype), scale=1.0)
    return out.reshape(rows, heads * head_dim).float()


class Step(nn.Module):
    """T5Weights.step with the LoRA stacks of one layout (see LoraSlots) as a flat list of tensors, the groups' A
    and B.T in turn (what compiled.py compiles)."""

    def __init__(self, weights: T5Weights, layout: tuple[tuple[str, int, int], ...]):
        super().__init__()
        self.weights, self.layout = weights, layout

    def forward(self, tokens, lengths, source_lengths, slots, self_k, self_v, cross_k, cross_v, stacks):
        return self.weights.step(tokens, lengths, source_lengths, slots, self_k, self_v, cross_k, cross_v,
                                 slot_lora(self.layout, stacks))


class Encode(nn.Module):
    """New rows' encoding (T5Weights.encode) and every decoder layer's cross-attention keys and values of it, with
    the LoRA stacks as Step takes them: what compiled.py compiles beside the step. Returns (keys, values), a list
    per layer of [rows, heads, tokens, head_dim]."""
    encodes = True

    def __init__(self, weights: T5Weights, layout: tuple[tuple[str, int, int], ...]):
        super().__init__()
        self.weights, self.layout = weights, layout

    def forward(self, ids, mask, slots, stacks) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        lora = slot_lora(self.layout, stacks)
        hidden = self.weights.encode(ids, mask, lora, slots)
        keys, values = zip(*[self.weights.cross(i, hidden, lora, slots) for i in range(len(self.weights.decoder))])
        return list(keys), list(values)


def slot_lora(layout: tuple[tuple[str, int, int], ...], stacks: list) -> dict:
    """The LoRA stacks of a layout, flat as Step and Encode take them, by projection: name -> (A, B.T)."""
    return {name: (stacks[2 * g][i], stacks[2 * g + 1][i]) for name, g, i in layout}


def lora_layers(holder, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """An adapter's (A, scaling x B) per projection, named as the step names them ("decoder.3.q")."""
    found = {}
    for path, module in holder.named_modules():
        if adapter in getattr(module, "lora_A", {}):
            place = LORA_PLACE.search(path)
            stack, block, kind, name = place.groups()
            name = f"c{name}" if kind == "EncDecAttention" else name
            found[f"{stack}.{block}.{name}"] = (module.lora_A[adapter].weight,
                                                module.lora_B[adapter].weight * module.scaling[adapter])
    return found


def slot_problem(holder, adapter: str) -> str | None:
    """Why a LoRA adapter cannot take a slot (None: it can); such an adapter steps in a lane of its own."""
    config = getattr(holder, "peft_config", {}).get(adapter)
    if config is None or type(config).__name__ != "LoraConfig":
        return "not a LoRA adapter"
    if config.use_dora or getattr(config, "lora_bias", False):
        return "DoRA or a LoRA bias"
    for path, module in holder.named_modules():
        if adapter in getattr(module, "lora_A", {}) and (not LORA_PLACE.search(path) or not isinstance(
                module.lora_A[adapter], nn.Linear)):
            return f"it adapts {path.split('model.', 1)[-1]}, which is not a linear layer inside T5's blocks"
        if adapter in getattr(module, "lora_embedding_A", {}):
            return "it adapts an embedding"
    return None


class LoraSlots:
    """The LoRA adapters of the rows in flight, in stacks the step gathers per row: for each adapted projection
    A [slots, rank, in] and B.T with the scaling folded in [slots, rank, out], the projections of one (in, out) size
    held in one tensor (the step takes few tensors: each costs a guard a call). Slot 0 is no adapter (zeros). An
    adapter is written into a slot when a row of it joins and no slot holds it, taking a slot no active row uses
    (or a new one); the stacks grow (slots, rank) by reallocation. The layout (which projections have stacks) only
    grows."""

    def __init__(self, device: torch.device):
        self.device = device
        self.layout: tuple[tuple[str, int, int], ...] = ()  # (projection, its group, its place in the group)
        self.sizes: list[tuple[int, int]] = []  # each group's (in, out)
        self.groups: list[tuple[torch.Tensor, torch.Tensor]] = []  # A [projections, slots, rank, in], B.T likewise
        self.owners: list[tuple | None] = [None, None]  # per slot: (holder id, adapter, its config's id)
        self.rank = 2  # at least 2 (and 2 slots): a size of 1 would be specialised when compiled

    def assign(self, holder, names: list[str], in_use: set[int]) -> list[int]:
        """A slot per row (0 for the base); in_use: the slots of the active rows, which keep what they hold."""
        found = []
        for name in names:
            if name == BASE_ADAPTER:
                found.append(0)
                continue
            key = (id(holder), name, id(holder.peft_config[name]))  # a name loaded again is another adapter
            slot = self.owners.index(key) if key in self.owners else self._write(holder, name, key, in_use)
            in_use = in_use | {slot}
            found.append(slot)
        return found

    def _write(self, holder, name: str, key: tuple, in_use: set[int]) -> int:
        layers = lora_layers(holder, name)
        free = [i for i in range(1, len(self.owners)) if i not in in_use]
        slot = min(free, key=lambda i: self.owners[i] is not None) if free else len(self.owners)
        self.extend(layers, max(slot + 1, len(self.owners)))
        for projection, (a, bt) in self.lora().items():
            a[slot], bt[slot] = 0, 0
            if projection in layers:
                wa, wb = layers[projection]
                a[slot, :wa.shape[0]], bt[slot, :wa.shape[0]] = wa, wb.t()
        self.owners += [None] * (slot + 1 - len(self.owners))
        self.owners[slot] = key
        return slot

    def extend(self, layers: dict, slots: int | None = None) -> None:
        """Stacks for the projections these layers adapt (an adapter's, see lora_layers) that have none, and every
        stack at `slots` (default: as many as now) x the highest rank."""
        rank = max(self.rank, *(a.shape[0] for a, _ in layers.values()))
        slots = slots or len(self.owners)
        counts = [sum(g == i for _, g, _ in self.layout) for i in range(len(self.sizes))]
        for name in sorted(set(layers) - {name for name, _, _ in self.layout}):
            size = (layers[name][0].shape[1], layers[name][1].shape[0])
            if size not in self.sizes:
                self.sizes.append(size)
                counts.append(0)
            group = self.sizes.index(size)
            self.layout += ((name, group, counts[group]),)
            counts[group] += 1
        for group, (count, size) in enumerate(zip(counts, self.sizes)):
            old = self.groups[group] if group < len(self.groups) else None
            if old is not None and old[0].shape[:3] == (count, slots, rank):
                continue
            new = tuple(torch.zeros((count, slots, rank, dim), device=self.device) for dim in size)
            if old is not None:
                for n, o in zip(new, old):
                    n[:o.shape[0], :o.shape[1], :o.shape[2]] = o
            self.groups[group:group + 1] = [new]
        self.rank = rank

    def tensors(self) -> list[torch.Tensor]:
        return [t for group in self.groups for t in group]

    def lora(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each projection's (A, B.T) stacks: views into its group's."""
        return {name: (self.groups[g][0][i], self.groups[g][1][i]) for name, g, i in self.layout}


class T5Runner:
    """Slots of decoder state for the rows of the base and of LoRA adapters (see the module's docstring).

    runner = T5Runner(peft_model)          # the PeftModel holding the LoRA adapters rows name (or the bare base)
    runner.add(token_ids, adapter_names, budgets=[32, 32])
    logits = runner.step(last_tokens)      # [rows, vocab]
    """

    def __init__(self, model, capacity: int = 8, compiled=None, cache_dtype: torch.dtype | None = None):
        """cache_dtype: of the attention caches (None: the model's float dtype; see cache_dtype())."""
        self.holder = model
        self.weights = T5Weights(model, hold_float=compiled is not None, cache_dtype=cache_dtype).eval()
        self.device = self.weights.embed.device
        self.slots = LoraSlots(self.device)
        self.compiled = compiled  # a compiled.CompiledStep; None: the eager step
        self.modules: dict[tuple, nn.Module] = {}  # (Step or Encode, LoRA layout) -> it
        self.n = 0
        self._allocate(capacity, 2, 2)
        self.first_capacity = self.capacity

    @torch.inference_mode()  # every tensor the step takes is an inference tensor (a compiled step guards on it)
    def _allocate(self, rows: int, length: int, source: int) -> None:
        """(Re)allocate the buffers for these many rows, positions and source tokens, keeping the active rows'
        state. One spare position each way: a buffer the step sees whole would be another shape when compiled."""
        fresh = not hasattr(self, "self_k")
        w = self.weights
        layers = len(w.decoder)

        used = {"self": [], "cross": []} if fresh else written_extents(self)
        for name, size in (("self_k", length), ("self_v", length), ("cross_k", source), ("cross_v", source)):
            tensors = [None] * layers if fresh else getattr(self, name)
            for i in range(layers):  # in place, layer by layer, as ModuleRunner's
                tensors[i] = grown_cache(tensors[i], (rows, w.heads, size + 1, w.head_dim), used[name[:-2]],
                                         w.cache_dtype, self.device)
            setattr(self, name, tensors)
        for name in ("lengths", "source_lengths", "row_slots"):
            new = torch.zeros(rows, dtype=torch.long, device=self.device)
            if not fresh:
                new[:self.n] = getattr(self, name)[:self.n]
            setattr(self, name, new)

    @property
    def capacity(self) -> tuple[int, int, int]:
        """(rows, positions, source tokens) the buffers hold."""
        return self.self_k[0].shape[0], self.self_k[0].shape[2] - 1, self.cross_k[0].shape[2] - 1

    def _fit(self, rows: int, length: int, source: int) -> None:
        have_rows, have_length, have_source = self.capacity
        if rows > have_rows or length > have_length or source > have_source:
            self._allocate(max(rows, have_rows * 2 if rows > have_rows else have_rows), max(length, have_length),
                           max(source, have_source))

    @torch.inference_mode()
    def add(self, sources: list[list[int]], names: list[str] | None, prefix: torch.Tensor | None = None,
            budgets: list[int] | None = None) -> None:
        """Encode new rows (token ids, each ending with </s>) through their adapters (PEFT names; None: the base)
        and give them slots n.. n+len-1, sized for `budgets` tokens each. Rows with the same source and adapter
        (the samples or beams of one input) are encoded once and their cross-attention copied."""
        if prefix is not None:
            raise ValueError("a soft prompt steps in a lane of its own (module_runner)")
        m = len(sources)
        names = names or [BASE_ADAPTER] * m
        active = self.lengths[:self.n]
        longest = max(int(active.max()) + 1 if self.n else 1, max(budgets or [1]) + 1)
        self._fit(self.n + m, longest, max(len(s) for s in sources))
        row_slots = self.slots.assign(self.holder, names, set(self.row_slots[:self.n].tolist()))
        groups, copies = encoding_plan(sources, names)
        for group in groups:
            encode, args = self._encode_args([sources[i] for i in group], [row_slots[i] for i in group])
            keys, values = self.compiled(encode, args) if self.compiled is not None else encode(*args)
            ids, mask = args[:2]
            slots, longest = torch.tensor([self.n + i for i in group], device=self.device), ids.shape[1]
            for cross_k, cross_v, k, v in zip(self.cross_k, self.cross_v, keys, values):
                cross_k[slots, :, :longest], cross_v[slots, :, :longest] = k, v
            self.source_lengths[slots] = mask.sum(1)
        copy_sources(self, copies)
        self.lengths[self.n:self.n + m] = 0
        self.row_slots[self.n:self.n + m] = torch.tensor(row_slots, device=self.device)
        self.n += m

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, names: list[str] | None = None) -> torch.Tensor:
        """Logits [n, vocab] of the next token for every active row, given each row's last token [n] (their
        adapters are those they were added with)."""
        n = self.n
        self._fit(n, int(self.lengths[:n].max()) + 1, 1)  # only for rows added without a budget
        step, args = self._step_args(n, tokens.to(self.device).clone())
        logits = self.compiled(step, args) if self.compiled is not None else step(*args)
        self.lengths[:n] += 1
        return logits

    def _step_args(self, n: int, tokens: torch.Tensor) -> tuple[Step, tuple]:
        """The step of the current LoRA layout and its arguments for rows 0..n-1: the buffers cut to the longest
        row's length and source (at least 2: a size of 1 would be specialised when compiled)."""
        length = max(int(self.lengths[:n].max()) + 1, 2) if n else 2
        source = max(int(self.source_lengths[:n].max()), 2) if n else 2
        return self._module(Step), (
            tokens, self.lengths[:n], self.source_lengths[:n], self.row_slots[:n],
            [t[:n, :, :length] for t in self.self_k], [t[:n, :, :length] for t in self.self_v],
            [t[:n, :, :source] for t in self.cross_k], [t[:n, :, :source] for t in self.cross_v],
            self.slots.tensors())

    def _encode_args(self, sources: list[list[int]], slots: list[int]) -> tuple[Encode, tuple]:
        """The Encode of the current LoRA layout and its arguments for these sources through these LoRA slots: ids
        and mask padded to the longest source (at least 2 tokens: a length of 1 would be another graph)."""
        ids, mask = padded(sources, list(range(len(sources))), self.device, least=2)
        return self._module(Encode), (ids, mask, torch.tensor(slots, device=self.device), self.slots.tensors())

    def _module(self, kind: type) -> nn.Module:
        """The Step or Encode of the current LoRA layout (one each per layout: compiled graphs are theirs)."""
        key = (kind, self.slots.layout)
        if key not in self.modules:
            self.modules[key] = kind(self.weights, self.slots.layout)
        return self.modules[key]

    @torch.inference_mode()
    def warm(self, names: list[str], most: int = 8) -> None:
        """Write these LoRA adapters (PEFT names; the first `most`, the rest only into the layout) into slots and
        have the step and the encoder compiled for one row and for several, while no row waits."""
        self.slots.assign(self.holder, names[:most], set(self.row_slots[:self.n].tolist()))
        for name in names[most:]:
            self.slots.extend(lora_layers(self.holder, name))
        if self.compiled is not None:
            for rows in (1, 2):
                self.compiled.request(*self._step_args(rows, torch.zeros(rows, dtype=torch.long,
                                                                         device=self.device)))
            for rows in (1, 2):
                self.compiled.request(*self._encode_args([[1, 1]] * rows, [0] * rows))

    reorder = ModuleRunner.reorder  # beam search: the caches are laid out as that runner's

    @torch.inference_mode()
    def remove(self, row: int) -> None:
        """Free row's slot: the last active row moves into it."""
        last = self.n - 1
        if row != last:
            move_row(self, row, last)
            for t in (self.lengths, self.source_lengths, self.row_slots):
                t[row] = t[last]
        self.n = last
