"""EnergyTransform: exact inverses for every kind, fitted statistics, serialisation, bad config."""
import json

import numpy as np
import pytest
import torch

from pcfm.tasks.energy import KIND_OPTIONS, EnergyTransform

ENERGIES = torch.logspace(-4, 6, 2001, dtype=torch.float64)  # MeV
INCIDENT = torch.full_like(ENERGIES, 2e6)  # MeV, above every point energy

ALL_KINDS = [
    {"kind": "log"},
    {"kind": "log", "reference_mev": 1000.0},
    {"kind": "fraction"},
    {"kind": "fraction", "log": True},
    {"kind": "power", "exponent": 0.5},
    {"kind": "power", "exponent": 0.3},
]
LOG_KINDS = ALL_KINDS[:2] + [ALL_KINDS[3]]


def fitted(spec) -> EnergyTransform:
    return EnergyTransform.from_dict(spec).fit(ENERGIES, INCIDENT)


def rounding_bound(transform, u, eps):
    """Largest |E' - E| that rounding u to ``eps`` allows: |du| std / |dv/dE|, plus the rounding of E."""
    energies = ENERGIES.clone().requires_grad_()
    slope, = torch.autograd.grad(transform.fixed_map(energies, INCIDENT).sum(), energies)
    v = u.double() * transform.std + transform.mean
    return 4 * eps * ((u.double().abs() * transform.std + v.abs() + transform.mean.abs()) / slope.abs() + ENERGIES)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spec", ALL_KINDS, ids=lambda s: "-".join(map(str, s.values())))
def test_round_trip_is_exact_to_the_precision_of_u(spec, dtype):
    transform = fitted(spec)
    u = transform(ENERGIES.to(dtype), INCIDENT.to(dtype))
    assert u.dtype == dtype
    back = transform.inverse(u, INCIDENT.to(dtype))
    assert back.dtype == dtype and torch.all(back >= 0)
    error = (back.double() - ENERGIES.to(dtype).double()).abs()
    assert torch.all(error <= rounding_bound(transform, u, torch.finfo(dtype).eps))


@pytest.mark.parametrize("spec", LOG_KINDS, ids=lambda s: "-".join(map(str, s.values())))
def test_float32_round_trip_of_log_kinds_is_relative(spec):
    transform = fitted(spec)
    energies = ENERGIES.float()
    back = transform.inverse(transform(energies, INCIDENT.float()), INCIDENT.float())
    relative = ((back.double() - energies.double()) / energies.double()).abs().max()
    assert relative < 2e-6  # a few float32 ulps of u times the slope std of log E


def test_fit_standardises_the_fixed_map():
    for spec in ALL_KINDS:
        transform = fitted(spec)
        u = transform(ENERGIES, INCIDENT)
        assert abs(float(u.mean())) < 1e-12 and abs(float(u.std()) - 1) < 1e-12
    log = fitted({"kind": "log"})
    expected = np.log(ENERGIES.numpy())
    assert float(log.mean) == pytest.approx(expected.mean(), rel=1e-12)
    assert float(log.std) == pytest.approx(expected.std(ddof=1), rel=1e-12)
    power = fitted({"kind": "power", "exponent": 0.3})
    assert float(power.mean) == pytest.approx((ENERGIES.numpy() ** 0.3).mean(), rel=1e-12)
    fraction = fitted({"kind": "fraction", "log": True})  # log(E / E_inc) = log E - log 2e6
    assert float(fraction.mean) == pytest.approx(expected.mean() - np.log(2e6), rel=1e-12)
    assert float(fraction.std) == pytest.approx(float(log.std), rel=1e-12)


def test_inverse_clamps_to_zero_and_log_kinds_floor_zero_energies():
    power = fitted({"kind": "power", "exponent": 0.5})
    very_low = torch.tensor([-1e3, -50.0], dtype=torch.float64)
    assert torch.equal(power.inverse(very_low), torch.zeros(2, dtype=torch.float64))
    fraction = fitted({"kind": "fraction"})
    assert torch.equal(fraction.inverse(very_low, torch.tensor(5e3)), torch.zeros(2, dtype=torch.float64))
    log = EnergyTransform("log", floor_mev=1e-3)
    zero = torch.zeros(3)
    assert torch.all(torch.isfinite(log(zero)))
    torch.testing.assert_close(log.inverse(log(zero)), torch.full((3,), 1e-3))
    assert float(power(torch.zeros(1))[0]) == pytest.approx(-float(power.mean / power.std))


def test_dict_round_trip_through_json_and_state_dict():
    for spec in ALL_KINDS:
        transform = fitted(spec)
        stored = json.loads(json.dumps(transform.to_dict()))
        assert stored["kind"] == spec["kind"] and set(stored) == {"kind", *KIND_OPTIONS[spec["kind"]], "mean", "std"}
        again = EnergyTransform.from_dict(stored)
        assert again.to_dict() == transform.to_dict()
        torch.testing.assert_close(again(ENERGIES, INCIDENT), transform(ENERGIES, INCIDENT), rtol=0, atol=0)
        unfitted = EnergyTransform.from_dict(spec)
        unfitted.load_state_dict(transform.state_dict())
        assert unfitted.to_dict() == transform.to_dict()


@pytest.mark.parametrize("build, message", [
    (lambda: EnergyTransform("sqrt"), "unknown energy transform kind 'sqrt'; choose from ['fraction', 'log', 'power']"),
    (lambda: EnergyTransform("log", exponent=0.5),
     "option(s) ['exponent'] do not apply to energy transform kind 'log'"),
    (lambda: EnergyTransform("power", exponent=0), "exponent must be positive and finite, got 0.0"),
    (lambda: EnergyTransform("log", reference_mev=-1), "reference_mev must be positive and finite, got -1.0"),
    (lambda: EnergyTransform("fraction", log="yes"), "option log must be True or False, got 'yes'"),
    (lambda: EnergyTransform("log", std=0.0), "std must be positive and finite, got 0.0"),
    (lambda: EnergyTransform("log", mean=float("nan")), "mean must be finite, got nan"),
    (lambda: EnergyTransform.from_dict({"exponent": 0.5}), "needs a 'kind'"),
    (lambda: EnergyTransform("fraction")(torch.ones(3)), "kind 'fraction' needs the incident energy"),
    (lambda: EnergyTransform("fraction")(torch.ones(2), torch.tensor([1.0, float("nan")])),
     "needs positive, finite incident energies"),
    (lambda: EnergyTransform("log").fit(torch.ones(1)), "needs at least 2 energies, got 1"),
    (lambda: EnergyTransform("power").fit(torch.tensor([1.0, float("inf")])), "non-finite transformed energies"),
    (lambda: EnergyTransform("log").fit(torch.ones(5)), "std must be positive and finite, got 0.0"),
])
def test_bad_configuration_and_input_raise(build, message):
    with pytest.raises(ValueError) as error:
        build()
    assert message in str(error.value)
