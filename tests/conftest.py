"""Shared test setup: make tests/ importable (helper modules like crosvm_grammar, fleet)."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import os  # noqa: E402
import pwd  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

#: mmdebstrap roots and kernels survive between runs here, so only the first run pays for them.
IMAGE_CACHE = Path(os.environ.get("VMSILO_TEST_CACHE", "/var/tmp/vmsilo-test-cache"))


def vm_test_blocker() -> str | None:
    """Why VM tests cannot run here (None: they can)."""
    if os.geteuid() != 0:
        return "VM tests need root (mmdebstrap, taps, chroot)"
    for tool in ("mmdebstrap", "mkfs.erofs", "apt-get", "depmod", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (make test installs it)"
    return None


def require_vm_tests() -> None:
    """Skip on a developer machine without the tools; in CI a missing tool is a failure."""
    why = vm_test_blocker()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"VM tests cannot run: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One state dir per session: the image is built into it once."""
    return tmp_path_factory.mktemp("state")


#: What the test image adds to the base packages (one image serves every VM test).
DESKTOP_TEST_PACKAGES = ("foot", "wayland-utils", "wl-clipboard")


@pytest.fixture(scope="session")
def image(state_dir: Path):  # type: ignore[no-untyped-def]
    """The default guest image, built once per test session."""
    require_vm_tests()
    from vmsilo.image.build import ImageSpec, build_image

    t = time.monotonic()
    built = build_image(
        # the Wayland tests' programs: a terminal, wayland-info and the clipboard tools
        ImageSpec(name="default", suite="bookworm", packages=DESKTOP_TEST_PACKAGES),
        state_dir,
        cache_dir=IMAGE_CACHE,
        progress=lambda m: print("[image]", m),
    )
    print(f"[image] {built.version} ready in {time.monotonic() - t:.1f} s")
    return built


@pytest.fixture(scope="module")
def host_user() -> Iterator[pwd.struct_passwd]:
    """A real non-root host account (the config's desktop ``user``), removed afterwards."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd")
    name = f"vmsilo-t{os.getpid() % 100000}"
    subprocess.run(["userdel", name], capture_output=True, check=False)
    subprocess.run(
        ["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
        check=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)
