"""Integration tests run against real systemd, PAM and cgroups in a QEMU guest.

Tests get a booted guest through the fixtures vm_v2, vm_v1 or vm (both modes).
One pytest process keeps one guest alive at a time, so its v2 tests are ordered
before its v1 ones.

scripts/test runs the VM tests as two streams at once (``--vm-stream``), each
its own pytest process and guest: a login or a daemon cycle in the emulated
guest keeps one host core busy, not two, and most of a test is such sequential
work or waiting on the clock, so two guests on the two cores take about half
the wall time of one after the other. Stream ``a`` takes the v2 tests of every
module but those in SECOND_STREAM_V2; stream ``b`` takes those and all v1 tests.

Both modes run what touches cgroups, where v1 differs: limits, usage, freezing,
evicting. A module whose behaviour is the same on both (faults of the node,
mail, metrics, history, messages, access and trust checks, one decision per
slice) is marked ``v2_only`` as a whole, and so is such a test in a module on
both: an emulated guest's minutes go where a difference can show.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmharness.machine import VM
from vmharness.registry import VMRegistry

REPO_ROOT = Path(__file__).resolve().parents[2]
VM_FIXTURES = frozenset({"vm", "vm_v2", "vm_v1"})
# Their v2 tests go to stream b, before its v1 node: about half the suite's guest
# minutes each way (a new module goes to stream a).
SECOND_STREAM_V2 = frozenset(
    {
        "test_login_message.py",
        "test_metrics.py",
        "test_one_decision.py",
        "test_policy_trust.py",
        "test_trust.py",
        "test_visibility.py",
        "test_package.py",
        "test_sync.py",
    }
)
STREAMS = ("a", "b")
REQUIRED_TOOLS = (
    "qemu-system-x86_64",
    "qemu-img",
    "debootstrap",
    "mkfs.ext4",
    "ssh",
    "scp",
    "ssh-keygen",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--vm-stream",
        choices=STREAMS,
        help="run only this stream's share of the VM tests (see tests/integration/conftest.py)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: runs against a real systemd inside the test VM")


def _skip_requested() -> bool:
    return os.environ.get("CGPOLICY_SKIP_VM") == "1"


def _cgroup_modes(item: pytest.Item) -> set[str]:
    names = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    modes = {mode for mode in ("v2", "v1") if f"vm_{mode}" in names}
    if callspec is not None and "vm" in callspec.params:
        modes.add(callspec.params["vm"])
    return modes


def _order(item: pytest.Item) -> int:
    modes = _cgroup_modes(item)
    return 2 if "v1" in modes else 1 if modes else 0


def _stream(item: pytest.Item) -> str:
    modes = _cgroup_modes(item)
    second = "v1" in modes or getattr(item, "path", Path()).name in SECOND_STREAM_V2
    return STREAMS[1] if second else STREAMS[0]


def _place(item: pytest.Item) -> tuple[int, int, str]:
    """v2, then v1; within each, the modules on ``vm`` by file name, then those that
    ask for a node of their own make (package, sync).
    Stable: tests keep their order within a file."""
    takes_vm = "vm" in getattr(item, "fixturenames", ())
    return _order(item), 0 if takes_vm else 1, str(getattr(item, "path", ""))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    stream = config.getoption("--vm-stream")
    left_out = [
        i
        for i in items
        if (i.get_closest_marker("v2_only") and "v1" in _cgroup_modes(i))
        or (stream and _stream(i) != stream)
    ]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item not in left_out]
    for item in items:
        if VM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.vm)
        if _skip_requested() and item.get_closest_marker("vm"):
            item.add_marker(pytest.mark.skip(reason="CGPOLICY_SKIP_VM=1"))
    items.sort(key=_place)


# Guest seconds per module and cgroup mode (setup, call and teardown summed; a
# boot counts to the module that needed it): what the streams are balanced on.
_MODULE_SECONDS: defaultdict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    mode = re.search(r"\[(v[12])\b", report.nodeid)
    key = f"{report.nodeid.split('::')[0]} [{mode.group(1) if mode else 'v2'}]"
    _MODULE_SECONDS[key] += report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    stream = terminalreporter.config.getoption("--vm-stream")
    terminalreporter.section(f"seconds per module{f' (stream {stream})' if stream else ''}")
    for key, seconds in sorted(_MODULE_SECONDS.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.1f}s  {key}")


def _missing_prerequisites() -> list[str]:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.insert(0, "root (debootstrap and the image build need it)")
    return missing


@pytest.fixture(scope="session")
def vm_registry(pytestconfig: pytest.Config) -> Iterator[VMRegistry]:
    if _skip_requested():
        pytest.skip("CGPOLICY_SKIP_VM=1")
    missing = _missing_prerequisites()
    if missing:
        pytest.fail(
            "VM integration tests cannot run here; missing: "
            + ", ".join(missing)
            + ". Set CGPOLICY_SKIP_VM=1 to skip them deliberately.",
            pytrace=False,
        )
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    # A stream's guest gets one vCPU, the host one core per guest: two guests of two
    # vCPUs each made a login about 1.4 times slower than two of one each (measured).
    cpus = 1 if pytestconfig.getoption("--vm-stream") else 2
    registry = VMRegistry(
        output=capture.global_and_fixture_disabled if capture else None, cpus=cpus
    )
    yield registry
    registry.close()


@pytest.fixture(scope="session")
def vm_v2(vm_registry: VMRegistry) -> VM:
    return vm_registry.get("v2")


@pytest.fixture(scope="session")
def vm_v1(vm_registry: VMRegistry) -> VM:
    return vm_registry.get("v1")


# Session scope so module fixtures (say, one install per module) can build on it;
# pytest then also groups the tests by mode by itself.
@pytest.fixture(scope="session", params=["v2", "v1"])
def vm(request: pytest.FixtureRequest) -> VM:
    return request.getfixturevalue(f"vm_{request.param}")  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _vm_of_this_test_is_running(request: pytest.FixtureRequest) -> None:
    """Boots a VM shut down for the other mode again (fresh disk), should the order interleave."""
    modes = _cgroup_modes(request.node)
    if len(modes) == 1:
        request.getfixturevalue("vm_registry").get(modes.pop())


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
