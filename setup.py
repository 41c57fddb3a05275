"""g2g-fast: a fast, parity-checked trainer for G2G cross-training disentanglement."""
from setuptools import find_packages, setup

setup(
    name="g2g-fast",
    version="0.1.0",
    description="G2G cross-training disentanglement (FUNIT encoders + AdaIN decoder) "
    "with fused Triton kernels, checked against a plain-PyTorch reference",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels", "kernels.*", "g2g_fast", "g2g_fast.*"]),
    install_requires=[
        # Any torch >= 2.4 works, CPU builds included. On a CPU-only machine install the CPU
        # wheel first (README), otherwise pip resolves a multi-GB CUDA build.
        "torch>=2.4",
        "numpy",
        "pillow",
        # Triton ships wheels for Linux x86-64 only; elsewhere the reference path runs alone.
        # 3.6 is the oldest tested (the GPU machines); its CPU interpreter needs numpy < 2.4.
        'triton>=3.6; platform_system == "Linux" and platform_machine == "x86_64"',
    ],
    extras_require={
        # scipy and matplotlib in dev so the tests cover the ablation's p-values (the stats extra)
        # and the figures (the plot extra): only the CUDA and DALI tests skip without a GPU
        "dev": ["pytest>=7", "pytest-benchmark>=4", "scipy>=1.8", "matplotlib>=3.7"],
        # NVIDIA DALI GPU loader (optional). NVIDIA's fused-optimiser library is never declared: the PyPI
        # package of that name is an unrelated web toolkit (it is imported only if built from source).
        "dali": ['nvidia-dali-cuda130; platform_system == "Linux"'],
        # Learning-curve PNGs (`python -m g2g_fast.plot`, the ablation's curves.png); optional.
        "plot": ["matplotlib>=3.7"],
        # Welch t-test p-values in the ablation report (Student's t distribution); optional.
        "stats": ["scipy>=1.8"],
        # FID/KID with torch-fidelity's InceptionV3 (--fid-weights); optional. Its package import needs
        # a torchvision built for the installed torch (PyPI's pairs each torch with one torchvision).
        "fidelity": ["torch-fidelity>=0.3"],
    },
)
