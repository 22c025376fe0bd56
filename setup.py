"""llava_jax: LLaVA (Visual Instruction Tuning) in JAX/Flax for TPU pods and NVIDIA GPUs."""

import pathlib

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10,<0.12",
    "flax>=0.12,<0.14",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.12",
    "array_record>=0.7",
    "ml_collections>=1.0",
    "absl-py>=2.0",
    "numpy>=1.26",
    "pillow>=10.0",
    "safetensors>=0.4",
    "tokenizers>=0.20",
    "sentencepiece>=0.2",
    "transformers>=4.50",
    "tqdm>=4.60",
]

# The OpenAI-compatible server and its web chat page (`python -m llava_jax.serve`).
SERVE = ["fastapi>=0.110", "uvicorn>=0.29"]

# gs:// paths (workdirs, data, exports) through etils epath's fsspec backend; orbax writes the
# checkpoint arrays itself (tensorstore's GCS driver).
GCS = ["gcsfs>=2024.2"]

EXTRAS = {
    # Parity tests build the same random weights in PyTorch transformers. The pin keeps pip on the
    # CPU wheel where one is provided locally; a range would let pip pick a multi-GB CUDA build.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3",
        # Lint and format check in .ci/run (settings in ruff.toml); pinned: formatter output changes between releases.
        "ruff==0.17.6",
        "torch==2.13.0",
        "accelerate>=1.0",
        "scikit-image>=0.22",
        "gguf>=0.10",
        # LoRA exports and imports are checked by loading them with PEFT onto transformers models.
        "peft>=0.13",
        # Server tests drive it with the official OpenAI client.
        *SERVE,
        "openai>=1.30",
        "httpx>=0.27",
        # gs:// paths are tested offline against a local GCS emulator.
        *GCS,
        "gcp-storage-emulator>=2024.8",
    ],
    "serve": SERVE,
    # Instruction-data generation (`python -m llava_jax.datagen.generate`): the HTTP client.
    "datagen": ["httpx>=0.27"],
    "cuda": ["jax[cuda12]>=0.10,<0.12"],
    "tpu": ["jax[tpu]>=0.10,<0.12", *GCS],
    "gcs": GCS,
    # libtpu's compiler for `--aot --topology` on a machine without TPUs (CI installs it in a venv of its
    # own so the CPU tests never load it).
    "tpu-compile": ["jax[tpu]>=0.10,<0.12"],
    # The GPU compiler of jax's CUDA plugin for `--aot --topology h100:8` on a machine without GPUs (no
    # CUDA libraries: `cuda12-local`); in a venv of its own, like tpu-compile.
    "gpu-compile": ["jax[cuda12-local]>=0.10,<0.12"],
    "tensorboard": ["tensorboardX>=2.6"],
    # TFDS: build LLaVA JSON + images with llava_jax/data/tfds_builders/llava_json and read the
    # ArrayRecord build through tfds.data_source; neither imports TensorFlow. importlib_resources:
    # tensorflow-datasets uses it when building from a dataset folder but does not declare it on 3.9+.
    "tfds": ["tensorflow-datasets>=4.9.10", "importlib_resources"],
}

setup(
    name="llava_jax",
    version="0.1.0",
    description="LLaVA (Visual Instruction Tuning) in JAX/Flax: models, two-stage sharded training, interop",
    long_description=pathlib.Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llava_jax", "llava_jax.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    include_package_data=True,
    license="Apache-2.0",
)
