"""SAT layers under the real DeepSpeed engine with ZeRO-3 (CPU, gloo).

The sliced ops save only a reference to the full weight and re-gather the kept slice in
backward (SAT_SPEC §4, issue 8). Under ZeRO-3 the weight is partitioned again after the
forward, so the registered external parameters must be fetched back for backward. The
engine's gradients must equal those of the same block run without DeepSpeed.
"""

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.spec_utils import build_module

from megatron_sat.config import SATConfig
from megatron_sat.control import sat_external_parameters, set_sat_iteration
from megatron_sat.model import LlamaShape, transformer_config
from megatron_sat.spec import get_sat_layer_spec


class Block(torch.nn.Module):
    def __init__(self, config, sat, seq):
        super().__init__()
        spec = get_sat_layer_spec(sat).submodules
        self.attn = build_module(spec.self_attention, config=config, layer_number=1)
        self.mlp = build_module(spec.mlp, config=config)
        self.freqs = RotaryEmbedding(config.kv_channels, rotary_percent=1.0,
                                     use_cpu_initialization=True)(seq)

    def forward(self, x):
        a, _ = self.attn(x, None, rotary_pos_emb=self.freqs)
        m, _ = self.mlp(x + a)
        return a + m


def test_zero3_gathers_sat_weights_for_forward_and_backward(megatron_single):
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import safe_get_full_grad

    from megatron_sat.parallel import MPU
    from megatron_sat.training.engine import _avoid_cpu_jit

    config = transformer_config(LlamaShape(1, 64, 96, 8, 2))  # fp32, GQA
    sat = SATConfig(schedule="constant", total_iters=10, metric="wanda")
    torch.manual_seed(0)
    block = Block(config, sat, seq=8)
    ref = Block(config, sat, seq=8)
    ref.load_state_dict(block.state_dict())
    _avoid_cpu_jit()
    ds_config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=block, optimizer=torch.optim.SGD(block.parameters(), lr=0.1), mpu=MPU(),
        config=ds_config)
    for module, param in sat_external_parameters(engine.module):
        deepspeed.zero.register_external_parameter(module, param)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2, 64, generator=g)
    r = torch.randn(8, 2, 64, generator=g)
    set_sat_iteration(engine.module, 4), set_sat_iteration(ref, 4)

    out = engine(x)
    weights = [engine.module.attn.linear_qkv.weight, engine.module.attn.linear_proj.weight,
               engine.module.mlp.linear_fc1.weight, engine.module.mlp.linear_fc2.weight]
    # Partitioned again after the forward: backward has to fetch them back.
    assert all(w.ds_status == ZeroParamStatus.NOT_AVAILABLE for w in weights)
    engine.backward((out * r).sum())

    ref_out = ref(x)
    (ref_out * r).sum().backward()
    assert (out - ref_out).abs().max().item() < 1e-5
    ref_weights = [ref.attn.linear_qkv.weight, ref.attn.linear_proj.weight,
                   ref.mlp.linear_fc1.weight, ref.mlp.linear_fc2.weight]
    for w, rw in zip(weights, ref_weights):
        grad = safe_get_full_grad(w)
        assert grad.shape == rw.grad.shape
        assert (grad - rw.grad).abs().max().item() < 1e-5
        # SAT really omitted units: some rows or columns have exactly zero gradient.
        assert (rw.grad == 0).any()
    engine.destroy()
