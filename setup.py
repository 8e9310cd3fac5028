"""paddlellm: the whole life of a large language model on PaddlePaddle."""
from setuptools import find_packages, setup

# Pins: a set known to install and run together on Python 3.11 (see DESIGN.md "Stack").
REQUIRES = [
    "paddlenlp==3.0.0b4",
    "aistudio-sdk==0.2.6",  # newer releases break paddlenlp 3.0.0b4's import
    "datasets<3",
    "huggingface_hub<1.0",
    "numpy==1.26.4",  # paddlenlp's own pin
    "pyarrow<20",  # pyarrow 20+ needs numpy 2
    "paddleslim==2.6.0",
    "decorator",  # paddleslim imports it without declaring it
    "flask>=3",
    "gradio>=5,<6",  # gradio 6 pulls huggingface_hub 2.x, which breaks paddlenlp's import
    "tqdm",
    "sentencepiece",
    "tokenizers",
    "safetensors",
]

setup(
    name="paddlellm",
    version="0.1.0",
    description="Pretrain, fine-tune, compress, merge, infer and serve LLMs with PaddlePaddle",
    packages=find_packages(include=["paddlellm", "paddlellm.*"]),
    package_data={"paddlellm": ["resources/*"]},
    python_requires=">=3.9",
    install_requires=REQUIRES,
    extras_require={
        "cpu": ["paddlepaddle==3.3.1"],
        # CUDA builds come from PaddlePaddle's own wheel index (see README), not PyPI.
        "gpu": ["paddlepaddle-gpu>=3.0"],
        # playwright drives Debian's chromium (no browser download); openai (the official client) and
        # lm-evaluation-harness (its API models need no torch) drive the server's OpenAI-compatible API.
        "test": ["pytest>=7", "requests", "playwright", "openai>=1", "lm_eval[api]>=0.4.13",
                 "zstandard",  # create_pretraining_data.py reads .jsonl.zst when zstandard is installed: tested
                 "import-linter>=2.1,<3"],  # tests/test_layers.py: the import layers of setup.cfg
    },
    entry_points={"console_scripts": ["paddlellm=paddlellm.cli:main"]},
)
