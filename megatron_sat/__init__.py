"""megatron-sat: Sparsity-Accelerated Training for Llama-2 on megatron-core + DeepSpeed.

The method is defined in SAT_SPEC.md; the public pieces are re-exported here.
"""

from megatron_sat.config import SATConfig
from megatron_sat.importance import neuron_scores
from megatron_sat.schedule import omission_rates
from megatron_sat.selection import select, selection_generator

__version__ = "0.1.0"

__all__ = ["SATConfig", "neuron_scores", "omission_rates", "select", "selection_generator",
           "__version__"]
