"""Backpropagating through bitsandbytes 4-bit layers on the CPU is correct on the shapes training uses (issue 34,
item 15).

bitsandbytes warns "`gemv_4bit`: an autograd kernel was not registered ... may lead to silently incorrect behavior"
when a tensor that needs a gradient goes through ``torch.ops.bitsandbytes.gemv_4bit``. That op is its CPU
*inference* kernel: ``matmul_4bit`` calls it only for a weight that a no-grad eval forward has repacked for
AVX512-BF16 (``quant_state.packing_format_for_cpu``). :func:`core.model.keep_4bit_training_layout` (every base-model
load) switches that repacking off, so training runs ``MatMul4Bit`` (forward ``gemm_4bit`` = dequantize + linear,
backward ``grad @ dequantize_4bit(W)``), also after an evaluation. Checked here on the real Gemma 3 270M's shapes
(hidden 640, intermediate 2048, 4 query heads and 1 key/value head of 256: q 640->1024, k/v 640->256, o 1024->640,
gate/up 640->2048, down 2048->640; NF4 with double quantization as configs/ load it), LoRA r=16 on all seven,
batch 16 x 64 tokens, in training mode, fp32 and bf16 compute (bf16 under autocast like core.model.autocast):

- gemv_4bit is never called in training, before or after a no-grad eval forward (a spy on bitsandbytes.functional);
- every LoRA gradient and the input gradient through the 4-bit layers equal those through a dense copy whose weights
  are ``bitsandbytes.functional.dequantize_4bit`` of the 4-bit ones. Tolerance, as the relative Frobenius error of
  each gradient tensor: fp32 1e-5 (both sides multiply the same dequantized weights; only the summation order of
  the matmuls may differ, ~1e-7 per op); bf16 at most half the error that bf16 compute itself makes against fp32 on
  the same dense copy (and below 2e-2): the 4-bit path adds nothing measurable to the rounding bf16 training accepts.
  Measured with bitsandbytes 0.50.2's built-in CPU kernel (``gemm_4bit`` is dequantize + ``F.linear``): 0, bitwise
  equal in both dtypes; the tolerances leave room for an optimised CPU kernel with another summation order.
- the repacked path is really what the layout setting prevents: on an AVX512-BF16 CPU without it, a training
  forward after an eval forward goes through gemv_4bit and the input gradient through the 4-bit weights is lost.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from core.model import autocast, keep_4bit_training_layout

bnb = pytest.importorskip("bitsandbytes")  # after core.model: no Hub kernel lookup (core.model.no_hub_kernels)
peft = pytest.importorskip("peft")

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 640, 2048, 4, 1, 256  # gemma-3-270m's config.json
BATCH, TOKENS, R = 16, 64, 16
SHAPES = {"q_proj": (HIDDEN, HEADS * HEAD_DIM), "k_proj": (HIDDEN, KV_HEADS * HEAD_DIM),
          "v_proj": (HIDDEN, KV_HEADS * HEAD_DIM), "o_proj": (HEADS * HEAD_DIM, HIDDEN),
          "gate_proj": (HIDDEN, INTERMEDIATE), "up_proj": (HIDDEN, INTERMEDIATE), "down_proj": (INTERMEDIATE, HIDDEN)}
FP32_TOL = 1e-5
BF16_TOL = 2e-2


class Block(nn.Module):
    """The seven projections chained so that every gradient crosses several frozen layers:
    x -> q -> o -> gelu(gate) * up -> down -> [k, v]."""

    def __init__(self, layers: dict[str, nn.Module]):
        super().__init__()
        for name, layer in layers.items():
            setattr(self, name, layer)

    def forward(self, x):
        h = self.o_proj(self.q_proj(x))
        h = self.down_proj(nn.functional.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h))
        return torch.cat([self.k_proj(h), self.v_proj(h)], dim=-1)


def quantized_and_dense(dtype: torch.dtype):
    """A 4-bit block (NF4, double quant, compute dtype ``dtype``, as core.model loads one) and its dense copy with
    the dequantized weights, both wrapped by peft with the same (non-zero) LoRA weights, trainable weights fp32."""
    gen = torch.Generator().manual_seed(0)
    q_layers, d_layers = {}, {}
    for name, (n_in, n_out) in SHAPES.items():
        weight = (torch.randn(n_out, n_in, generator=gen) * 0.02).to(dtype)
        layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=dtype, compress_statistics=True,
                                  quant_type="nf4", quant_storage=torch.uint8)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                         quant_storage=torch.uint8, module=layer)
        layer = layer.to("cpu")  # quantizes
        q_layers[name] = layer
        dense = nn.Linear(n_in, n_out, bias=False, dtype=dtype)
        dense.weight = nn.Parameter(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state),
                                    requires_grad=False)
        assert dense.weight.dtype == dtype
        d_layers[name] = dense
    quant = Block(q_layers)
    keep_4bit_training_layout(quant)
    cfg = peft.LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0, target_modules=list(SHAPES), bias="none")
    quant, dense = peft.get_peft_model(quant, copy.deepcopy(cfg)), peft.get_peft_model(Block(d_layers), cfg)
    for model in (quant, dense):
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # as train/lora.apply_lora
    lora = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in quant.state_dict().items() if "lora_" in k}
    assert len(lora) == 2 * len(SHAPES)
    for model in (quant, dense):
        missing = model.load_state_dict(lora, strict=False)
        assert not missing.unexpected_keys
    return quant, dense


def gradients(model, x: torch.Tensor, upstream: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One training-mode forward + backward of a nonlinear loss (so the 4-bit layers' outputs matter)."""
    model.train()
    model.zero_grad(set_to_none=True)
    x = x.detach().to(dtype).requires_grad_(True)
    with autocast(torch.device("cpu"), dtype):
        out = model(x)
    loss = (out.float().pow(2) * upstream).sum() / out.shape[0]
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * len(SHAPES) and all(g.abs().sum() > 0 for g in grads.values())
    grads["input"] = x.grad.detach().float().clone()
    return grads


