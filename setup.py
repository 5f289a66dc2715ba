from setuptools import find_packages, setup

setup(
    name="megatron_esft",
    version="0.1.0",
    description="Expert-Specialized Fine-Tuning (ESFT) for DeepSeek MoE models on Megatron-Core",
    packages=find_packages(include=["megatron_esft", "megatron_esft.*"]),
    package_data={"megatron_esft.data": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=[
        # torch itself is installed first by `make setup` (the CPU build here; clusters bring their own CUDA build)
        "torch>=2.9",
        "megatron-core==0.16.1",  # 0.17+ needs Python 3.12; compat patches are written against 0.16.1
        "transformers==5.23.0",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "sentencepiece>=0.2",
        "numpy>=1.26,<2.5",
        "packaging>=24.2",
        "psutil>=5.9",  # needed by dist_checkpointing's async filesystem writer
        "tensorboard>=2.15",
        "tqdm>=4.60",
        "matplotlib>=3.8",
    ],
    extras_require={
        # triton: Megatron-Core's Triton MLA-RoPE kernels run on CPU in Triton's interpreter in the tests
        # accelerate: transformers' own FP8 loader, the reference for DeepSeek-V3's FP8 layout in the tests
        # pytest-xdist: `make test` runs the suite in two worker processes (most tests wait on subprocesses)
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "triton>=3.4,<3.7", "accelerate>=1.0"],
        # GPU-only extras; never install into a CPU environment (a half-importable TE breaks `import megatron.core`)
        "gpu": ["transformer-engine[pytorch]>=2.9.0a0,<2.12.0"],
    },
)
