import pytest

from pam_cgpolicy import limits
from pam_cgpolicy.errors import LimitError
from pam_cgpolicy.limits import BusProperty, convert
from pam_cgpolicy.slicelimits import INFINITY, UINT32_MAX


def one(key, value):
    (prop,) = convert(key, value)
    return prop


@pytest.mark.parametrize(
    ("value", "usec"),
    [
        ("150%", 1_500_000),
        ("100%", 1_000_000),
        ("5%", 50_000),
        ("0.5%", 5_000),
        ("12.34%", 123_400),
        ("infinity", INFINITY),
    ],
)
def test_cpu_quota_is_usec_per_second(value, usec):
    assert one("CPUQuota", value) == BusProperty("CPUQuotaPerSecUSec", "t", usec)


@pytest.mark.parametrize("value", ["0%", "150", 150, "abc", "1.234%", "-5%", True])
def test_cpu_quota_rejects(value):
    with pytest.raises(LimitError, match="CPU quota"):
        convert("CPUQuota", value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2G", 2 * 1024**3),
        ("1800M", 1800 * 1024**2),
        ("512K", 512 * 1024),
        ("1T", 1024**4),
        ("1.5G", int(1.5 * 1024**3)),
        (4096, 4096),
        ("4096", 4096),
        ("infinity", INFINITY),
    ],
)
def test_memory_sizes_use_powers_of_1024(value, expected):
    assert one("MemoryMax", value) == BusProperty("MemoryMax", "t", expected)


def test_memory_percentage_is_a_scale_of_uint32():
    assert one("MemoryHigh", "50%") == BusProperty("MemoryHighScale", "u", UINT32_MAX // 2)
    assert one("MemoryMax", "100%") == BusProperty("MemoryMaxScale", "u", UINT32_MAX)


@pytest.mark.parametrize("value", ["2g", "2GB", "two", "", -1, "150%", 1.5, False])
def test_memory_rejects(value):
    with pytest.raises(LimitError):
        convert("MemorySwapMax", value)


def test_tasks_max_forms():
    assert one("TasksMax", 512) == BusProperty("TasksMax", "t", 512)
    assert one("TasksMax", "512") == BusProperty("TasksMax", "t", 512)
    assert one("TasksMax", "infinity") == BusProperty("TasksMax", "t", INFINITY)
    assert one("TasksMax", "10%") == BusProperty("TasksMaxScale", "u", UINT32_MAX // 10)
    for bad in (0, -3, "many", "0%", "100%", True):  # systemd refuses a scale of 100%
        with pytest.raises(LimitError):
            convert("TasksMax", bad)


def test_weights():
    assert one("CPUWeight", 100) == BusProperty("CPUWeight", "t", 100)
    assert one("CPUWeight", "idle") == BusProperty("CPUWeight", "t", 0)
    assert one("IOWeight", 10000) == BusProperty("IOWeight", "t", 10000)
    for key, bad in (("IOWeight", "idle"), ("CPUWeight", 0), ("CPUWeight", 10001)):
        with pytest.raises(LimitError, match="weight"):
            convert(key, bad)


def test_allowed_cpus_is_a_little_endian_bitmask():
    assert one("AllowedCPUs", "0-3,6") == BusProperty("AllowedCPUs", "ay", bytes([0b0100_1111]))
    assert one("AllowedCPUs", "9").value == bytes([0, 0b10])
    assert limits.format_cpu_list(limits.cpus_from_mask(bytes([0b0100_1111, 1]))) == "0-3,6,8"
    for bad in ("", "3-1", "a", 3):
        with pytest.raises(LimitError):
            convert("AllowedCPUs", bad)


def test_unknown_key_names_the_known_ones():
    with pytest.raises(LimitError, match="CPUQuota"):
        convert("CpuQuota", "100%")


def test_properties_for_lifts_managed_keys_the_group_leaves_out():
    props = limits.properties_for({"CPUQuota": "100%"}, managed={"CPUQuota", "MemoryMax"})
    names = {p.name: p.value for p in props}
    assert names["CPUQuotaPerSecUSec"] == 1_000_000
    assert names["MemoryMax"] == INFINITY
    assert names["CPUAccounting"] is True
    assert "TasksMax" not in names  # no group manages it: left to the distribution's default


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("CPUQuota", 1_500_000, "150%"),
        ("CPUQuota", INFINITY, "infinity"),
        ("MemoryMax", 2 * 1024**3, "2G"),
        ("MemoryHigh", 1800 * 1024**2, "1.8G"),
        ("TasksMax", 512, "512"),
        ("CPUWeight", INFINITY, "default"),
        ("AllowedCPUs", [15], "0-3"),
    ],
)
def test_format_in_force(key, value, shown):
    assert limits.format_in_force(key, value) == shown
