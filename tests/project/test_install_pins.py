"""setup.cfg's accelerator extras install exactly the jax these tests run on.

`pip install -e '.[cuda]'` (or cuda12, tpu) must not pull a newer, untested jax: each extra
pins JAX's own extra to the installed version, and the core requirement's floor is that
same version. When jax is upgraded in the test environment, this fails until setup.cfg is
updated with it.
"""

import configparser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

SETUP_CFG = Path(__file__).resolve().parents[2] / "setup.cfg"
ACCELERATOR_EXTRAS = {"cuda": "cuda13", "cuda12": "cuda12", "tpu": "tpu"}  # ours: jax's


def _requirements(value: str) -> list[Requirement]:
    return [Requirement(line) for line in value.strip().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    assert parser.read(SETUP_CFG) == [str(SETUP_CFG)]
    return parser


@pytest.mark.parametrize("extra, jax_extra", sorted(ACCELERATOR_EXTRAS.items()))
def test_each_accelerator_extra_pins_the_installed_jax(setup_cfg, extra, jax_extra):
    (req,) = _requirements(setup_cfg["options.extras_require"][extra])
    assert req.name == "jax" and req.extras == {jax_extra}, str(req)
    assert str(req.specifier) == f"=={metadata.version('jax')}", (
        f"setup.cfg's [{extra}] extra says {req}, but the tests run on jax "
        f"{metadata.version('jax')}")


def test_the_core_jax_floor_is_the_installed_jax(setup_cfg):
    (req,) = [r for r in _requirements(setup_cfg["options"]["install_requires"])
              if r.name == "jax"]
    assert str(req.specifier) == f">={metadata.version('jax')}", str(req)


@pytest.mark.parametrize("name", ["boto3", "botocore"])
def test_the_test_extra_holds_boto_to_the_installed_aiobotocores_range(setup_cfg, name):
    # Each boto3 release needs its own botocore patch or newer, and aiobotocore (under s3fs)
    # takes a few botocore patches only: open ranges send pip through every newer boto3.
    (req,) = [r for r in _requirements(setup_cfg["options.extras_require"]["test"])
              if r.name == name]
    (wanted,) = [Requirement(r).specifier for r in metadata.requires("aiobotocore")
                 if Requirement(r).name == "botocore"]
    assert req.specifier == wanted, (
        f"setup.cfg's [test] extra says {req}, but the installed aiobotocore "
        f"{metadata.version('aiobotocore')} takes botocore{wanted}")
    assert metadata.version(name) in req.specifier
