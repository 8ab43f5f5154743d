"""The project's error classes live in one module, errors.py."""

import importlib
import inspect
import pkgutil

import pam_cgpolicy

# Flow control inside the CLI, never raised to a caller: not an error of the project.
INTERNAL = {"pam_cgpolicy.cli._Failed"}


def test_every_exception_class_is_defined_in_errors_py():
    found = []
    for info in pkgutil.iter_modules(pam_cgpolicy.__path__):
        module = importlib.import_module(f"pam_cgpolicy.{info.name}")
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            ):
                found.append(f"{module.__name__}.{name}")
    strays = [name for name in found if not name.startswith("pam_cgpolicy.errors.")]
    assert set(strays) == INTERNAL, strays
    assert "pam_cgpolicy.errors.DaemonError" in found  # the scan sees errors.py itself
