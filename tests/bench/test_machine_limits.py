"""The pure parts of machine_limits: /proc/cpuinfo parsing, the fractions, the JSON round trip.
No test here depends on how fast this machine is."""

import pytest

from selfhost.bench.machine_limits import MachineLimits, bandwidth_fraction, compute_fraction, describe
from selfhost.cpu_identity import parse_cpuinfo

XEON = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""

GRAVITON = """\
processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop sha3 asimddp sve i8mm bf16
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
CPU revision\t: 1
"""


def test_x86_model_and_flags_of_interest_in_fixed_order():
    cpu = parse_cpuinfo(XEON)
    assert cpu.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu.isa_flags == ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def test_arm_features_and_a_model_from_implementer_and_part():
    cpu = parse_cpuinfo(GRAVITON)
    assert cpu.model == "CPU implementer 0x41, part 0xd40"
    assert cpu.isa_flags == ("asimd", "asimddp", "i8mm", "bf16", "sve")


def test_an_old_cpu_has_none_of_the_flags():
    cpu = parse_cpuinfo("processor : 0\nmodel name : Old CPU\nflags : fpu sse sse2\n")
    assert cpu.isa_flags == ()


def test_bandwidth_fraction_is_bytes_moved_over_bandwidth():
    # 500 MB of weights per token at 10 tok/s is 5 GB/s: half of 10 GB/s.
    assert bandwidth_fraction(500e6, 10.0, 10.0) == pytest.approx(0.5)


def test_compute_fraction_and_a_missing_peak():
    # 200 GFLOP in 2 s is 100 GFLOP/s: a quarter of a 400 GFLOP/s peak.
    assert compute_fraction(200e9, 2.0, 400.0) == pytest.approx(0.25)
    assert compute_fraction(200e9, 2.0, None) is None


def test_limits_survive_json_and_describe_names_every_precision():
    limits = MachineLimits(
        cpu_model="Test CPU", isa_flags=("avx2",), threads=2, cpu_count=2, load_avg=(0.5, 0.25, 0.1),
        date="2026-01-01T00:00:00+00:00", llc_bytes=32 * 2**20, read_gb_s=12.5,
        matmul_gflop_s={"fp32": 100.0, "bf16": 400.0, "int8": None},
    )
    assert MachineLimits.from_json(limits.to_json()) == limits
    text = "\n".join(describe(limits))
    assert "Test CPU" in text and "avx2" in text and "12.5 GB/s" in text
    assert "fp32 100" in text and "bf16 400" in text and "int8 n/a" in text
    assert "0.50 0.25 0.10" in text and "32 MiB" in text


def test_confirmed_best_ignores_a_lone_impossible_time():
    from selfhost.bench.machine_limits import confirmed_best

    assert confirmed_best([0.016, 0.0015, 0.0161, 0.017]) == 0.016
    assert confirmed_best([0.010, 0.0105, 0.03]) == 0.010
    assert confirmed_best([0.01, 0.02, 0.04]) == 0.02  # no two agree: the median