def rel_errors(a: dict, b: dict) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {k: float((a[k] - b[k]).norm() / b[k].norm()) for k in a}


@pytest.fixture
def gemv_spy(monkeypatch):
    """Counts calls of bitsandbytes.functional.gemv_4bit (what matmul_4bit calls for a repacked weight)."""
    calls = []
    real = bnb.functional.gemv_4bit

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bnb.functional, "gemv_4bit", spy)
    return calls


def inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, TOKENS, HIDDEN, generator=gen)
    upstream = torch.randn(BATCH, TOKENS, 2 * KV_HEADS * HEAD_DIM, generator=gen)
    return x, upstream


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_gradients_through_4bit_layers_equal_the_dequantized_copy(dtype, gemv_spy):
    torch.manual_seed(0)
    quant, dense = quantized_and_dense(dtype)
    x, upstream = inputs()
    with torch.no_grad():  # an evaluation first, as after every epoch: must not switch training to gemv_4bit
        quant.eval()
        with autocast(torch.device("cpu"), dtype):
            quant(x[:2].to(dtype))
    assert not any(getattr(m.weight, "quant_state", None) is not None
                   and getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in quant.modules() if isinstance(m, bnb.nn.Linear4bit))
    errors = rel_errors(gradients(quant, x, upstream, dtype), gradients(dense, x, upstream, dtype))
    assert gemv_spy == [], "training took bitsandbytes' gemv_4bit (inference) path"
    if dtype == torch.float32:
        assert max(errors.values()) < FP32_TOL, errors
    else:
        _, dense32 = quantized_and_dense(torch.float32)
        noise = rel_errors(gradients(dense, x, upstream, dtype), gradients(dense32, x, upstream, torch.float32))
        bad = {k: (errors[k], noise[k]) for k in errors if not (errors[k] <= 0.5 * noise[k] and errors[k] < BF16_TOL)}
        assert not bad, bad  # {gradient: (4-bit vs dequantized, bf16 vs fp32)}
    print(f"{dtype}: max relative gradient error 4-bit vs dequantized {max(errors.values()):.2e}")


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights for inference only on CPUs with AVX512-BF16")
def test_without_the_training_layout_an_eval_forward_sends_training_through_gemv(gemv_spy):
    quant, dense = quantized_and_dense(torch.bfloat16)
    for m in quant.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True  # bitsandbytes' default on this CPU
    x, upstream = inputs()
    with torch.no_grad():
        quant.eval()
        with autocast(torch.device("cpu"), torch.bfloat16):
            quant(x[:2].to(torch.bfloat16))
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        broken = gradients(quant, x, upstream, torch.bfloat16)
    assert gemv_spy, "the repacked weights were expected to take gemv_4bit"
    errors = rel_errors(broken, gradients(dense, x, upstream, torch.bfloat16))
    assert errors["input"] > 0.1, errors  # the gradient through the frozen 4-bit weights is gone
    print(f"without the training layout: {len(gemv_spy)} gemv_4bit calls, input gradient error {errors['input']:.2f}")
