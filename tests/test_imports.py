"""Every module imports cleanly and without side effects on the working directory."""

import importlib
import pkgutil

import dpokit


def test_every_module_imports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = [m.name for m in pkgutil.walk_packages(dpokit.__path__, prefix="dpokit.") if m.name != "dpokit.__main__"]
    assert "dpokit.losses" in names and "dpokit.train.loop" in names
    for name in names:
        importlib.import_module(name)
    assert list(tmp_path.iterdir()) == []
