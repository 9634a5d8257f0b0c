"""megatron-sat: Sparsity-Accelerated Training for Llama-2 on megatron-core + DeepSpeed.

Install torch first and keep it pinned (see README): ``torch`` here is a range that an
installed CPU or CUDA build satisfies, so ``pip install -e .`` never replaces it. The
tested versions of the whole stack are in constraints.txt (``pip install -c``).

Console scripts: megatron-sat-train (the trainer, = pretrain_llama.py), -preprocess,
-convert, -extend-vocab, -eval-ppl, -fetch-demo-data. Each is also ``python -m <module>``.
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
        "torch>=2.6",  # megatron-core 0.16 needs >= 2.6
        "megatron-core>=0.16.1,<0.17",
        "deepspeed>=0.19.8,<0.20",
        "sentencepiece>=0.2.0",
        "numpy",
    ],
    extras_require={
        # builds against the installed torch: pip install --no-build-isolation ".[flash]"
        "flash": ["flash-attn>=2.6"],
        "wandb": ["wandb"],
        "tools": ["transformers>=4.45", "safetensors", "protobuf", "accelerate>=1.0"],
        # SFT with SAT on HF Transformers (megatron_sat.hf, sft_llama.py)
        "hf": ["transformers>=5.0", "accelerate>=1.0", "safetensors", "protobuf"],
        "tensorboard": ["tensorboard"],
        "bench": ["matplotlib"],
        "dev": ["pytest", "transformers>=5.0", "accelerate>=1.0", "safetensors", "protobuf",
                "tensorboard", "matplotlib"],
    },
    entry_points={"console_scripts": [
        "megatron-sat-train = megatron_sat.training.main:main",
        "megatron-sat-preprocess = megatron_sat.tools.preprocess_data:main",
        "megatron-sat-convert = megatron_sat.tools.convert_checkpoint:main",
        "megatron-sat-extend-vocab = megatron_sat.tools.extend_vocab:main",
        "megatron-sat-eval-ppl = megatron_sat.tools.eval_ppl:main",
        "megatron-sat-fetch-demo-data = megatron_sat.tools.fetch_demo_data:main",
        "megatron-sat-sft = megatron_sat.hf.sft_main:main",
    ]},
    license="Apache-2.0",
)
