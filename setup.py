"""Packaging: the folders are the architecture (see README, "Layout").

engine/  -> stunet          config, reference model, weights, samplers, multidiffusion, pipeline, text,
                            video, info, cli
kernels/ -> stunet.kernels  Triton kernels with their reference math
export/  -> stunet.export   ONNX / TensorRT export
"""
from setuptools import setup

setup(
    name="stunet",
    version="0.1.0",
    description="FP16 inference engine for Space-Time U-Net (STUNet) video diffusion models",
    python_requires=">=3.10",
    packages=["stunet", "stunet.model", "stunet.kernels", "stunet.export"],
    package_dir={
        "stunet": "engine",
        "stunet.model": "engine/model",
        "stunet.kernels": "kernels",
        "stunet.export": "export",
    },
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
    ],
    extras_require={
        "video": ["av>=12", "pillow"],
        "text": ["transformers>=4.40"],
        "test": ["pytest>=8", "hypothesis>=6", "av>=12", "pillow", "transformers>=4.40"],
    },
    entry_points={"console_scripts": ["stunet = stunet.cli:main"]},
)
