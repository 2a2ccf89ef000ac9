from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.split("#")[0].strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]

setup(
    name="idefics_jax",
    version="0.1.0",
    description="Idefics2 vision-language model in JAX/Flax: TPU/GPU training, serving, HF conversion",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["idefics_jax", "idefics_jax.*"]),
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={
        # transformers' Idefics2 is the reference the tests compare against; CPU torch only.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "transformers>=5.0,<6",
                 # gs:// workdirs and data, tested against a local Cloud Storage emulator
                 "gcsfs>=2024.2", "gcp-storage-emulator>=2026.7"],
        "gcs": ["gcsfs>=2024.2"],  # gs:// workdirs (checkpoints, metrics, profiles) and data in a bucket
    },
)
