import pytest

from jointcomp.budget import LayerBounds, Accounting, parse_target, resolve_target

DENSE = 32 * 1000


@pytest.mark.parametrize(
    "spec, bits",
    [
        ("50x", DENSE / 50),
        ("500X", DENSE / 500),
        (40, DENSE / 40),
        ("96000b", 96000),
        ("12KB", 12 * 8000),
        ("12KiB", 12 * 8192),
        ("1.5MB", 1.5 * 8e6),
        ("100B", 800),
        ("0.2%", DENSE * 0.002),
        (" 2.5e1x ", DENSE / 25),
    ],
)
def test_parse_target_forms(spec, bits):
    assert parse_target(spec, DENSE) == pytest.approx(bits)


@pytest.mark.parametrize("spec", ["", "abc", "12 parsecs", "-5x", "0x", "0%", "x50", True, float("nan"), -3])
def test_parse_target_rejects_nonsense(spec):
    with pytest.raises(ValueError):
        parse_target(spec, DENSE)


def test_resolve_target_names_the_feasible_range():
    bounds = [LayerBounds(), LayerBounds()]
    acc = Accounting()
    # two layers of 500 weights: the smallest model keeps one weight at one bit per layer
    assert resolve_target("16000x", [500, 500], bounds, acc) == 2.0
    with pytest.raises(ValueError, match=r"= 1 bits is outside .* between 2 bits .*and 4.00 KB"):
        resolve_target("1b", [500, 500], bounds, acc)
    with pytest.raises(ValueError, match="outside what this model can reach"):
        resolve_target("0.5x", [500, 500], bounds, acc)


def test_layer_bounds_raise_the_floor():
    acc = Accounting()
    bounds = [LayerBounds(min_bits=4, min_density=0.1), LayerBounds(dense=True)]
    # layer 0 keeps >= 50 weights at >= 4 bits; layer 1 stays fp32
    smallest = 4 * 50 + 32 * 100
    assert resolve_target(f"{smallest}b", [500, 100], bounds, acc) == smallest
    with pytest.raises(ValueError):
        resolve_target(f"{smallest - 1}b", [500, 100], bounds, acc)


@pytest.mark.parametrize("kwargs", [dict(min_bits=0), dict(max_bits=9), dict(min_bits=5, max_bits=4), dict(min_density=1.5)])
def test_layer_bounds_validate(kwargs):
    with pytest.raises(ValueError):
        LayerBounds(**kwargs)
