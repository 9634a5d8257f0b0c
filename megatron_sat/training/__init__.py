"""Llama continual pre-training on DeepSpeed + megatron-core, with SAT.

One concept per module: ``configs``/``arguments`` (flags -> validated dataclasses),
``data`` (Megatron indexed data), ``engine`` (DeepSpeed), ``lr_schedule``,
``checkpointing``, ``flops``, ``logger`` (throughput log), ``loop`` and ``main``.
"""
