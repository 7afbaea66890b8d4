"""Builds libmemtrack.so for the wheel (the rest of the configuration is in pyproject.toml).

setuptools-rust would name a cdylib like a Python extension (libmemtrack.abi3.so), but the file
must be called libmemtrack.so: `memtrack run` preloads it by that name and the tracker
recognises its own preload by it. So `cargo build --release -p memtrack-preload` runs here, in
the workspace's own target directory (a release build already there is reused), and the file
is shipped as data in lib/memtrack/: <prefix>/lib/memtrack/libmemtrack.so, the place the
command searches (../lib/memtrack/ from bin/memtrack), for venv, --user and system installs.
"""

import json
import os
import shutil
import subprocess

from setuptools import Command, setup
from setuptools.command.build import build

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

ROOT = os.path.dirname(os.path.abspath(__file__))
# Relative to this file, as data_files wants; made by build_preload before install_data runs.
STAGED = os.path.join("build", "memtrack-preload", "libmemtrack.so")


class build_preload(Command):
    description = "build libmemtrack.so (cargo build --release -p memtrack-preload)"
    user_options = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        cmd = [
            os.environ.get("CARGO", "cargo"),
            "build",
            "--release",
            "-p",
            "memtrack-preload",
            "--manifest-path",
            os.path.join(ROOT, "Cargo.toml"),
            "--message-format=json-render-diagnostics",
        ]
        print(" ".join(cmd))
        out = subprocess.run(cmd, stdout=subprocess.PIPE, check=True).stdout
        built = None
        for line in out.splitlines():
            msg = json.loads(line)
            target = msg.get("target") or {}
            if msg.get("reason") == "compiler-artifact" and "cdylib" in target.get("kind", []):
                built = next((f for f in msg["filenames"] if f.endswith(".so")), built)
        if built is None:
            raise RuntimeError("cargo built no libmemtrack.so (%s)" % " ".join(cmd))
        dest = os.path.join(ROOT, STAGED)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(built, dest)


class build_with_preload(build):
    sub_commands = [("build_preload", None)] + build.sub_commands


class bdist_wheel_any_python(bdist_wheel):
    # Nothing in the wheel depends on the Python version: one wheel per platform.
    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


# setup.cfg puts egg_info's metadata here rather than in python/, where a source checkout on
# PYTHONPATH would make the pytest plugin load by its entry point; egg_info wants it to exist.
os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)

setup(
    cmdclass={
        "build": build_with_preload,
        "build_preload": build_preload,
        "bdist_wheel": bdist_wheel_any_python,
    },
    data_files=[("lib/memtrack", [STAGED])],
)
