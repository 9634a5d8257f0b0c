"""megatron-sat: Sparsity-Accelerated Training for Llama-2 on megatron-core + DeepSpeed.

Install torch first and keep it pinned (see README): ``torch`` here is a range that an
installed CPU or CUDA build satisfies, so ``pip install -e .`` never replaces it.
"""

from setuptools import find_packages, setup

setup(
    name="megatron-sat",
    version="0.1.0",
    description="Sparsity-Accelerated Training (SAT) for Llama-2 continual pre-training "
                "on megatron-core and DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_sat", "megatron_sat.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.17",
        "deepspeed>=0.19.8,<0.20",
        "sentencepiece>=0.2.0",
        "numpy",
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "tools": ["transformers>=4.45", "safetensors", "protobuf", "accelerate>=1.0"],
        # SFT with SAT on HF Transformers (megatron_sat.hf, sft_llama.py)
        "hf": ["transformers>=5.0", "accelerate>=1.0", "safetensors", "protobuf"],
        "tensorboard": ["tensorboard"],
        "bench": ["matplotlib"],
        "dev": ["pytest", "transformers>=5.0", "accelerate>=1.0", "safetensors", "protobuf",
                "tensorboard", "matplotlib"],
    },
    scripts=[],
    license="Apache-2.0",
)
