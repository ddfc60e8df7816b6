"""jaxcompress: compress Llama-family language models in JAX/Flax."""

from setuptools import find_packages, setup

# Ranges that hold on the CPU machines (Python 3.11, jax 0.10.x) and on the GPU image
# (Python 3.12, jax 0.11.2, flax 0.12.10, optax 0.2.8, orbax-checkpoint 0.12.4).
INSTALL_REQUIRES = [
    "jax>=0.10.0,<0.12",
    "flax>=0.12.4,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.4",
    "numpy>=1.26",
    "safetensors>=0.4",
    "tokenizers>=0.20",
    "transformers>=5.0",
    "gguf>=0.10",
    "pyyaml>=6.0",
    "jinja2>=3.1",
    "tqdm>=4.66",
    "rich>=13.0",
    "tensorboard>=2.16",
    "matplotlib>=3.8",
]

EXTRAS_REQUIRE = {
    # Tests compare against transformers' PyTorch models; the CPU build of torch 2.13.0 lies on
    # the CI machines' disk (a plain `torch` would pull a multi-GB CUDA build). pytest-xdist: the
    # README's test command runs the suite in two worker processes (`-n 2`).
    "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "torch==2.13.0", "lm-eval==0.4.13",
            "accelerate>=1.0"],
    # `lm_eval --model jaxcompress` (see jaxcompress/eval/lm_eval_adapter.py).
    "lm-eval": ["lm-eval>=0.4.13,<0.5"],
}

setup(
    name="jaxcompress",
    version="0.1.0",
    description="Compression of Llama-family language models as pure pytree transforms in JAX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["jaxcompress", "jaxcompress.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["jaxcompress=jaxcompress.cli:main",
                                      "jaxcompress-lm-eval=jaxcompress.eval.lm_eval_adapter:main"]},
)
