"""kvmpy: a KVM userspace VMM in Python (CFFI over <linux/kvm.h>)."""
from setuptools import find_packages, setup

setup(
    name="kvmpy",
    version="0.1.0",
    description="A KVM userspace (QEMU-lite) written in Python",
    python_requires=">=3.11",
    packages=find_packages(include=["kvmpy", "kvmpy.*"]),
    setup_requires=["cffi>=1.15"],
    cffi_modules=["kvmpy/ioctl/_build.py:ffibuilder"],
    install_requires=["cffi>=1.15", "ioctl-opt>=1.3", "numpy>=1.24", "pyroute2>=0.7", "tqdm>=4.60"],
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "qemu.qmp>=0.0.3", "pytest-timeout>=2",
                              "pytest-rerunfailures>=12"],
                    "fuzz": ["atheris>=2.3"]},   # fuzz/ (make fuzz); the Makefile's FUZZ_REQ repeats it
    entry_points={"console_scripts": ["kvmpy=kvmpy.cli:main"],
                  "pytest11": ["kvmpy=kvmpy.pytest_plugin"]},
)
