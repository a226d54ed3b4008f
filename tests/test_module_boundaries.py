"""No module of ``fastsae`` uses another module's private names.

A leading-underscore name is private to the module that defines it. When another module
needs it, the name is promoted (underscore dropped) or the code moves to where it is
used. Checked statically with ``ast`` over every ``.py`` file of the package:

* ``from fastsae.x import _y`` and the relative forms ``from .x import _y``,
  ``from ..x import _y``;
* ``m._y`` where ``m`` names another fastsae module (``import fastsae.x as m``,
  ``from fastsae import x``, ``import fastsae.x`` then ``fastsae.x._y``).

Allowed: a module's own private names, dunder names, and a private submodule imported
by a module of the package that holds it (``from . import _common`` in ``kernels``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import fastsae

PACKAGE_ROOT = Path(fastsae.__file__).parent


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_source(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module name of ``from <source> import ...`` in ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def private_imports(root: Path = PACKAGE_ROOT, package: str = "fastsae") -> list[str]:
    """``"file:line: name from module"`` for every cross-module use of a private name."""
    files = sorted(root.rglob("*.py"))
    modules = {_module_name(f, root, package) for f in files}
    found = []
    for path in files:
        me = _module_name(path, root, package)
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(root.parent)
        aliases: dict[str, str] = {}  # local name -> the fastsae module it names
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _import_source(node, me, path.name == "__init__.py")
                if not _inside(source, package):
                    continue
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if full in modules:
                        aliases[alias.asname or alias.name] = full
                    if not _is_private(alias.name) or source == me:
                        continue
                    if full in modules and _inside(me, source):
                        continue  # a private submodule, used inside its own package
                    found.append(f"{where}:{node.lineno}: {alias.name} from {source}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if _inside(alias.name, package):
                        local = alias.asname or alias.name.split(".")[0]
                        aliases[local] = alias.name if alias.asname else local
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if not (isinstance(value, ast.Name) and value.id in aliases):
                continue
            owner = ".".join([aliases[value.id], *reversed(chain)])
            if owner in modules and owner != me:
                found.append(f"{where}:{node.lineno}: {node.attr} from {owner}")
    return found


def test_no_module_imports_another_modules_private_names():
    found = private_imports()
    assert not found, "private names used outside their module:\n" + "\n".join(found)


def test_the_check_finds_each_form(tmp_path):
    """The checker itself, on a small package: each form is reported, the allowed
    ones are not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": "",
        "a.py": "_x = 1\n_y = 2\nz = _x + _y\n__all__ = ['z']\n",
        "b.py": "from pkg.a import _x\n",
        "_private.py": "w = 1\n",
        "sub/__init__.py": "from .. import _private\n",
        "sub/c.py": "from ..a import _y\nfrom ..a import __all__, z\n",
        "sub/d.py": "import pkg.a as m\nfrom pkg import a\nprint(m._x, a._y, a.z)\n",
        "sub/e.py": "def f():\n    from .c import _q\n",
    }
    for name, text in sources.items():
        (pkg / name).write_text(text)
    found = private_imports(pkg, "pkg")
    assert found == [
        "pkg/b.py:1: _x from pkg.a",
        "pkg/sub/c.py:1: _y from pkg.a",
        "pkg/sub/d.py:3: _x from pkg.a",
        "pkg/sub/d.py:3: _y from pkg.a",
        "pkg/sub/e.py:2: _q from pkg.sub.c",
    ], found
