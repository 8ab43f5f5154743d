"""Test harness that builds, boots and drives a Debian 12 VM for cgpolicy's integration tests."""

from vmharness.image import ImagePaths, ensure_image
from vmharness.install import install_cgpolicy
from vmharness.machine import VM, SSHCommandError, VMError

__all__ = ["VM", "ImagePaths", "SSHCommandError", "VMError", "ensure_image", "install_cgpolicy"]
